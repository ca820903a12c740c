"""Index results against a NumPy brute-force reference, for every built-in metric, over gRPC."""

from __future__ import annotations

import numpy as np
import pytest

from imagesearch.v1 import image_search_service_pb2 as pb
from tests.support.tiny_plugin import TinyExtractor

pytestmark = pytest.mark.e2e
DIM = TinyExtractor.dim


def reference(metric: str, base: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Scores (higher = more similar) of every base vector for one query, as the API defines them."""
    if metric == "l2":
        return 1.0 / (1.0 + np.linalg.norm(base - query, axis=1))
    if metric == "inner_product":
        return base @ query
    if metric == "cosine":
        return (base @ query) / (np.linalg.norm(base, axis=1) * np.linalg.norm(query))
    raise AssertionError(metric)


def fill(stub, name: str, metric: str, vectors: np.ndarray, **collection) -> None:
    stub.CreateCollection(
        pb.CreateCollectionRequest(collection=pb.Collection(name=name, metric=metric, **collection))
    )
    for start in range(0, len(vectors), 200):
        images = [
            pb.ImageInput(id=f"v{i}", vector=pb.FloatVector(values=vectors[i]), label=f"l{i % 4}")
            for i in range(start, min(start + 200, len(vectors)))
        ]
        stub.AddImages(pb.AddImagesRequest(collection=name, images=images))


def search(stub, name: str, query: np.ndarray, k: int, **extra) -> list[pb.SearchHit]:
    return list(
        stub.Search(
            pb.SearchRequest(collection=name, vector=pb.FloatVector(values=query), top_k=k, **extra)
        ).hits
    )


@pytest.mark.parametrize("metric", ["l2", "inner_product", "cosine"])
def test_flat_hits_equal_brute_force(stub, metric):
    rng = np.random.default_rng(7)
    base = rng.normal(size=(500, DIM)).astype(np.float32)
    fill(stub, "c", metric, base)
    for query in rng.normal(size=(10, DIM)).astype(np.float32):
        expected = reference(metric, base.astype(np.float64), query.astype(np.float64))
        order = np.argsort(-expected, kind="stable")[:10]
        hits = search(stub, "c", query, 10)
        assert [h.id for h in hits] == [f"v{i}" for i in order]
        assert [h.score for h in hits] == pytest.approx(expected[order].tolist(), abs=1e-4)


@pytest.mark.parametrize(
    ("stored", "override"), [("l2", "cosine"), ("inner_product", "l2"), ("l2", "inner_product")]
)
def test_metric_override_equals_brute_force(stub, stored, override):
    rng = np.random.default_rng(11)
    base = rng.normal(size=(300, DIM)).astype(np.float32)
    fill(stub, "c", stored, base)
    query = rng.normal(size=DIM).astype(np.float32)
    expected = reference(override, base.astype(np.float64), query.astype(np.float64))
    order = np.argsort(-expected)[:5]
    hits = search(stub, "c", query, 5, metric=override)
    assert [h.id for h in hits] == [f"v{i}" for i in order]
    assert [h.score for h in hits] == pytest.approx(expected[order].tolist(), abs=1e-4)


def test_label_filter_equals_brute_force_on_the_subset(stub):
    rng = np.random.default_rng(3)
    base = rng.normal(size=(400, DIM)).astype(np.float32)
    fill(stub, "c", "cosine", base)
    query = rng.normal(size=DIM).astype(np.float32)
    subset = np.array([i for i in range(400) if i % 4 in (1, 3)])
    expected = reference("cosine", base[subset].astype(np.float64), query.astype(np.float64))
    order = subset[np.argsort(-expected)[:8]]
    hits = search(stub, "c", query, 8, labels=["l1", "l3"])
    assert [h.id for h in hits] == [f"v{i}" for i in order]


def clustered(rng: np.random.Generator, count: int) -> np.ndarray:
    centres = rng.normal(size=(40, DIM)) * 4
    return (centres[rng.integers(0, 40, count)] + rng.normal(size=(count, DIM))).astype(np.float32)


@pytest.mark.parametrize(
    ("index_type", "params"),
    [
        (pb.INDEX_TYPE_HNSW, {"hnsw": pb.HnswParams(m=16, ef_search=64)}),
        (pb.INDEX_TYPE_IVF, {"ivf": pb.IvfParams(nlist=16, nprobe=8, train_size=1000)}),
    ],
    ids=["hnsw", "ivf"],
)
def test_approximate_indexes_find_the_true_neighbours(stub, index_type, params):
    rng = np.random.default_rng(5)
    base = clustered(rng, 2000)
    fill(stub, "ann", "l2", base, index_type=index_type, **params)
    info = stub.GetCollection(pb.GetCollectionRequest(name="ann")).collection
    assert info.image_count == 2000
    if index_type == pb.INDEX_TYPE_IVF:
        assert info.index_trained
    recalls = []
    for query in clustered(rng, 20):
        truth = {f"v{i}" for i in np.argsort(np.linalg.norm(base - query, axis=1))[:10]}
        recalls.append(len(truth & {h.id for h in search(stub, "ann", query, 10)}) / 10)
    assert np.mean(recalls) >= 0.9
    # Removal works on both (HNSW through tombstones).
    first = search(stub, "ann", base[0], 1)[0].id
    assert first == "v0"
    stub.RemoveImages(pb.RemoveImagesRequest(collection="ann", ids=["v0"]))
    assert "v0" not in {h.id for h in search(stub, "ann", base[0], 10)}


def test_ivf_searches_exactly_before_it_is_trained(stub):
    rng = np.random.default_rng(9)
    base = rng.normal(size=(50, DIM)).astype(np.float32)
    fill(stub, "ivf", "l2", base, index_type=pb.INDEX_TYPE_IVF, ivf=pb.IvfParams(nlist=16))
    assert not stub.GetCollection(pb.GetCollectionRequest(name="ivf")).collection.index_trained
    query = base[7] + 0.01
    assert search(stub, "ivf", query, 1)[0].id == "v7"


def test_queries_the_float32_scan_cannot_settle_rank_exactly_alone_and_in_a_batch(stub):
    """More vectors than the exact ranking's candidate cap, all within the float32 scan's rounding
    of each other (L2, a tight cluster 10^4 from the origin), and a zero query under inner product
    that ties every vector: each query's hits are the exact ones, the same sent alone or in a
    SearchBatch beside others, equal scores in the order stored (an outside test found other hits
    alone than in a batch, and later ids among ties)."""
    rng = np.random.default_rng(21)
    center = rng.normal(size=DIM) * 1e4
    cluster = (center + rng.normal(size=(1500, DIM)) * 1e-2).astype(np.float32)
    fill(stub, "far", "l2", cluster)
    fill(stub, "ip", "inner_product", rng.normal(size=(1100, DIM)).astype(np.float32))
    queries = (center + rng.normal(size=(4, DIM)) * 1e-2).astype(np.float32)
    asked = [pb.SearchRequest(collection="far", vector=pb.FloatVector(values=q), top_k=5) for q in queries]
    asked.append(pb.SearchRequest(collection="ip", vector=pb.FloatVector(values=np.zeros(DIM)), top_k=5))
    together = stub.SearchBatch(pb.SearchBatchRequest(queries=asked)).results
    for request, in_batch in zip(asked, together, strict=True):
        alone = stub.Search(request).hits
        assert [(h.id, h.score) for h in in_batch.response.hits] == [(h.id, h.score) for h in alone]
    for query, result in zip(queries, together[:-1], strict=True):
        wide = cluster.astype(np.float64) - query.astype(np.float64)
        nearest = np.argsort((wide * wide).sum(axis=1), kind="stable")[:5]
        assert [h.id for h in result.response.hits] == [f"v{i}" for i in nearest]
    assert [h.id for h in together[-1].response.hits] == ["v0", "v1", "v2", "v3", "v4"]


@pytest.mark.parametrize("metric", ["inner_product", "l2"])
def test_vectors_whose_products_underflow_rank_exactly(stub, metric):
    """Vectors of norm 1e-22 are accepted (there is no lower bound), and the float32 scan scores
    them 0 or a subnormal against each other: the hits are still the exact ones, alone and in a
    SearchBatch (an outside test got v11, v3, v1, v2, v4 for the exact v456, v588, ...)."""
    rng = np.random.default_rng(1)
    base = (rng.normal(size=(1500, DIM)) / np.sqrt(DIM) * 1e-22).astype(np.float32)
    fill(stub, "tiny", metric, base)
    queries = (rng.normal(size=(4, DIM)) / np.sqrt(DIM) * 1e-22).astype(np.float32)
    asked = [pb.SearchRequest(collection="tiny", vector=pb.FloatVector(values=q), top_k=5) for q in queries]
    together = stub.SearchBatch(pb.SearchBatchRequest(queries=asked)).results
    wide = base.astype(np.float64)
    for request, query, in_batch in zip(asked, queries.astype(np.float64), together, strict=True):
        badness = -(wide @ query) if metric == "inner_product" else ((wide - query) ** 2).sum(axis=1)
        exact = [f"v{i}" for i in np.lexsort((np.arange(len(base)), badness))[:5]]
        assert [h.id for h in stub.Search(request).hits] == exact
        assert [h.id for h in in_batch.response.hits] == exact
