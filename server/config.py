"""Server configuration: embedded defaults, overridden by a TOML file, then by flags.

Every limit that protects the server lives here with a default that is safe on
a small machine, so `imagesearch serve` with no arguments is a sane production
start and an operator can see every knob in one place (docs/operations.md).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imagesearch.server.settings import Setting, SettingsError, check_table

MIB = 1024 * 1024
DATA_ENV = "IMAGESEARCH_DATA"
MODELS_ENV = "IMAGESEARCH_MODELS"


def default_models_dir() -> Path:
    """Where ONNX models live unless configured: $IMAGESEARCH_MODELS, else var/models."""
    return Path(os.environ.get(MODELS_ENV) or "var/models")  # set but empty: unset, never "."


def available_cpus() -> int:
    """The CPUs this process may use (its affinity mask, e.g. a container's cpuset), not the host's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class Limits:
    """Hard limits: requests beyond them fail with a clear status instead of hurting the server."""

    max_message_bytes: int = 32 * MIB
    max_image_bytes: int = 20 * MIB
    max_image_pixels: int = 40_000_000
    max_batch_size: int = 256
    # Pixels one batch may decode to at once (BGR, 3 bytes each): 200 MP is 600 MB per call.
    max_batch_pixels: int = 200_000_000
    # Pixels all calls together may hold decoded at once (1.2 GB of BGR); calls beyond it wait.
    max_decoding_pixels: int = 400_000_000
    default_top_k: int = 10
    max_top_k: int = 1000
    default_rerank_candidates: int = 50  # geometric re-ranking's short list when a search gives 0
    max_rerank_candidates: int = 500  # each costs a descriptor match and a RANSAC fit (~3-5 ms)
    # In-flight calls of every kind; on the asyncio server a waiting call holds no thread.
    max_concurrent_rpcs: int = 256
    max_streams_per_peer: int = 32  # open AddImagesStream calls from one client address
    stream_idle_timeout_s: float = 60.0  # a stream that sends nothing this long is closed
    max_metadata_entries: int = 64
    max_metadata_bytes: int = 16 * 1024
    max_id_length: int = 256
    max_label_length: int = 256
    # CreateCollection's description, in characters: a ListCollections page carries max_page_size of them.
    max_description_length: int = 1024
    default_page_size: int = 100
    max_page_size: int = 1000
    # Collections the server holds (CreateCollection past it: RESOURCE_EXHAUSTED); fewer when the
    # open-files limit cannot hold that many (server/descriptors.py). Each holds SQLite connections
    # and about half a megabyte however small.
    max_collections: int = 1000
    # Index parameters a client may choose (CreateCollection). Each bound keeps one collection's
    # index memory and build time proportional to its vectors: HNSW m=100000 costs 156 MB per
    # 200 vectors.
    max_nlist: int = 65536
    max_train_size: int = 10_000_000
    max_hnsw_m: int = 64
    max_ef: int = 4096  # ef_construction and ef_search


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    data_dir: Path = field(default_factory=lambda: Path(os.environ.get(DATA_ENV) or "var/imagesearch"))
    models_dir: Path = field(default_factory=default_models_dir)
    workers: int = 16  # threads for engine work; decoding memory is bounded by max_decoding_pixels
    # Micro-batching: concurrent searches share one index call, concurrent images one extractor
    # run. A batch starts at once when the server is idle or has one caller; right after a batch,
    # the next waits at most this long for that batch's callers to rejoin (server/batching.py says
    # why; 0 turns it off). Extraction waits less: its batches run ~100 ms and idle cores cost more.
    batch_max_wait_ms: float = 10.0
    extract_max_wait_ms: float = 2.0
    search_max_batch: int = 256
    extract_max_batch: int = 64
    default_extractor: str = "efficientnet-lite0"
    create_default_collection: bool = True
    thumbnail_size: int = 256
    thumbnail_quality: int = 85
    # Snapshot the FAISS index after this many writes or this many seconds with writes pending.
    snapshot_every_ops: int = 5000
    snapshot_interval_s: float = 60.0
    # On SIGTERM: health reports NOT_SERVING for this long while still answering (so load
    # balancers move traffic away), then in-flight calls get shutdown_grace_s to finish.
    shutdown_announce_s: float = 1.0
    shutdown_grace_s: float = 10.0
    log_format: str = "json"  # "json" or "text"
    log_level: str = "INFO"
    limits: Limits = field(default_factory=Limits)
    # Each plugin's own settings, [plugins.<plugin name>] in the TOML file (PluginContext.config).
    plugins: dict[str, dict[str, Any]] = field(default_factory=dict)

    def replace(self, **changes: Any) -> ServerConfig:
        """A copy with some fields changed (``limits`` may be a dict of limit fields)."""
        limits = changes.pop("limits", None)
        if isinstance(limits, dict):
            changes["limits"] = dataclasses.replace(self.limits, **limits)
        elif limits is not None:
            changes["limits"] = limits
        return dataclasses.replace(self, **changes)


KIB = 1024
_TABLES = {"limits", "plugins"}  # checked as tables, not as values
_LEVELS = tuple(
    n for level in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL") for n in (level, level.lower())
)
# Every field gets the rule of its type (numbers must be positive); these are the exceptions.
_SERVER_RULES = {
    "host": Setting(str, low=1, note="an interface name or address"),
    "default_extractor": Setting(str, low=1, note="an extractor name"),
    "port": Setting(int, 0, 65535, note="0 picks a free port"),
    "batch_max_wait_ms": Setting(float, low=0, note="0 turns batching waits off"),
    "extract_max_wait_ms": Setting(float, low=0, note="0 turns batching waits off"),
    "thumbnail_quality": Setting(int, 1, 100, note="JPEG quality"),
    # Deadlines are computed from them: 1e300 s overflowed the clock at SIGTERM (an outside test).
    "shutdown_announce_s": Setting(float, 0, 86400, note="at most a day"),
    "shutdown_grace_s": Setting(float, 0, 86400, note="at most a day"),
    "log_format": Setting(str, choices=("json", "text")),
    "log_level": Setting(str, choices=_LEVELS),
}
_LIMIT_RULES = {
    # gRPC takes a signed 32-bit size; below 64 KiB not even a health check or an error status fits.
    "max_message_bytes": Setting(int, 64 * KIB, 2**31 - 1, note="64 KiB up to 2 GiB - 1"),
    "max_metadata_entries": Setting(int, low=0, note="0 allows no metadata"),
    "max_metadata_bytes": Setting(int, low=0, note="0 allows no metadata"),
    "max_label_length": Setting(int, low=0, note="0 allows no labels"),
    "max_hnsw_m": Setting(int, low=2, note="HNSW needs m >= 2"),
    "max_concurrent_rpcs": Setting(int, 1, 2**31 - 1, note="gRPC takes a signed 32-bit count"),
}
# A default a request gets when it asks for 0 must itself be allowed.
_DEFAULT_WITHIN_MAX = (
    ("default_top_k", "max_top_k"),
    ("default_page_size", "max_page_size"),
    ("default_rerank_candidates", "max_rerank_candidates"),
)
_RULE_OF_TYPE = {
    int: Setting(int, low=1),
    float: Setting(float, low=0, above=True),
    bool: Setting(bool),
    str: Setting(str),
    Path: Setting(Path),
}


def _rules(cls: type, explicit: dict[str, Setting]) -> dict[str, Setting]:
    """A rule for every field of the dataclass ``cls``: its explicit one, else its type's."""
    hints = typing.get_type_hints(cls)
    return {
        f.name: explicit.get(f.name) or _RULE_OF_TYPE[hints[f.name]]
        for f in dataclasses.fields(cls)
        if f.name not in _TABLES
    }


SERVER_RULES = _rules(ServerConfig, _SERVER_RULES)
LIMIT_RULES = _rules(Limits, _LIMIT_RULES)


def _read_toml(path: Path) -> dict[str, Any]:
    """The file's settings; ValueError (one line, naming the file) when it is unreadable or not TOML."""
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise ValueError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:  # TOML is UTF-8
        raise ValueError(f"config file {path} is not valid TOML: {exc}") from exc


def check_values(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` as their kinds (a float setting written ``2`` is 2.0, a path a Path); SettingsError
    (a ValueError) naming the first key whose value is unknown, mistyped or out of range: top-level
    keys, the [limits] table and the shape of the [plugins.*] tables (each plugin checks its own keys
    when it registers, PluginContext.settings)."""
    known = {**SERVER_RULES, **{name: Setting(dict) for name in _TABLES}}
    checked = check_table(values, known, "configuration")
    if "limits" in checked:
        checked["limits"] = check_table(checked["limits"], LIMIT_RULES, "[limits]")
    for name, table in values.get("plugins", {}).items():
        if not isinstance(table, dict):
            raise SettingsError(f"[plugins.{name}] must be a table of settings, got {table!r}")
    return checked


def _check_defaults_within_max(limits: Limits) -> None:
    for default, maximum in _DEFAULT_WITHIN_MAX:
        if getattr(limits, default) > getattr(limits, maximum):
            raise SettingsError(
                f"[limits] {default} ({getattr(limits, default)}) must not exceed "
                f"{maximum} ({getattr(limits, maximum)})"
            )


def load_config(path: Path | None = None, **overrides: Any) -> ServerConfig:
    """Defaults, then the TOML file at ``path`` (top-level keys and a [limits] table), then overrides.

    Unknown keys and values of the wrong type or range are an error (ValueError, one line naming
    the key and what it takes), not a silent no-op: a misspelt limit must not leave the server
    unprotected, and a nonsense one must not start a server that misbehaves later.
    """
    values = _read_toml(path) if path is not None else {}
    check_values(values)  # the file as it stands, even where a flag overrides it: it must start alone too
    values.update({key: value for key, value in overrides.items() if value is not None})
    config = ServerConfig().replace(**check_values(values))
    _check_defaults_within_max(config.limits)
    return config
