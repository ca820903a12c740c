"""Loads plugins and collects what they register: a typed facade over pluggy.

Built-in plugins are the modules in DEFAULT_PLUGINS; third-party plugins come
from the entry-point group ``imagesearch``. Each plugin's hooks are called one
plugin at a time so that a broken plugin is reported by name and skipped,
while a duplicate extractor or metric name stops start-up: silently letting
one plugin shadow another would change search results without a trace.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import pluggy

from imagesearch.plugins import hookspecs
from imagesearch.plugins.registration_checks import check_extractor, check_local_features, check_metric
from imagesearch.plugins.types import PluginContext, RegistrationProblems, TrainableExtractor
from imagesearch.server.settings import SettingsError

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "imagesearch"
# Comma-separated plugin names. When set, only these third-party plugins load.
ALLOW_ENV = "IMAGESEARCH_PLUGINS"
# Comma-separated plugin names (built-in or third-party) that never load.
BLOCK_ENV = "IMAGESEARCH_DISABLE_PLUGINS"

DEFAULT_PLUGINS: dict[str, str] = {
    "metrics": "imagesearch.plugins.metrics",
    "onnx_cnn": "imagesearch.plugins.onnx_cnn",
    "sift": "imagesearch.plugins.sift_plugin",
}


class PluginConflictError(RuntimeError):
    """Two plugins registered the same extractor or metric name."""


@dataclass(frozen=True)
class Registered:
    """Something a plugin registered, remembered with the plugin's name."""

    item: Any
    plugin: str


def _names_from_env(env: Mapping[str, str], key: str) -> set[str] | None:
    raw = env.get(key)
    if raw is None:
        return None
    return {part.strip() for part in raw.split(",") if part.strip()}


class _Watched(Mapping[str, Any]):
    """A plugin's ``[plugins.<name>]`` table that notes, in ``read``, that the plugin looked at it
    (through ``context.settings()`` or ``context.config``)."""

    def __init__(self, table: Mapping[str, Any], plugin: str, read: set[str]) -> None:
        self._table, self._plugin, self._read = dict(table), plugin, read

    def __getitem__(self, key: str) -> Any:
        self._read.add(self._plugin)
        return self._table[key]

    def __iter__(self) -> Iterator[str]:
        self._read.add(self._plugin)
        return iter(self._table)

    def __len__(self) -> int:
        self._read.add(self._plugin)
        return len(self._table)


