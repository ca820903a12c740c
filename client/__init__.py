"""imagesearch Python client: find similar images on an imagesearch server over gRPC.

Install with ``pip install .`` in a checkout (the distribution imagesearch-cbir; client
only: grpcio, grpcio-status, protobuf, numpy). Usage::

    from pathlib import Path
    from imagesearch.client import ImageSearchClient, ImageItem, NotFound

    with ImageSearchClient("127.0.0.1:50051") as client:
        client.add_images([ImageItem(id="cat-1", content=Path("cat.jpg").read_bytes(), label="cat")])
        client.add_files(sorted(Path("photos").glob("*/*.jpg")), labels=lambda p: p.parent.name)
        for hit in client.search("query.jpg", top_k=5, labels=["cat", "dog"]):
            print(hit.id, hit.label, round(hit.score, 3), hit.metadata)
        try:
            client.get_image("no-such-id")
        except NotFound as error:
            print(error.reason, error.request_id)

``AsyncImageSearchClient`` (in ``imagesearch.client.aio``, re-exported here) has the
same methods for asyncio. See docs/client.md for every method and error.
"""

from imagesearch.client._requests import CallOptions, float_vector
from imagesearch.client.aio import AsyncImageSearchClient
from imagesearch.client.client import ImageSearchClient
from imagesearch.client.errors import (
    Aborted,
    AlreadyExists,
    DataLoss,
    DeadlineExceeded,
    ErrorDetails,
    FailedPrecondition,
    FieldViolation,
    ImageSearchError,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    from_rpc_error,
)
from imagesearch.client.folders import FolderImport, add_folder
from imagesearch.client.types import (
    AddResult,
    Classification,
    CollectionInfo,
    ExtractorInfo,
    HnswParams,
    ImageItem,
    ImagePage,
    ImageRecord,
    IndexType,
    ItemResult,
    IvfParams,
    LocalFeaturesInfo,
    MetricInfo,
    PluginList,
    Query,
    SearchHit,
    SearchResult,
    StageTimings,
    TrainResult,
)

__all__ = [
    "Aborted",
    "AddResult",
    "AlreadyExists",
    "AsyncImageSearchClient",
    "CallOptions",
    "Classification",
    "CollectionInfo",
    "DataLoss",
    "DeadlineExceeded",
    "ErrorDetails",
    "ExtractorInfo",
    "FailedPrecondition",
    "FieldViolation",
    "FolderImport",
    "HnswParams",
    "ImageItem",
    "ImagePage",
    "ImageRecord",
    "ImageSearchClient",
    "ImageSearchError",
    "IndexType",
    "Internal",
    "InvalidArgument",
    "ItemResult",
    "IvfParams",
    "LocalFeaturesInfo",
    "MetricInfo",
    "NotFound",
    "PluginList",
    "Query",
    "ResourceExhausted",
    "SearchHit",
    "SearchResult",
    "StageTimings",
    "TrainResult",
    "Unauthenticated",
    "Unavailable",
    "add_folder",
    "float_vector",
    "from_rpc_error",
]
