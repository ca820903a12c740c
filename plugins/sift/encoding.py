"""Global image vectors from local descriptors, for the first (FAISS) retrieval stage.

BoVW is small (k) and sparse; VLAD (k × 128) keeps each word's residuals and so tells apart
images whose words coincide, retrieving near-duplicates markedly better at the same k. An
optional PCA shrinks VLAD before indexing.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from imagesearch.plugins.sift.features import DESCRIPTOR_DIM
from imagesearch.plugins.sift.vocabulary import Vocabulary
from imagesearch.plugins.types import l2_normalize

VLAD_ALPHA = 0.5


def _unit(vector: np.ndarray) -> np.ndarray:
    return l2_normalize(vector[None, :])[0]


def bovw(descriptors: np.ndarray, vocabulary: Vocabulary) -> np.ndarray:
    """(k,) float32: word frequencies × idf, L2-normalised; zeros when there are no descriptors."""
    labels = vocabulary.assign(descriptors)
    counts = np.bincount(labels, minlength=vocabulary.k).astype(np.float32)
    return _unit(counts * vocabulary.idf)


def vlad(descriptors: np.ndarray, vocabulary: Vocabulary) -> np.ndarray:
    """(k × 128,) float32 VLAD (Jégou et al.; Arandjelović & Zisserman's intra-normalisation).

    Residuals to the assigned centroid are summed per word and each word's sum L2-normalised, so
    bursty words (repeated texture) cannot dominate; then the signed square root damps large
    components and the whole vector is L2-normalised. Zeros when there are no descriptors.
    """
    descriptors = np.asarray(descriptors, dtype=np.float32).reshape(-1, DESCRIPTOR_DIM)
    labels = vocabulary.assign(descriptors)
    sums = np.zeros((vocabulary.k, DESCRIPTOR_DIM), np.float32)
    np.add.at(sums, labels, descriptors - vocabulary.centroids[labels])
    sums = l2_normalize(sums)
    powered = np.sign(sums) * np.abs(sums) ** VLAD_ALPHA
    return _unit(powered.ravel())


@dataclass(frozen=True, eq=False)
class PCA:
    """A fitted FAISS PCA (mean-centred projection) whose outputs are L2-normalised."""

    matrix: faiss.PCAMatrix

    @property
    def dim(self) -> int:
        return int(self.matrix.d_out)

    def apply(self, vectors: np.ndarray) -> np.ndarray:
        """(n, d_in) -> (n, dim) float32, each row L2-normalised (so cosine/inner product still apply)."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, self.matrix.d_in)
        return l2_normalize(self.matrix.apply(vectors))

    def to_bytes(self) -> bytes:
        writer = faiss.VectorIOWriter()
        faiss.write_VectorTransform(self.matrix, writer)
        return faiss.vector_to_array(writer.data).tobytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> PCA:
        reader = faiss.VectorIOReader()
        faiss.copy_array_to_vector(np.frombuffer(data, np.uint8), reader.data)
        matrix = faiss.read_VectorTransform(reader)  # already the concrete class, and owns it
        if not isinstance(matrix, faiss.PCAMatrix):
            raise ValueError(f"expected a serialised PCAMatrix, got {type(matrix).__name__}")
        return cls(matrix)


def fit_pca(vectors: np.ndarray, dim: int) -> PCA:
    """Learn a projection to ``dim`` dimensions; needs at least ``dim`` vectors of more than ``dim`` dims."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    count, d_in = vectors.shape
    if not 0 < dim <= d_in:
        raise ValueError(f"PCA output dim must be in 1..{d_in}, got {dim}")
    if count < dim:
        raise ValueError(f"a {dim}-d PCA needs at least {dim} training vectors, got {count}")
    matrix = faiss.PCAMatrix(d_in, dim)
    matrix.train(vectors)
    return PCA(matrix)