class PluginRegistry:
    """The extractors and metrics available to this process.

    ``problems`` lists plugins that failed (and were skipped) with the reason;
    ``skipped`` lists plugins that were deliberately not loaded (blocked or
    not allow-listed), so an operator can see why a plugin is missing.
    """

    def __init__(
        self,
        extra_plugins: Iterable[tuple[str, object]] = (),
        *,
        load_entry_points: bool = True,
        env: Mapping[str, str] | None = None,
        models_dir: Path | None = None,
        plugin_config: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        env = os.environ if env is None else env
        self._models_dir = models_dir
        self._plugin_config = plugin_config or {}
        self._allow = _names_from_env(env, ALLOW_ENV)
        self._block = _names_from_env(env, BLOCK_ENV) or set()
        self.problems: list[str] = []
        self.skipped: list[str] = []
        self.extractors: dict[str, Registered] = {}
        self.metrics: dict[str, Registered] = {}
        self.local_features: dict[str, Registered] = {}
        self.loaded: dict[str, object] = {}  # plugin name -> the plugin (a module or an object)
        self._tables_read: set[str] = set()  # plugins that looked at their [plugins.<name>] table
        self._pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self._pm.add_hookspecs(hookspecs)
        for name, module_path in DEFAULT_PLUGINS.items():
            if self._not_blocked(name):
                self._load(name, lambda path=module_path: importlib.import_module(path))
        extra_plugins = list(extra_plugins)
        self._local_names = set(DEFAULT_PLUGINS) | {name for name, _ in extra_plugins}
        for name, plugin in extra_plugins:
            if self._not_blocked(name):
                self._load(name, lambda plugin=plugin: plugin)
        if load_entry_points:
            self._load_entry_points()
        self._check_plugin_tables()
        self._collect("register_extractors", self.extractors, check_extractor, "extractor")
        self._collect("register_metrics", self.metrics, check_metric, "metric")
        self._collect("register_local_features", self.local_features, check_local_features, "local features")
        self._check_unread_tables()
        self._check_default_metrics()
        self._check_trainable_inputs()

    def missing_models_dir(self) -> Path | None:
        """The models directory the plugins were told of, if it does not exist (no CNN extractors, no
        SIFT vocabulary: every model-backed extractor is unknown, which alone explained nothing)."""
        directory = self._models_dir
        return directory if directory is not None and not directory.is_dir() else None

    def problems_naming(self, name: str) -> list[str]:
        """The problems that name ``name`` as a whole word (``sift-vlad``, not ``sift`` inside it):
        why an extractor someone asks for is not there."""
        naming = re.compile(rf"(?<![\w-]){re.escape(name)}(?![\w-])")
        return [problem for problem in self.problems if naming.search(problem)] if name else []

    # -- loading -------------------------------------------------------------
    def _problem(self, message: str) -> None:
        log.warning("plugin problem: %s", message)
        self.problems.append(message)

    def _not_blocked(self, name: str) -> bool:
        if name in self._block:
            self.skipped.append(f"plugin {name!r} is blocked by {BLOCK_ENV}")
            return False
        return True

    def _load(self, name: str, load: Callable[[], object]) -> None:
        try:
            plugin = load()
            self._pm.register(plugin, name=name)
            self.loaded[name] = plugin
        except Exception as exc:  # a plugin's import can fail in any way
            self._problem(f"plugin {name!r} failed to load: {type(exc).__name__}: {exc}")
            return
        try:
            self._pm.check_pending()
        except pluggy.PluginValidationError as exc:
            self._pm.unregister(name=name)
            del self.loaded[name]
            self._problem(f"plugin {name!r} implements an unknown hook: {exc}")
            return
        if not any(caller.get_hookimpls() for caller in self._pm.get_hookcallers(plugin) or ()):
            self._problem(f"plugin {name!r} implements no imagesearch hook (functions lack @hookimpl?)")

    def _load_entry_points(self) -> None:
        found: set[str] = set()
        for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
            name = entry_point.name
            found.add(name)
            if not self._not_blocked(name):
                continue
            if self._allow is not None and name not in self._allow:
                self.skipped.append(f"plugin {name!r} is not in {ALLOW_ENV}")
                continue
            if self._pm.get_plugin(name) is not None:
                self._problem(f"plugin {name!r} ({entry_point.value}) clashes with a loaded plugin's name")
                continue
            self._load(name, entry_point.load)
        # A misspelt allow-list entry would otherwise disable a plugin without a word.
        for name in sorted((self._allow or set()) - found - self._block - self._local_names):
            self._problem(f"plugin {name!r} is named in {ALLOW_ENV} but no such plugin is installed")

    def _check_plugin_tables(self) -> None:
        """A ``[plugins.<name>]`` table for no loaded plugin is a problem, said at start-up: a
        misspelt name (``[plugins.sfit]``) would otherwise leave the real plugin on its defaults
        without a word. A blocked or not allow-listed plugin's table is expected, and left alone."""
        for name in sorted(set(self._plugin_config) - set(self.loaded)):
            if not any(f"plugin {name!r}" in skipped for skipped in self.skipped):
                loaded = ", ".join(sorted(self.loaded)) or "none"
                self._problem(
                    f"[plugins.{name}] configures no loaded plugin (loaded: {loaded}); is it misspelt?"
                )

    def _check_unread_tables(self) -> None:
        """SettingsError for a loaded plugin's ``[plugins.<name>]`` keys that its hooks never read:
        every one of them is unknown to it, as an unknown key of a plugin that reads its table is,
        and it stops start-up the same way (``[plugins.colorhist] bins = 4`` was accepted without a
        word: an outside test). A plugin whose hooks failed may not have reached its table: its
        problem says why."""
        for name in sorted(set(self._plugin_config) & set(self.loaded) - self._tables_read):
            keys = sorted(self._plugin_config[name])
            if keys and not any(f"plugin {name!r}" in problem for problem in self.problems):
                raise SettingsError(
                    f"unknown [plugins.{name}] keys: {', '.join(keys)} (plugin {name!r} takes no settings)"
                )

    def _collect(
        self,
        hook_name: str,
        into: dict[str, Registered],
        check: Callable[[object], None],
        kind: str,
    ) -> None:
        """Call one hook plugin by plugin; a plugin whose hook fails contributes nothing to it."""
        caller = getattr(self._pm.hook, hook_name)
        for impl in caller.get_hookimpls():
            staged: list[object] = []

            def register(obj: object, staged: list[object] = staged) -> None:
                check(obj)
                staged.append(obj)

            table = _Watched(
                self._plugin_config.get(impl.plugin_name, {}), impl.plugin_name, self._tables_read
            )
            context = PluginContext(self._models_dir, table, impl.plugin_name)
            try:
                # Pass only the arguments the implementation declares, as pluggy itself would.
                arguments = {"register": register, "context": context}
                impl.function(*(arguments[arg] for arg in impl.argnames))
            except SettingsError:  # the operator's config is wrong: refuse to start, naming the key
                raise
            except RegistrationProblems as report:
                for problem in report.problems:
                    self._problem(f"plugin {impl.plugin_name!r} in {hook_name}: {problem}")
            except Exception as exc:
                self._problem(
                    f"plugin {impl.plugin_name!r} failed in {hook_name}: {type(exc).__name__}: {exc}"
                )
                continue
            # Checked here, outside the plugin's code, so a plugin cannot swallow the error.
            for obj in staged:
                name = obj.name  # type: ignore[attr-defined]
                if name in into:
                    raise PluginConflictError(
                        f"{kind} {name!r} is registered by both plugin {into[name].plugin!r} and plugin "
                        f"{impl.plugin_name!r}; block one with {BLOCK_ENV}"
                    )
                into[name] = Registered(obj, impl.plugin_name)

    def _check_default_metrics(self) -> None:
        for name, registered in self.extractors.items():
            metric = registered.item.default_metric
            if metric not in self.metrics:
                self._problem(
                    f"extractor {name!r} (plugin {registered.plugin!r}) defaults to metric {metric!r}, "
                    "which no loaded plugin registers"
                )

    def _check_trainable_inputs(self) -> None:
        """A trainable extractor whose local features are missing cannot serve: drop it, saying why."""
        for name, registered in list(self.extractors.items()):
            wanted = getattr(registered.item, "local_features", "")
            if isinstance(registered.item, TrainableExtractor) and wanted not in self.local_features:
                del self.extractors[name]
                self._problem(
                    f"extractor {name!r} (plugin {registered.plugin!r}) encodes local features "
                    f"{wanted!r}, which no loaded plugin registers; it is not available"
                )
