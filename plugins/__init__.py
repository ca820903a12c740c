"""Everything a plugin author needs, in one import.

    from imagesearch.plugins import Extractor, Metric, PluginContext, hookimpl

Extractors subclass ``Extractor``; metrics are ``Metric`` values; hooks are
functions (or methods) marked ``@hookimpl`` that call ``register`` once per
object. The hook specifications are in ``imagesearch.plugins.hookspecs`` and
docs/plugins.md. Only NumPy and pluggy are imported here.
"""

from imagesearch.plugins.hookspecs import hookimpl
from imagesearch.plugins.types import (
    ALL_INDEX_TYPES,
    FLAT,
    HNSW,
    IVF,
    Extractor,
    FitAbandoned,
    LocalFeatures,
    Metric,
    NotEnoughTrainingData,
    PluginContext,
    RegistrationProblems,
    TrainableExtractor,
    inverse_distance_score,
    l2_normalize,
)
from imagesearch.server.settings import Setting, SettingsError

__all__ = [
    "ALL_INDEX_TYPES",
    "FLAT",
    "HNSW",
    "IVF",
    "Extractor",
    "FitAbandoned",
    "LocalFeatures",
    "Metric",
    "NotEnoughTrainingData",
    "PluginContext",
    "RegistrationProblems",
    "Setting",
    "SettingsError",
    "TrainableExtractor",
    "hookimpl",
    "inverse_distance_score",
    "l2_normalize",
]
