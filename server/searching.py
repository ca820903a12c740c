"""Search and Classify: each query checked and given its vector (read, sent, or extracted from
its image), concurrent queries answered by shared index calls on one index thread, then
re-ranked by verified geometry where asked. The engine hands every search here."""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from imagesearch.plugins.types import Metric, TrainableExtractor
from imagesearch.server.batching import Batcher
from imagesearch.server.budget import PixelBudget
from imagesearch.server.catalog import Catalog
from imagesearch.server.classify import (
    BUCKETED,
    CENTROID,
    CLASSIFY_MODES,
    DEFAULT_NEIGHBORS,
    KNN,
    PLAIN,
    SEARCH_MODES,
    Classification,
    shares,
)
from imagesearch.server.collection import EXTRACTOR_CHANGED, Collection, Hit
from imagesearch.server.config import ServerConfig
from imagesearch.server.errors import (
    Aborted,
    DeadlineExceeded,
    FailedPrecondition,
    ImageSearchError,
    Internal,
    InvalidArgument,
    ResourceExhausted,
    shown,
    store_damage_reported,
)
from imagesearch.server.extraction import Extraction
from imagesearch.server.imaging import decode_image
from imagesearch.server.item_checks import (
    check_batch_pixels,
    check_deadline,
    check_vector,
    decoded_total,
)
from imagesearch.server.plugin_output import checked_encode, checked_inliers
from imagesearch.server.records import (
    ClassifyQuery,
    PendingSearch,
    SearchOutcome,
    SearchQuery,
    Timings,
)
from imagesearch.server.vector_input import as_matrix

log = logging.getLogger(__name__)


GEOMETRIC = "geometric"
MAX_SEED = 2**31 - 1  # FAISS k-means takes a C int
RERANK_METHODS = (GEOMETRIC,)


@dataclass(eq=False)
class _Plan:
    """One query of a search batch on its way: validated, then given a vector, then searched."""

    collection: Collection
    k: int
    labels: tuple[str, ...]
    override: Metric | None
    vector: np.ndarray | None = None
    pixels: np.ndarray | None = None
    exclude: int | None = None
    decode_ms: float = 0.0
    extract_ms: float = 0.0
    error: ImageSearchError | None = None
    bucketed: bool = False
    predicted: Classification | None = None
    rerank: int = 0  # candidates to verify geometrically; 0: no re-ranking
    local: bytes | None = None  # the query's local features, for re-ranking
    version: str = ""  # the extractor version the vector was made with ("" for a client's vector)
    rerank_ms: float = 0.0

    def pending(self) -> PendingSearch:
        assert self.vector is not None
        k = max(self.k, self.rerank)
        return PendingSearch(
            self.collection, self.vector, k, self.labels, self.override, self.exclude, self.version
        )

    def neighbours(self, count: int) -> PendingSearch:
        """The search whose labelled hits vote for this query's class (any label, own metric)."""
        assert self.vector is not None
        return PendingSearch(self.collection, self.vector, count, (), None, self.exclude, self.version)


def _check_search_deadline(plans: Sequence[_Plan], deadline: float | None) -> None:
    """Past the deadline, the plans fail before the index search (which no caller would wait for)."""
    if plans and deadline is not None and time.monotonic() > deadline:
        for plan in plans:
            plan.error = plan.error or DeadlineExceeded(
                "deadline exceeded before the index search", reason="DEADLINE_EXCEEDED"
            )


def _for_query(error: ImageSearchError, position: int, count: int) -> ImageSearchError:
    """In a batch of several queries, name the query an error belongs to (field queries[i])."""
    if count > 1 and not error.message.startswith("queries["):
        error = copy.copy(error)
        error.message = f"queries[{position}]: {error.message}"
        error.field = f"queries[{position}]" + (f".{error.field}" if error.field else "")
    return error


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000


