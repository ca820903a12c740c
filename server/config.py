"""Server configuration: embedded defaults, overridden by a TOML file, then by flags.

Every limit that protects the server lives here with a default that is safe on
a small machine, so `imagesearch serve` with no arguments is a sane production
start and an operator can see every knob in one place (docs/operations.md).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MIB = 1024 * 1024
DATA_ENV = "IMAGESEARCH_DATA"
MODELS_ENV = "IMAGESEARCH_MODELS"


def default_models_dir() -> Path:
    """Where ONNX models live unless configured: $IMAGESEARCH_MODELS, else var/models."""
    return Path(os.environ.get(MODELS_ENV, "var/models"))


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
    default_page_size: int = 100
    max_page_size: int = 1000
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
    data_dir: Path = field(default_factory=lambda: Path(os.environ.get(DATA_ENV, "var/imagesearch")))
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


_PATH_FIELDS = {"data_dir", "models_dir"}


def load_config(path: Path | None = None, **overrides: Any) -> ServerConfig:
    """Defaults, then the TOML file at ``path`` (top-level keys and a [limits] table), then overrides.

    Unknown keys are an error, not a silent no-op: a misspelt limit must not
    leave the server unprotected.
    """
    config = ServerConfig()
    values: dict[str, Any] = {}
    if path is not None:
        with open(path, "rb") as handle:
            values = tomllib.load(handle)
    values.update({key: value for key, value in overrides.items() if value is not None})
    known = {f.name for f in dataclasses.fields(ServerConfig)}
    known_limits = {f.name for f in dataclasses.fields(Limits)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown configuration keys: {', '.join(unknown)}")
    limits = values.get("limits", {})
    if isinstance(limits, dict):
        bad = sorted(set(limits) - known_limits)
        if bad:
            raise ValueError(f"unknown [limits] keys: {', '.join(bad)}")
    for key in _PATH_FIELDS & set(values):
        values[key] = Path(values[key])
    return config.replace(**values)
