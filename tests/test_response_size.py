"""The server's send limit covers the largest response its limits allow, and the Python client
accepts it: a full page of hits with large metadata is answered, never a bare RESOURCE_EXHAUSTED."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from google.protobuf import timestamp_pb2

from imagesearch.client import ImageItem, ImageSearchClient, Query
from imagesearch.server.app import run_server
from imagesearch.server.config import MIB, Limits
from imagesearch.server.response_size import (
    RESPONSE_FRAMING,
    max_collection_bytes,
    max_item_bytes,
    max_response_bytes,
)
from imagesearch.server.servicer import BATCH_RESULT_RESERVE, fit_batch_results
from imagesearch.v1 import image_search_service_pb2 as pb
from tests.conftest import tiny_config
from tests.support.tiny_plugin import TINY_PLUGIN, TinyExtractor

EMOJI = "\U0001f600"  # 4 bytes in UTF-8, the most a character takes
INT32_MIN = -(2**31)  # a negative int32 is the longest varint (10 bytes)
SMALL = Limits(max_metadata_entries=8, max_metadata_bytes=4096, max_id_length=16, max_label_length=16)


def worst_metadata(limits: Limits) -> dict[str, str]:
    """``max_metadata_entries`` entries of 4-byte characters, ``max_metadata_bytes`` in all."""
    characters = limits.max_metadata_bytes // limits.max_metadata_entries // 4
    return {chr(0x1F600 + i): EMOJI * (characters - 1) for i in range(limits.max_metadata_entries)}


def added_bytes(empty: pb.Message, full: pb.Message) -> int:
    return full.ByteSize() - empty.ByteSize()


def test_the_largest_hit_and_image_fit_their_bound() -> None:
    common = {
        "id": EMOJI * SMALL.max_id_length,
        "label": EMOJI * SMALL.max_label_length,
        "metadata": worst_metadata(SMALL),
    }
    hit = pb.SearchHit(score=-1e38, distance=-1e38, inliers=INT32_MIN, **common)
    image = pb.Image(
        width=INT32_MIN,
        height=INT32_MIN,
        create_time=timestamp_pb2.Timestamp(seconds=253402300799, nanos=999_999_999),
        **common,
    )
    assert sum(len(k.encode()) + len(v.encode()) for k, v in common["metadata"].items()) == 4096
    assert added_bytes(pb.SearchResponse(), pb.SearchResponse(hits=[hit])) <= max_item_bytes(SMALL)
    assert added_bytes(pb.ListImagesResponse(), pb.ListImagesResponse(images=[image])) <= max_item_bytes(
        SMALL
    )


def test_the_largest_collection_fits_its_bound() -> None:
    collection = pb.Collection(
        name="n" * 64,
        extractor="efficientnet-lite0",
        extractor_version="1+70349123ae8b",
        metric="inner_product",
        description=EMOJI * SMALL.max_description_length,
        image_count=2**62,
        index_bytes=2**62,
        local_features_bytes=2**62,
        state_reason="its index could not be rebuilt after a failed update: " + "x" * 200,
    )
    response = pb.ListCollectionsResponse(collections=[collection])
    assert added_bytes(pb.ListCollectionsResponse(), response) <= max_collection_bytes(SMALL)


def test_the_send_limit_is_max_message_bytes_by_default_and_grows_with_the_limits() -> None:
    assert max_response_bytes(Limits()) == Limits().max_message_bytes == 32 * MIB  # as docs/api.md says
    roomy = dataclasses.replace(Limits(), max_metadata_bytes=64 * 1024)
    assert max_response_bytes(roomy) >= roomy.max_top_k * max_item_bytes(roomy) > 64 * MIB


def batch_result_with_metadata(size: int) -> pb.SearchBatchResult:
    hit = pb.SearchHit(id="a", metadata={"k": "x" * size})
    return pb.SearchBatchResult(response=pb.SearchResponse(hits=[hit]))


def test_a_batch_answers_what_fits_and_refuses_the_rest_per_query() -> None:
    big = batch_result_with_metadata(10_000)
    failed = pb.SearchBatchResult(code=5, message="queries[3]: not found", reason="COLLECTION_NOT_FOUND")
    results = [big, big, big, failed]
    limit = RESPONSE_FRAMING + len(results) * BATCH_RESULT_RESERVE + 2 * big.ByteSize() + 100
    fitted = fit_batch_results(results, limit)
    assert fitted[:2] == [big, big] and fitted[3] == failed
    assert (fitted[2].code, fitted[2].reason, fitted[2].field) == (8, "RESPONSE_TOO_LARGE", "queries[2]")
    assert "send it alone" in fitted[2].message
    assert pb.SearchBatchResponse(results=fitted).ByteSize() <= limit


def test_a_full_page_of_large_metadata_over_4_mib_reaches_the_python_client(data_dir) -> None:
    """gRPC's usual 4 MiB on both sides: the server's send limit and the client's receive limit
    must both follow what the limits allow, not the request size limit."""
    count, value = 300, "m" * 16_000
    config = tiny_config(data_dir, limits={"max_message_bytes": 4 * MIB})
    vectors = np.random.default_rng(0).normal(size=(count, TinyExtractor.dim)).astype(np.float32)
    with (
        run_server(config, extra_plugins=[TINY_PLUGIN]) as running,
        ImageSearchClient(running.target, max_message_bytes=4 * MIB) as client,
    ):
        for start in range(0, count, 100):
            items = [
                ImageItem(id=f"i{n}", vector=vectors[n], metadata={"k": value})
                for n in range(start, start + 100)
            ]
            client.add_images(items)
        hits = client.search(vector=vectors[0], top_k=count)
        page = client.list_images(page_size=count)
        batch = client.search_batch([Query(vector=vectors[0], top_k=count)] * 2)
    assert count * len(value) > 4 * MIB
    assert len(hits) == count and all(hit.metadata == {"k": value} for hit in hits)
    assert len(page.images) == count and page.images[-1].metadata == {"k": value}
    assert [len(result) for result in batch] == [count, count]


def test_rows_stored_under_higher_limits_get_a_clear_refusal_not_a_failed_send(data_dir, caplog) -> None:
    """An operator lowered max_metadata_bytes (and with it the send limit) over stored metadata:
    gRPC failed the send with its own text, and the access log said OK (an outside test)."""
    import logging

    from imagesearch.client import ResourceExhausted

    big = {"note": "x" * 16_300}
    vector = np.ones(TinyExtractor.dim, np.float32)
    with (
        run_server(tiny_config(data_dir), extra_plugins=[TINY_PLUGIN]) as running,
        ImageSearchClient(running.target) as client,
    ):
        client.add_images([ImageItem(id=f"i{n}", vector=vector, metadata=big) for n in range(6)])
    lowered = Limits(
        max_metadata_bytes=100,
        max_metadata_entries=1,
        max_message_bytes=65536,
        max_top_k=5,
        default_top_k=5,
        max_page_size=5,
        default_page_size=5,
        max_description_length=10,
    )
    assert max_response_bytes(lowered) < 5 * 16_300
    with (
        run_server(tiny_config(data_dir, limits=lowered), extra_plugins=[TINY_PLUGIN]) as running,
        ImageSearchClient(running.target) as client,
        caplog.at_level(logging.INFO, logger="imagesearch.rpc"),
    ):
        with pytest.raises(ResourceExhausted) as refused:
            client.search(vector=vector, top_k=5)
        assert refused.value.reason == "RESPONSE_TOO_LARGE" and "stored under higher limits" in str(
            refused.value
        )
        assert "Ask for fewer hits, or have the operator" in str(refused.value)  # advice for a Search
        assert [hit.id for hit in client.search(vector=vector, top_k=1).hits] == [
            "i0"
        ]  # what fits is answered
    statuses = [getattr(r, "status", None) for r in caplog.records if getattr(r, "rpc", None) == "Search"]
    assert statuses[:1] == ["RESOURCE_EXHAUSTED"]
