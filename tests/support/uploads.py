"""What a collection lists, and what a failed upload stream's status says it stored."""

from __future__ import annotations

import grpc
from grpc_status import rpc_status

from imagesearch.v1 import image_search_service_pb2 as pb
from imagesearch.v1 import image_search_service_pb2_grpc as pb_grpc


def listed_ids(stub: pb_grpc.ImageSearchServiceStub) -> list[str]:
    """Ids of the default collection's images (up to 1,000), in the order they were stored."""
    return [i.id for i in stub.ListImages(pb.ListImagesRequest(page_size=1000)).images]


def stored_progress(error: grpc.RpcError) -> pb.AddImagesStreamResponse:
    """The AddImagesStreamResponse the server packed into the failed stream's status."""
    status = rpc_status.from_call(error)
    assert status is not None, "the error carries rich status details"
    (detail,) = [d for d in status.details if d.Is(pb.AddImagesStreamResponse.DESCRIPTOR)]
    progress = pb.AddImagesStreamResponse()
    detail.Unpack(progress)
    return progress
