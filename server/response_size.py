"""How large a response the limits allow, so the server's send limit always covers it.

A client may ask for ``max_top_k`` hits or ``max_page_size`` images, each carrying up to
``max_metadata_bytes`` of metadata, an id and a label: with large metadata that is far more than
``max_message_bytes``. A send limit below it turns a valid request into a bare RESOURCE_EXHAUSTED
("Sent message larger than max") and a traceback, so the send limit is derived from the limits
instead (``max_response_bytes``); docs/api.md tells other-language clients what to receive.
"""

from __future__ import annotations

from imagesearch.server.config import Limits

UTF8_MAX_BYTES = 4  # ids, labels and descriptions are limited in characters; each is at most 4 bytes
MAP_ENTRY_FRAMING = 18  # a metadata entry's tag and length, its key's, its value's: 3 x (1 + 5)
ITEM_FRAMING = 128  # a hit's or an image's tags, lengths and fixed fields (score, size, timestamp)
COLLECTION_FRAMING = 1024  # a Collection's name, extractor and version, index parameters, state
RESPONSE_FRAMING = 64 * 1024  # the rest of a response: timings, metric, page token, predicted label
GRPC_MAX_MESSAGE = 2**31 - 1  # gRPC message sizes are int32


def max_item_bytes(limits: Limits) -> int:
    """The most one search hit or listed image can take on the wire."""
    metadata = limits.max_metadata_bytes + limits.max_metadata_entries * MAP_ENTRY_FRAMING
    text = UTF8_MAX_BYTES * (limits.max_id_length + limits.max_label_length)
    return metadata + text + ITEM_FRAMING


def max_collection_bytes(limits: Limits) -> int:
    """The most one collection of a ListCollections page can take on the wire."""
    return UTF8_MAX_BYTES * limits.max_description_length + COLLECTION_FRAMING


def max_response_bytes(limits: Limits) -> int:
    """The server's send limit: anything as large as a request it accepts (GetImage returns the
    original that came in one), and a full Search, ListImages or ListCollections page of the
    largest items the limits allow. SearchBatch answers each query that does not fit on its own
    (servicer.fit_batch_results)."""
    hits = max(limits.max_top_k, limits.max_page_size) * max_item_bytes(limits)
    collections = limits.max_page_size * max_collection_bytes(limits)
    return min(GRPC_MAX_MESSAGE, max(limits.max_message_bytes, max(hits, collections) + RESPONSE_FRAMING))
