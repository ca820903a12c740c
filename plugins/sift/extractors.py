"""SIFT as plugins: RootSIFT local features (``sift``) and two trainable global encodings of them.

``sift`` keeps each image's strongest keypoints with their descriptors (features.pack) and
verifies candidates geometrically (geometry.verify). ``sift-bovw`` (bag of visual words: tf-idf
over the vocabulary, L2-normalised; dimension k) and ``sift-vlad`` (VLAD: residuals to the
vocabulary's words, intra-normalised and power-law; dimension 128·k) encode those features
over a visual vocabulary, which is each collection's own state: the generic one at creation,
one fitted on the collection's images after TrainCollection. Everything is stateless apart
from the vocabulary, so every method is safe from many threads (features.py keeps one cv2.SIFT
per thread). An image with no keypoints (flat colour, tiny) gets the zero vector: stored and
searchable, never an error.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import faiss
import numpy as np

from imagesearch.plugins import LocalFeatures, NotEnoughTrainingData, TrainableExtractor
from imagesearch.plugins.sift.encoding import PCA, bovw, fit_pca, vlad
from imagesearch.plugins.sift.features import DESCRIPTOR_DIM, extract_local, pack, packed_count, unpack
from imagesearch.plugins.sift.geometry import verify
from imagesearch.plugins.sift.vocabulary import Vocabulary, fit_vocabulary

DEFAULT_MAX_SIDE = 640
DEFAULT_MAX_KEYPOINTS = 1000
DEFAULT_QUERY_KEYPOINTS = 2000
"""A query holding a small copy of a stored image (pasted at 40%: 16% of its area) keeps too few of
its keypoints among its strongest 1000; twice as many find it (docs/evaluation.md)."""
MIN_TRAINING_IMAGES = 2  # idf needs more than one image to tell common words from rare ones
DESCRIPTORS_PER_WORD = 4  # below this k-means places words on single noisy descriptors
MAX_TRAINING_DESCRIPTORS = 200_000  # a seeded sample: FAISS k-means gains little past 256 a word
VERIFY_THREADS = 2  # OpenCV's RANSAC and FAISS release the GIL: candidates verified side by side
SIFT_LOCAL_FEATURES = "sift"


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:8]


class SiftLocalFeatures(LocalFeatures):
    """RootSIFT keypoints and descriptors, packed at 144 bytes a keypoint (13-byte header)."""

    name = SIFT_LOCAL_FEATURES
    version = "1"

    def __init__(
        self,
        max_side: int = DEFAULT_MAX_SIDE,
        max_keypoints: int = DEFAULT_MAX_KEYPOINTS,
        query_keypoints: int = DEFAULT_QUERY_KEYPOINTS,
    ) -> None:
        self.max_side, self.max_keypoints = max_side, max_keypoints
        # SIFT runs on the image shrunk to max_side, never enlarged: a JPEG decoded at a reduced
        # scale must keep its long side at max_side, which a short side of max_side ensures for any
        # shape. Half of it (as first set) decoded a square 640-px query at 320 px, and a 4000 x 3000
        # photo at 500, losing keypoints (found by a copy-detection test on another CPU).
        self.min_input_side = max_side
        self.query_keypoints = max(query_keypoints, max_keypoints)
        self.description = (
            f"RootSIFT: the {max_keypoints} strongest keypoints ({self.query_keypoints} for a query) on a "
            f"{max_side}-px long side, 144 bytes a keypoint; verified by ratio-test matching and RANSAC"
        )
        # One OpenMP thread inside each pool thread: two pool threads each running FAISS on two
        # threads oversubscribe two cores (bench/bench_sift.py: 115 ms against 76 for 50 candidates).
        self._pool = ThreadPoolExecutor(
            VERIFY_THREADS,
            thread_name_prefix="sift-verify",
            initializer=faiss.omp_set_num_threads,
            initargs=(1,),
        )

    def extract(self, images: Sequence[np.ndarray], *, for_query: bool = False) -> list[bytes]:
        keypoints = self.query_keypoints if for_query else self.max_keypoints
        return [pack(extract_local(image, self.max_side, keypoints)) for image in images]

    def count(self, features: bytes) -> int:
        return packed_count(features)

    def verify(self, query: bytes, candidates: Sequence[bytes]) -> list[int]:
        unpacked = unpack(query)
        # Fewer matches than min_inliers cannot make evidence: skip fitting them (most candidates).
        return list(
            self._pool.map(
                lambda candidate: verify(unpacked, unpack(candidate), min_matches=self.min_inliers).inliers,
                candidates,
            )
        )


STATE_MAGIC = b"SIFTSTATE1"
KEYPOINTS_STATE_MAGIC = b"SIFTSTATE2"  # SIFTSTATE1 and the keypoints an image encodes
_LENGTH = struct.Struct("<I")


def pack_state(vocabulary: Vocabulary, pca: PCA | None, keypoints: int | None = None) -> bytes:
    """A collection's SIFT state: the vocabulary, for PCA-reduced VLAD the projection, and the most
    keypoints of an image it encodes (``keypoints``; None: a state from before it was kept)."""
    words = vocabulary.to_bytes()
    head = STATE_MAGIC if keypoints is None else KEYPOINTS_STATE_MAGIC + _LENGTH.pack(keypoints)
    return head + _LENGTH.pack(len(words)) + words + (pca.to_bytes() if pca is not None else b"")


def unpack_state(state: bytes) -> tuple[Vocabulary, PCA | None, int | None]:
    keypoints = None
    if state.startswith(KEYPOINTS_STATE_MAGIC):
        (keypoints,) = _LENGTH.unpack_from(state, len(KEYPOINTS_STATE_MAGIC))
        at = len(KEYPOINTS_STATE_MAGIC) + _LENGTH.size
    elif state.startswith(STATE_MAGIC):
        at = len(STATE_MAGIC)
    else:  # a bare vocabulary, as the first states were stored
        return Vocabulary.from_bytes(state), None, None
    (length,) = _LENGTH.unpack_from(state, at)
    at += _LENGTH.size
    words, rest = state[at : at + length], state[at + length :]
    return Vocabulary.from_bytes(words), PCA.from_bytes(rest) if rest else None, keypoints


class SiftExtractor(TrainableExtractor):
    """One aggregation of RootSIFT over a vocabulary (``encode`` turns descriptors into the vector),
    optionally projected by a PCA fitted with the vocabulary (``pca_dim``; VLAD's 128·k dimensions
    are mostly redundant, and a smaller vector is a smaller, faster index).

    It encodes at most ``keypoints`` of an image's strongest keypoints: ``max_keypoints`` when the
    collection was created, kept in its state, so a query (extracted denser) encodes like a stored
    image, and a later change of the setting applies to images added afterwards without changing
    how the collection encodes. Read from the server's setting, it cut every image's stored
    features at the next training after the setting was lowered (an outside test: 39 images held
    30,703 keypoints, the training read 10,237). ``keypoints`` None: a state made before it was
    kept, encoding at the server's setting as it always did."""

    default_metric = "cosine"
    base_version = "1"
    local_features = SIFT_LOCAL_FEATURES
    batches = False  # SIFT works image by image: each request keeps its own thread

    def __init__(
        self,
        name: str,
        vocabulary: Vocabulary,
        encode: Callable[[np.ndarray, Vocabulary], np.ndarray],
        dim_of: Callable[[int], int],
        what: str,
        local: SiftLocalFeatures,
        default_words: int,
        max_words: int,
        *,
        pca: PCA | None = None,
        pca_dim: int = 0,
        keypoints: int | None = None,
    ) -> None:
        self.name, self.vocabulary, self._encode, self._dim_of = name, vocabulary, encode, dim_of
        self.pca, self.pca_dim = pca, pca_dim
        self.dim = pca.dim if pca is not None else dim_of(vocabulary.k)
        self.local, self._what, self.default_model_size = local, what, default_words
        self.max_model_size = max_words
        self.keypoints = keypoints
        self.encoded_keypoints = keypoints or local.max_keypoints
        projection = f".pca{pca.dim}-{_digest(pca.to_bytes())}" if pca is not None else ""
        # Named only when not the default: the versions of states made before it was kept stay.
        capped = f".kp{keypoints}" if keypoints not in (None, DEFAULT_MAX_KEYPOINTS) else ""
        self.version = f"{self.base_version}+{vocabulary.version}{projection}{capped}"
        self.min_input_side = local.min_input_side
        self.description = (
            f"SIFT ({what}) over a {vocabulary.k}-word vocabulary {vocabulary.version}: {local.description}. "
            f"TrainCollection fits a vocabulary on the collection's images ({default_words} words by default)"
        )

    def extract(self, images: Sequence[np.ndarray]) -> np.ndarray:
        found = [extract_local(image, self.local.max_side, self.encoded_keypoints) for image in images]
        return self._vectors([f.descriptors for f in found])

    def _vectors(self, per_image: Sequence[np.ndarray]) -> np.ndarray:
        """Encode each image's descriptors, then project them when this state has a PCA."""
        raw = np.zeros((len(per_image), self._dim_of(self.vocabulary.k)), dtype=np.float32)
        for row, descriptors in enumerate(per_image):
            raw[row] = self._encode(descriptors, self.vocabulary)
        if self.pca is None:
            return raw
        # An image without keypoints stays the zero vector (a projection would move it off zero).
        return np.where(raw.any(axis=1, keepdims=True), self.pca.apply(raw), 0).astype(np.float32)

    def _descriptors(self, features: bytes) -> np.ndarray:
        """The strongest descriptors this state encodes: a denser query set encodes like a stored one."""
        return unpack(features).descriptors[: self.encoded_keypoints]

    def encode(self, features: Sequence[bytes]) -> np.ndarray:
        return self._vectors([self._descriptors(packed) for packed in features])

    def state(self) -> bytes:
        return pack_state(self.vocabulary, self.pca, self.keypoints)

    def with_state(self, state: bytes) -> SiftExtractor:
        vocabulary, pca, keypoints = unpack_state(state)
        return SiftExtractor(
            self.name,
            vocabulary,
            self._encode,
            self._dim_of,
            self._what,
            self.local,
            self.default_model_size,
            self.max_model_size,
            pca=pca,
            pca_dim=self.pca_dim,
            keypoints=keypoints,
        )

    def fit(
        self,
        features: Sequence[bytes],
        size: int = 0,
        seed: int = 0,
        still_wanted: Callable[[], None] | None = None,
    ) -> bytes:
        """FAISS k-means over the sample's descriptors (at most 200,000, seeded), then idf weights;
        ``still_wanted`` is called between k-means iterations."""
        words = size or self.default_model_size
        per_image = [self._descriptors(packed) for packed in features]
        total = sum(len(d) for d in per_image)
        needed = words * DESCRIPTORS_PER_WORD
        if len(per_image) < MIN_TRAINING_IMAGES or total < needed:
            raise NotEnoughTrainingData(
                f"a {words}-word vocabulary needs at least {MIN_TRAINING_IMAGES} images and {needed} "
                f"SIFT descriptors ({DESCRIPTORS_PER_WORD} a word); the collection has {len(per_image)} "
                f"images with {total}, at most {self.encoded_keypoints} an image (add images, or ask for "
                "fewer words)"
            )
        with_keypoints = sum(1 for d in per_image if len(d))
        if self.pca_dim and with_keypoints < self.pca_dim:
            raise NotEnoughTrainingData(
                f"a {self.pca_dim}-d PCA of VLAD needs at least {self.pca_dim} images with keypoints; "
                f"the collection has {with_keypoints} (add images, or lower [plugins.sift] vlad_pca_dim)"
            )
        pooled = np.concatenate(per_image) if per_image else np.zeros((0, DESCRIPTOR_DIM), np.float32)
        if len(pooled) > MAX_TRAINING_DESCRIPTORS:
            chosen = np.random.default_rng(seed).choice(len(pooled), MAX_TRAINING_DESCRIPTORS, replace=False)
            pooled = pooled[np.sort(chosen)]
        vocabulary = fit_vocabulary(pooled, words, seed, still_wanted=still_wanted).fit_idf(per_image)
        pca = None
        keypoints = self.encoded_keypoints  # a state from before it was kept gets the cap it trained at
        if self.pca_dim:
            fitted = self.with_state(pack_state(vocabulary, None, keypoints))
            sample = fitted._vectors([d for d in per_image if len(d)])  # no PCA yet: raw VLAD
            pca = fit_pca(sample, self.pca_dim)
        return pack_state(vocabulary, pca, keypoints)


