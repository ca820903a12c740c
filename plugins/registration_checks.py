"""What ``register`` refuses: objects the server could not serve, found at start-up.

An object that passed these checks used to be kept, then failed every request with INTERNAL
(an outside test of plugin authors): an extractor without ``extract``, a metric whose ``to_score``
was None, ranked backwards or took only scalars, a ``faiss_metric`` FAISS does not define. Each
check raises TypeError (a member missing or of the wrong type) or ValueError (a metric's functions
misbehave on a sample), naming the object by kind, registered name and class; the registry
reports it as ``plugin 'x' failed in register_...``.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import math
import numbers
import typing

import faiss
import numpy as np

from imagesearch.plugins.types import ALL_INDEX_TYPES, Extractor, LocalFeatures, Metric, TrainableExtractor

_EXTRACTOR_ATTRIBUTES = ("name", "version", "dim", "default_metric")
# The methods each base class leaves to its subclasses: its own raise NotImplementedError.
_REQUIRED_METHODS: dict[type, tuple[str, ...]] = {
    Extractor: ("extract",),
    TrainableExtractor: ("state", "with_state", "fit", "encode"),
    LocalFeatures: ("extract", "count", "verify"),
}
# Every metric type this FAISS defines (value -> name): an index takes any int, then fails each search.
FAISS_METRICS: dict[int, str] = {
    value: name
    for name, value in vars(faiss).items()
    if name.startswith("METRIC_") and isinstance(value, int)
}
# The Metric members that hold functions, read from its type hints so a new one is checked too.
METRIC_FUNCTIONS: tuple[str, ...] = tuple(
    field.name
    for field in dataclasses.fields(Metric)
    if typing.get_origin(typing.get_type_hints(Metric)[field.name]) is collections.abc.Callable
)
# Raw values from 0 to 1, denser near 0 (where good matches lie), scaled to each metric's range.
_UNIT_SAMPLE = np.concatenate(([0.0], np.geomspace(1e-4, 1.0, 33)))
# The largest raw value of the bounded FAISS metrics on the vectors they are meant for
# (non-negative, distributions for Jensen-Shannon); the others are sampled up to _UNBOUNDED.
_RAW_BOUNDS: dict[int, float] = {
    getattr(faiss, name): bound
    for name, bound in (
        ("METRIC_BrayCurtis", 1.0),
        ("METRIC_JensenShannon", math.log(2)),
        ("METRIC_Jaccard", 1.0),
        ("METRIC_GOWER", 1.0),
    )
    if hasattr(faiss, name)
}
_UNBOUNDED = 1000.0


def described(kind: str, obj: object) -> str:
    """``extractor 'name' (class Foo)``: what messages call an object. Its repr,
    ``<module.Foo object at 0x...>``, says nothing a plugin author can act on."""
    name = getattr(obj, "name", None)
    named = f" {name!r}" if isinstance(name, str) and name.strip() else ""
    return f"{kind}{named} (class {type(obj).__name__})"


# -- extractors and local features -----------------------------------------------------------------


def check_extractor(obj: object) -> None:
    """Refuse what is not an ``Extractor`` with the four required attributes, a positive integer
    ``dim`` (stored as an int) and its own ``extract``."""
    if not isinstance(obj, Extractor):
        raise TypeError(f"{described('extractor', obj)} is not a subclass of imagesearch.plugins.Extractor")
    missing = [attr for attr in _EXTRACTOR_ATTRIBUTES if not hasattr(obj, attr)]
    if missing:
        raise TypeError(f"{described('extractor', obj)} lacks {', '.join(missing)}")
    _check_name("extractor", obj)
    _check_dim(obj)
    _check_strings("extractor", obj, ("version", "default_metric"))
    _check_methods("extractor", obj)


def check_local_features(obj: object) -> None:
    """Refuse what is not a ``LocalFeatures`` with a name, a str version and its own methods."""
    if not isinstance(obj, LocalFeatures):
        raise TypeError(
            f"{described('local features', obj)} are not a subclass of imagesearch.plugins.LocalFeatures"
        )
    _check_name("local features", obj)
    _check_strings("local features", obj, ("version",))
    _check_methods("local features", obj)


def _check_name(kind: str, obj: object) -> None:
    name = getattr(obj, "name", None)
    if not isinstance(name, str) or not name.strip():
        raise TypeError(f"{described(kind, obj)} has no usable name: {name!r}")


def _check_strings(kind: str, obj: object, attributes: tuple[str, ...]) -> None:
    for attr in attributes:
        if not isinstance(getattr(obj, attr, None), str):
            raise TypeError(f"{described(kind, obj)}: {attr} must be a str")


# The largest dimension an extractor may declare: one vector is then 4 MiB, past any image
# descriptor in use (SIFT-VLAD's largest is 32,768) and near the default message limit; 10**12 was
# registered, and failed only at the first add (an outside test).
MAX_DIM = 1 << 20


def _check_dim(extractor: Extractor) -> None:
    """A positive integer of any integral type (``np.int64(4)`` too), stored as an int: FAISS's
    constructors, protobuf and JSON take a Python int, not every NumPy one."""
    dim = extractor.dim
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or not 0 < dim <= MAX_DIM:
        raise TypeError(
            f"{described('extractor', extractor)} has invalid dim {dim!r}: a positive integer up to {MAX_DIM}"
        )
    if type(dim) is not int:
        try:
            extractor.dim = int(dim)
        except AttributeError as exc:  # a read-only property, a frozen dataclass
            raise TypeError(
                f"{described('extractor', extractor)}: dim {dim!r} is not an int and cannot be set to one"
            ) from exc


def _check_methods(kind: str, obj: object) -> None:
    """Each method its base classes leave to it is its own: theirs raise NotImplementedError, so
    without it every request that calls it fails."""
    missing = [
        method
        for base, methods in _REQUIRED_METHODS.items()
        if isinstance(obj, base)
        for method in methods
        if not _implements(obj, base, method)
    ]
    if missing:
        raise TypeError(
            f"{described(kind, obj)} does not implement {', '.join(missing)} "
            "(the base class's placeholder raises NotImplementedError at every call)"
        )


def _implements(obj: object, base: type, method: str) -> bool:
    """Whether ``obj.method`` is callable and not ``base``'s placeholder (a method of the object's
    class or a function set on the instance both count)."""
    found = getattr(obj, method, None)
    return callable(found) and getattr(found, "__func__", found) is not vars(base)[method]


# -- metrics ---------------------------------------------------------------------------------------


def check_metric(obj: object) -> None:
    """Refuse what is not a ``Metric`` with a name, known index types, a FAISS metric type and
    functions that take arrays and rank in FAISS's direction (``check_scores``)."""
    if not isinstance(obj, Metric):
        raise TypeError(f"{described('metric', obj)} is not an imagesearch.plugins.types.Metric")
    _check_name("metric", obj)
    unknown = set(obj.index_types) - ALL_INDEX_TYPES
    if not obj.index_types or unknown:
        raise TypeError(
            f"{described('metric', obj)}: index_types must be a non-empty subset of {sorted(ALL_INDEX_TYPES)}"
        )
    _check_faiss_metric(obj)
    for member in METRIC_FUNCTIONS:
        if not callable(getattr(obj, member)):
            raise TypeError(
                f"{described('metric', obj)}: {member} must be a function of NumPy arrays, "
                f"got {getattr(obj, member)!r}"
            )
    check_scores(obj)