class Searching:
    """Plans, batches and answers searches and classifications."""

    def __init__(
        self, config: ServerConfig, catalog: Catalog, extraction: Extraction, pixels: PixelBudget
    ) -> None:
        self.config, self.limits, self.catalog = config, config.limits, catalog
        self.extraction, self.pixels = extraction, pixels
        # Concurrent searches run as one index call per collection and filter. Every index
        # search runs on this one thread, so FAISS's OpenMP team stays one warm team (teams of
        # other threads would spin and steal the cores: see batching.py).
        self._index_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="index")
        self.searches: Batcher[PendingSearch, list[Hit] | ImageSearchError] = Batcher(
            self._run_searches,
            config.search_max_batch,
            config.batch_max_wait_ms / 1000,
            runner=self._index_thread,
        )

    def close(self) -> None:
        """Stop the index thread once no call is running (after the gRPC server has stopped)."""
        self._index_thread.shutdown(wait=True)

    # -- search ----------------------------------------------------------------------------
    def _metric_override(self, collection: Collection, name: str) -> Metric | None:
        """The metric a search asks for instead of the collection's own; None for its own."""
        if not name or name == collection.spec.metric:
            return None
        return self.catalog.metric(name)

    def _top_k(self, top_k: int, field: str = "top_k") -> int:
        """A hit count asked for (``field`` names it: Classify's is ``neighbors``); 0 means the default."""
        if top_k < 0:
            raise InvalidArgument(f"{field} must be >= 0, got {top_k}", field=field, reason="BAD_TOP_K")
        if top_k > self.limits.max_top_k:
            raise InvalidArgument(
                f"{field} {top_k} is over the limit of {self.limits.max_top_k}",
                field=field,
                reason="BAD_TOP_K",
                metadata={"limit": str(self.limits.max_top_k), "value": str(top_k)},
            )
        return top_k or self.limits.default_top_k

    def search(self, query: SearchQuery, deadline: float | None = None) -> SearchOutcome:
        outcome = self.search_batch([query], deadline)[0]
        if isinstance(outcome, ImageSearchError):
            raise outcome
        return outcome

    def search_batch(
        self, queries: Sequence[SearchQuery], deadline: float | None = None
    ) -> list[SearchOutcome | ImageSearchError]:
        """Run searches together: decode each image, extract all of one collection's images in one
        extractor call, then search through the shared batcher. Each query fails on its own."""
        started = time.perf_counter()
        if len(queries) > self.limits.max_batch_size:
            raise ResourceExhausted(
                f"{len(queries)} queries; the limit is {self.limits.max_batch_size}",
                field="queries",
                reason="BATCH_TOO_LARGE",
                metadata={"limit": str(self.limits.max_batch_size), "value": str(len(queries))},
            )
        with self.pixels.hold(check_batch_pixels((q.image for q in queries), None, "queries", self.limits)):
            plans = self._plans(queries, deadline)
            self._extract_plans([p for p in plans if isinstance(p, _Plan)], deadline)
        self._choose_buckets([p for p in plans if isinstance(p, _Plan) and p.bucketed and p.error is None])
        ready = [p for p in plans if isinstance(p, _Plan) and p.error is None]
        step = time.perf_counter()
        found = self._search_ready(ready)
        search_ms = _ms(step)
        found = [self._rerank(plan, hits) for plan, hits in zip(ready, found, strict=True)]
        return self._outcomes(plans, ready, found, started, search_ms)

    @staticmethod
    def searches_on_loop(query: SearchQuery) -> bool:
        """Whether ``search_async`` answers this query: a vector in plain mode, whose checks are a
        few NumPy calls, with nothing to decode, extract, read, classify or verify first."""
        return query.vector is not None and query.mode in ("", PLAIN) and not query.rerank

    async def search_async(self, query: SearchQuery, deadline: float | None = None) -> SearchOutcome:
        """``search`` of a query that ``searches_on_loop``, on the caller's event loop: no worker
        thread runs it or waits for its batch (at 16 callers, the hops between threads cost as
        much as the rest of a search, bench/bench_concurrency.py)."""
        started = time.perf_counter()
        plans = self._plans([query], deadline)
        _check_search_deadline([p for p in plans if isinstance(p, _Plan)], deadline)
        ready = [p for p in plans if isinstance(p, _Plan) and p.error is None]
        step = time.perf_counter()
        found = await self.searches.submit_many_async([p.pending() for p in ready]) if ready else []
        (outcome,) = self._outcomes(plans, ready, found, started, _ms(step))
        if isinstance(outcome, ImageSearchError):
            raise outcome
        return outcome

    def _plans(
        self, queries: Sequence[SearchQuery], deadline: float | None
    ) -> list[_Plan | ImageSearchError]:
        """Each query validated and given its vector or decoded image, or the error that refuses it."""
        plans: list[_Plan | ImageSearchError] = []
        for position, query in enumerate(queries):
            try:
                with store_damage_reported(query.collection):
                    plans.append(self._plan(query, deadline))
            except ImageSearchError as error:
                plans.append(_for_query(error, position, len(queries)))
        return plans

    def _outcomes(
        self,
        plans: Sequence[_Plan | ImageSearchError],
        ready: Sequence[_Plan],
        found: Sequence[list[Hit] | ImageSearchError],
        started: float,
        search_ms: float,
    ) -> list[SearchOutcome | ImageSearchError]:
        """Each query's outcome: its hits (``found``, in the order of ``ready``) or its error."""
        by_plan = dict(zip(map(id, ready), found, strict=True))
        outcomes: list[SearchOutcome | ImageSearchError] = []
        for position, plan in enumerate(plans):
            if not isinstance(plan, _Plan):
                outcomes.append(plan)
                continue
            hits = plan.error or by_plan[id(plan)]
            if isinstance(hits, ImageSearchError):
                outcomes.append(_for_query(hits, position, len(plans)))
                continue
            metric = plan.override or plan.collection.metric
            timings = Timings(plan.decode_ms, plan.extract_ms, search_ms, _ms(started), plan.rerank_ms)
            outcomes.append(SearchOutcome(hits, timings, metric.name, plan.predicted))
        return outcomes

    def _plan(self, query: SearchQuery, deadline: float | None) -> _Plan:
        """Validate one query and find its vector, or the decoded image to extract it from."""
        collection = self.catalog.get(query.collection)
        collection.check_serving()
        k = self._top_k(query.top_k)
        override = self._metric_override(collection, query.metric)
        if query.extractor and query.extractor != collection.spec.extractor:
            raise FailedPrecondition(
                f"collection {collection.spec.name!r} is indexed with extractor {collection.spec.extractor!r}, "
                f"not {shown(query.extractor)}",
                field="extractor",
                reason="EXTRACTOR_MISMATCH",
            )
        if query.exclude_query and query.image_id is None:
            raise InvalidArgument(
                "exclude_query needs an image_id query", field="exclude_query", reason="BAD_QUERY"
            )
        mode = self._choice(query.mode, PLAIN, SEARCH_MODES, "mode")
        if mode == BUCKETED and query.labels:
            raise InvalidArgument(
                "mode BUCKETED chooses the label itself; leave labels empty",
                field="labels",
                reason="BAD_QUERY",
            )
        plan = _Plan(collection, k, tuple(query.labels), override, bucketed=mode == BUCKETED)
        plan.rerank = self._rerank_candidates(query, collection, k)
        if query.image is not None:
            collection.check_extractor()
            if plan.rerank or collection.spec.trainable:  # needed: raises when the server cannot extract them
                collection.local_features  # noqa: B018  (a hybrid collection's plain query needs none)
            step = time.perf_counter()
            plan.pixels = decode_image(
                query.image, self.limits, "image", self.extraction.min_side(collection)
            ).pixels
            plan.decode_ms = _ms(step)
        elif query.image_id is not None:
            plan.version = collection.extractor_version  # read before the vector: a retrain in between aborts
            row_id, plan.vector = collection.vector_of(query.image_id)
            plan.exclude = row_id if query.exclude_query else None
            if plan.rerank:
                plan.local = collection.stored_local_features(query.image_id)
        elif query.vector is not None:
            if query.extractor_version and query.extractor_version != collection.extractor_version:
                raise FailedPrecondition(
                    f"the vector was made with extractor version {shown(query.extractor_version)}; collection "
                    f"{collection.spec.name!r} now encodes with {collection.extractor_version!r} (it was "
                    "retrained): encode the query again",
                    field="extractor_version",
                    reason="EXTRACTOR_VERSION_MISMATCH",
                )
            plan.version = query.extractor_version
            plan.vector = check_vector(query.vector, collection, "vector")
        else:
            raise InvalidArgument(
                "the query needs image, image_id or vector", field="query", reason="NO_QUERY"
            )
        return plan

    def _search_ready(self, plans: Sequence[_Plan]) -> list[list[Hit] | ImageSearchError]:
        """Search through the shared batcher. A query encoded with a vocabulary that a training
        replaced meanwhile is encoded again from its local features and searched once more."""
        found = self.searches.submit_many([p.pending() for p in plans]) if plans else []
        stale = [
            i
            for i, hits in enumerate(found)
            if isinstance(hits, Aborted) and hits.reason == EXTRACTOR_CHANGED and self._reencode(plans[i])
        ]
        if stale:
            again = self.searches.submit_many([plans[i].pending() for i in stale])
            for i, hits in zip(stale, again, strict=True):
                found[i] = hits
        return found

    @staticmethod
    def _reencode(plan: _Plan) -> bool:
        """Encode a query's local features with its collection's current extractor state (False when
        the query has none to encode: an image_id or vector query keeps its ABORTED)."""
        extractor = plan.collection.loaded_extractor
        if not isinstance(extractor, TrainableExtractor) or plan.local is None:
            return False
        plan.vector = checked_encode(extractor, [plan.local])[0]
        plan.version = extractor.version
        return True

    def _rerank_candidates(self, query: SearchQuery, collection: Collection, k: int) -> int:
        """How many candidates a query verifies geometrically (0: none), or why it cannot."""
        if not self._choice(query.rerank, "", RERANK_METHODS, "rerank.method"):
            return 0
        if not collection.spec.local_features:
            raise FailedPrecondition(
                f"collection {collection.spec.name!r} keeps no local features, so its candidates cannot be "
                'verified geometrically; create a collection with local_features (e.g. "sift") to re-rank',
                field="rerank",
                reason="RERANK_UNAVAILABLE",
            )
        if query.vector is not None:
            raise InvalidArgument(
                "geometric re-ranking needs an image or image_id query (a vector has no local features)",
                field="rerank",
                reason="BAD_QUERY",
            )
        asked = query.rerank_candidates
        if not 0 <= asked <= self.limits.max_rerank_candidates:
            raise InvalidArgument(
                f"rerank.candidates is {asked}; it must be between 0 and {self.limits.max_rerank_candidates}",
                field="rerank.candidates",
                reason="BAD_RERANK",
                metadata={"limit": str(self.limits.max_rerank_candidates), "value": str(asked)},
            )
        return max(asked or self.limits.default_rerank_candidates, k)

    def _rerank(self, plan: _Plan, hits: list[Hit] | ImageSearchError) -> list[Hit] | ImageSearchError:
        """Second stage: order the candidates by verified inliers (ties: the first stage's order), cut to k."""
        if not plan.rerank or isinstance(hits, ImageSearchError):
            return hits
        step = time.perf_counter()
        collection, query = plan.collection, plan.local
        try:
            local = collection.local_features
            stored = collection.local_features_of([hit.row_id for hit in hits])
            assert local is not None and query is not None
            verified = [i for i, hit in enumerate(hits) if hit.row_id in stored]
            counts = checked_inliers(local, query, [stored[hits[i].row_id] for i in verified])
        except ImageSearchError as error:  # this query's alone, not its batch's
            return error
        inliers = dict(zip(verified, counts, strict=True))
        # Below min_inliers is chance agreement: those keep the first stage's order, under the verified.
        evidence = {i: n if n >= local.min_inliers else 0 for i, n in inliers.items()}
        ranked = sorted(range(len(hits)), key=lambda i: -evidence.get(i, 0))
        plan.rerank_ms = _ms(step)
        return [dataclasses.replace(hits[i], inliers=int(inliers.get(i, 0))) for i in ranked][: plan.k]

    @staticmethod
    def _choice(value: str, default: str, allowed: Sequence[str], field: str) -> str:
        """A request's mode name: empty means ``default``, anything else must be one of ``allowed``."""
        if not value:
            return default
        if value not in allowed:
            raise InvalidArgument(
                f"unknown {field} {shown(value)} (available: {', '.join(allowed)})",
                field=field,
                reason="BAD_MODE",
            )
        return value

    def _choose_buckets(self, plans: Sequence[_Plan]) -> None:
        """BUCKETED: classify each query by its nearest labelled neighbours, then search that class only."""
        votes = self.searches.submit_many([plan.neighbours(DEFAULT_NEIGHBORS) for plan in plans])
        for plan, hits in zip(plans, votes, strict=True):
            if isinstance(hits, ImageSearchError):
                plan.error = hits
                continue
            plan.predicted = shares(((hit.label, hit.score) for hit in hits), KNN)
            plan.labels = (plan.predicted.label,) if plan.predicted.label else ()

    def classify(self, query: ClassifyQuery, deadline: float | None = None) -> Classification:
        """The query's class, from a vote of its labelled neighbours (KNN) or the nearest class mean."""
        mode = self._choice(query.mode, KNN, CLASSIFY_MODES, "mode")
        neighbors = self._top_k(query.neighbors, "neighbors") if query.neighbors else DEFAULT_NEIGHBORS
        asked = SearchQuery(
            collection=query.collection,
            image=query.image,
            image_id=query.image_id,
            vector=query.vector,
            exclude_query=query.exclude_query,
        )
        with self.pixels.hold(decoded_total([query.image], None, self.limits)):
            plan = self._plan(asked, deadline)
            self._extract_plans([plan], deadline)
        if plan.error is not None:
            raise plan.error
        if mode == CENTROID:
            return plan.collection.nearest_centroids(plan.vector, plan.exclude)
        (hits,) = self.searches.submit_many([plan.neighbours(neighbors)])
        if isinstance(hits, ImageSearchError):
            raise hits
        return shares(((hit.label, hit.score) for hit in hits), KNN)

    def _extract_plans(self, plans: Sequence[_Plan], deadline: float | None) -> None:
        """One extractor call per collection for the plans that carry decoded images."""
        by_collection: dict[int, list[_Plan]] = {}
        for plan in plans:
            if plan.pixels is not None:
                by_collection.setdefault(id(plan.collection), []).append(plan)
        for group in by_collection.values():
            if not self._extracted(group, deadline) and len(group) > 1:
                # One by one: an image the extractor refuses fails its own query only, not the
                # SearchBatch's other queries of the collection (an outside test).
                for plan in group:
                    plan.error = None
                    self._extracted([plan], deadline)
        _check_search_deadline(plans, deadline)

    def _extracted(self, group: Sequence[_Plan], deadline: float | None) -> bool:
        """Give the plans (of one collection) their vectors by one extractor call; on failure, each
        its error, and False."""
        step = time.perf_counter()
        try:
            check_deadline(deadline, "feature extraction")
            vectors, features, version = self.extraction.vectors(
                group[0].collection,
                [plan.pixels for plan in group],
                query=True,
                rerank=any(plan.rerank for plan in group),
            )
        except ImageSearchError as error:
            for plan in group:
                plan.error = error
            return False
        for at, (plan, vector) in enumerate(zip(group, vectors, strict=True)):
            plan.vector, plan.pixels, plan.extract_ms, plan.version = vector, None, _ms(step), version
            plan.local = features[at] if features is not None else None
        return True

    def _run_searches(self, pending: Sequence[PendingSearch]) -> list[list[Hit] | ImageSearchError]:
        """One index call per group of searches that can share it: same collection, label filter
        and metric; and, where the hits follow the count the index is asked for (HNSW, int8), the
        same count, the excluded row included: otherwise a query's hits would follow another
        caller's top_k."""
        groups: dict[tuple, list[int]] = {}
        for position, search in enumerate(pending):
            asked = search.k + (search.exclude is not None) if search.collection.hits_follow_count else 0
            key = (
                id(search.collection),
                search.labels,
                search.override and search.override.name,
                asked,
                search.version,
            )
            groups.setdefault(key, []).append(position)
        results: list[list[Hit] | ImageSearchError] = [[] for _ in pending]
        for positions in groups.values():
            found = _group_searched(pending, positions)
            if len(positions) > 1 and any(isinstance(hits, ImageSearchError) for hits in found):
                # Run again one by one: a query the metric cannot score (NaN) must not fail the
                # queries that shared its index call (as the batcher does for its callers).
                found = [_group_searched(pending, [p])[0] for p in positions]
            for position, hits in zip(positions, found, strict=True):
                results[position] = hits
        return results


def _group_searched(
    pending: Sequence[PendingSearch], positions: list[int]
) -> list[list[Hit] | ImageSearchError]:
    """The hits of the searches at ``positions``, which share one index call, or its error for each."""
    first = pending[positions[0]]
    try:
        with store_damage_reported(first.collection.spec.name):
            return first.collection.search_many(
                as_matrix([pending[p].vector for p in positions], len(first.vector)),
                [pending[p].k for p in positions],
                first.labels,
                first.override,
                [pending[p].exclude for p in positions],
                first.version,
            )
    except ImageSearchError as error:
        return [error] * len(positions)
    except Exception as exc:  # a bug in one group must not fail the others sharing the batch
        log.exception("search of collection %s failed", first.collection.spec.name)
        return [Internal(f"search failed ({type(exc).__name__})", reason="SEARCH_FAILED")] * len(positions)