BOVW_TRAINED_WORDS = 1024
VLAD_TRAINED_WORDS = 64
# Fit time grows with words × descriptors (200,000 at most) and VLAD's dimension with 128 × words:
# 16,384 words is a k-means of minutes here; 256 VLAD words already make 32,768-d vectors (128 KB).
BOVW_MAX_WORDS = 16_384
VLAD_MAX_WORDS = 256


def sift_plugins(
    vocabulary: Vocabulary,
    *,
    max_side: int = DEFAULT_MAX_SIDE,
    max_keypoints: int = DEFAULT_MAX_KEYPOINTS,
    query_keypoints: int = DEFAULT_QUERY_KEYPOINTS,
    vlad_pca_dim: int = 0,
) -> tuple[SiftLocalFeatures, list[SiftExtractor]]:
    """The ``sift`` local features and the two extractors that encode them over ``vocabulary``,
    at most ``max_keypoints`` an image (a new collection keeps that in its state);
    ``vlad_pca_dim`` > 0: TrainCollection also fits a PCA reducing VLAD to that many dimensions."""
    local = SiftLocalFeatures(max_side, max_keypoints, query_keypoints)
    vlad_extractor = SiftExtractor(
        "sift-vlad",
        vocabulary,
        vlad,
        lambda k: k * DESCRIPTOR_DIM,
        "VLAD",
        local,
        VLAD_TRAINED_WORDS,
        VLAD_MAX_WORDS,
        pca_dim=vlad_pca_dim,
        keypoints=max_keypoints,
    )
    return local, [
        SiftExtractor(
            "sift-bovw",
            vocabulary,
            bovw,
            lambda k: k,
            "bag of visual words, tf-idf",
            local,
            BOVW_TRAINED_WORDS,
            BOVW_MAX_WORDS,
            keypoints=max_keypoints,
        ),
        vlad_extractor,
    ]
