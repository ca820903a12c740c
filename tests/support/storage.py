"""Where a flat index keeps its vectors, to tell whether FAISS moved them."""

from __future__ import annotations

import faiss

from imagesearch.server.vector_index import VectorIndex, _address


def storage_address(index: VectorIndex) -> int:
    """The address of a flat index's storage (0 while it is empty)."""
    return _address(faiss.downcast_index(index.faiss_index.index).codes)
