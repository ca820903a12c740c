"""Where a flat index keeps its vectors, to tell whether FAISS moved them."""

from __future__ import annotations

import faiss

from imagesearch.server.vector_index import VectorIndex


def storage_address(index: VectorIndex) -> int:
    """The address of a flat index's storage (0 while it is empty)."""
    inner = faiss.downcast_index(index.faiss_index.index)
    return faiss.rev_swig_ptr(inner.codes.data(), 1).ctypes.data if inner.ntotal else 0