def _check_faiss_metric(metric: Metric) -> None:
    """One of FAISS's own ``METRIC_*`` ints (not a bool, though True == METRIC_L2; not a NumPy
    integer, which FAISS's constructors refuse)."""
    value = metric.faiss_metric
    if isinstance(value, bool) or not isinstance(value, int) or value not in FAISS_METRICS:
        known = ", ".join(f"faiss.{name}" for name in sorted(FAISS_METRICS.values()))
        raise TypeError(f"{described('metric', metric)}: faiss_metric must be one of {known}; got {value!r}")


def raw_sample(faiss_metric: int) -> np.ndarray:
    """Increasing raw values of ``faiss_metric`` as a search hands them to ``to_distance``: a 1-D
    float32 array, within the metric's range (inner products take either sign)."""
    sample = _UNIT_SAMPLE * _RAW_BOUNDS.get(faiss_metric, _UNBOUNDED)
    if faiss_metric == faiss.METRIC_INNER_PRODUCT:
        sample = np.concatenate((-sample[:0:-1], sample))
    return sample.astype(np.float32)


def check_scores(metric: Metric) -> None:
    """Spot-check ``to_score(to_distance(raw))`` on ``raw_sample`` and on an empty array (a search
    with no hits): numbers, one per value, no NaN, in FAISS's order and not all equal.

    FAISS keeps the k best raw values (the smallest distances, the largest similarities) and the
    server sorts those by score: a score ranking the other way returns the best match last."""
    raw = raw_sample(metric.faiss_metric)
    scores = _scores(metric, raw)
    _scores(metric, raw[:0])
    similarity = faiss.is_similarity_metric(metric.faiss_metric)
    in_order = np.diff(scores) >= 0 if similarity else np.diff(scores) <= 0
    if not in_order.all():
        at = int(np.argmin(in_order))
        raise ValueError(
            f"{described('metric', metric)}: to_score must {'grow' if similarity else 'shrink'} as "
            f"FAISS's raw {'similarity' if similarity else 'distance'} grows (higher score = more similar), "
            f"but raw {raw[at]:g} scores {scores[at]:g} and raw {raw[at + 1]:g} scores {scores[at + 1]:g}"
        )
    if scores[0] == scores[-1]:
        raise ValueError(
            f"{described('metric', metric)}: to_score gives every raw value from {raw[0]:g} to {raw[-1]:g} "
            f"the same score, {scores[0]:g}: it cannot rank"
        )


def _scores(metric: Metric, raw: np.ndarray) -> np.ndarray:
    """The scores of ``raw`` values, called as a search calls them, checked at each step."""
    distances = _applied(metric, "to_distance", raw)
    _numbers(metric, "to_distance", distances, raw)
    return _numbers(metric, "to_score", _applied(metric, "to_score", distances), raw)


def _applied(metric: Metric, member: str, values: object) -> object:
    """``metric.<member>(values)``, a TypeError saying it gets arrays when it fails on one (a
    ``math.exp(-d)`` takes only scalars)."""
    try:
        return getattr(metric, member)(values)
    except Exception as exc:  # the plugin's function may fail in any way
        raise TypeError(
            f"{described('metric', metric)}: {member} failed on a 1-D float32 array of "
            f"{np.shape(values)[0]} values: {type(exc).__name__}: {exc}. Metric functions receive NumPy "
            "arrays, not single numbers"
        ) from exc


def _numbers(metric: Metric, member: str, result: object, raw: np.ndarray) -> np.ndarray:
    """``result`` as float64, refused unless it holds one real number per raw value, none NaN."""
    values = np.asarray(result)
    if values.dtype.kind not in "iuf" or values.shape != raw.shape:
        raise TypeError(
            f"{described('metric', metric)}: {member} turned a float32 array of shape {raw.shape} into "
            f"{values.dtype} values of shape {values.shape}; it must return one number per value"
        )
    values = values.astype(np.float64)
    if np.isnan(values).any():
        raise ValueError(
            f"{described('metric', metric)}: {member} gives NaN for raw value {raw[np.isnan(values)][0]:g}"
        )
    return values
