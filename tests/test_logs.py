"""The server's log set-up: gRPC's ERROR about a call whose client went away is INFO."""

from __future__ import annotations

import io
import json
import logging

from imagesearch.server.logs import configure_logging


def logged_lines(emit) -> list[dict]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        configure_logging("json", "INFO")
        stream = io.StringIO()
        root.handlers[0].setStream(stream)
        emit(logging.getLogger("grpc._cython.cygrpc"))
        return [json.loads(line) for line in stream.getvalue().splitlines()]
    finally:
        root.handlers[:], root.level = handlers, level


def test_grpcs_error_for_a_cancelled_call_is_info_without_its_traceback() -> None:
    """Cancelled SearchBatch calls made gRPC log ERROR with a traceback: an operator alerting on
    ERROR was paged for a client going away (an outside test)."""

    def emit(cygrpc: logging.Logger) -> None:
        try:
            raise RuntimeError("batch failed")
        except RuntimeError:
            cygrpc.exception(
                "%s raised in core by servicer method [%s]",
                "ExecuteBatchError",
                "/imagesearch.v1.ImageSearchService/SearchBatch",
            )
            cygrpc.exception("something else went wrong")

    gone, other = logged_lines(emit)
    assert gone["level"] == "INFO" and "exc" not in gone and "SearchBatch" in gone["msg"]
    assert other["level"] == "ERROR" and "exc" in other  # gRPC's other errors stay errors
