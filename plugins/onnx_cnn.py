"""Built-in plugin: one CNN feature extractor per ONNX model in the models directory.

Every ``<name>.onnx`` beside a ``<name>.json`` sidecar (written by
``imagesearch model export``) becomes an extractor named by the sidecar. The
plugin has no per-model code: preprocessing, output names and dim all come from
the sidecar, so a new recipe is served without changes here.

Registration reads the sidecars only; the onnxruntime session is created on
first use and shared by all threads (``InferenceSession.run`` is thread-safe
and releases the GIL).

Threads and runs: ``IMAGESEARCH_ORT_THREADS`` cores (default = the CPUs this
process may use), spinning off, and ``IMAGESEARCH_ORT_MAX_BATCH`` images per
onnxruntime run (default 1). A lone run (a search's image) gets a session with
that many intra-op threads: two made a single image 1.3-1.7x faster than one
(bench/cnn_quality.py, docs/models.md). Several runs (a batch of images) go to
one single-threaded session, one worker per core, each worker taking the next
run as it finishes one. EfficientNet's small depthwise convolutions split badly
over cores and large runs lose the caches, while whole images split perfectly:
on the 2-core VM a batch of 32 ran 1.5x faster this way than as one run on two
intra-op threads, with the same vectors (docs/models.md). Concurrent ``run``
calls on one session share its pool (each caller thread joins in), so many gRPC
workers do not multiply the thread count.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from imagesearch.plugins import (
    Extractor,
    PluginContext,
    RegistrationProblems,
    Setting,
    SettingsError,
    hookimpl,
)
from imagesearch.plugins.cnn.preprocess import preprocess
from imagesearch.plugins.cnn.sidecar import FORMAT, Sidecar, SidecarError, read_sidecar, sha256_file
from imagesearch.server.config import available_cpus
from imagesearch.server.parallel import map_pulling

log = logging.getLogger(__name__)

THREADS_ENV = "IMAGESEARCH_ORT_THREADS"
MAX_BATCH_ENV = "IMAGESEARCH_ORT_MAX_BATCH"
DEFAULT_MAX_BATCH = 1  # images per run: larger runs were slower on this CPU (docs/models.md)
# [plugins.onnx_cnn]: any other key, or a value outside these, stops start-up.
# At most this many threads or images a run: onnxruntime refused 99,999,999,999 threads with a
# TypeError, which left the server without its CNN (an outside test).
MOST = 1024
SETTINGS = {"threads": Setting(int, low=1, high=MOST), "max_batch": Setting(int, low=1, high=MOST)}
ENV_SETTINGS = {THREADS_ENV: SETTINGS["threads"], MAX_BATCH_ENV: SETTINGS["max_batch"]}


class ModelError(RuntimeError):
    """A model in the models directory is unusable; the message names the file."""


def _env_setting(key: str, default: int) -> int:
    """The variable's value, or ``default`` when unset; SettingsError (start-up stops, as for the
    same setting in [plugins.onnx_cnn], by the same rule) unless it is plain ASCII digits within
    the rule: reported as a plugin problem, a typo here served without the default CNN while
    health said SERVING, and int() took " 2" and Arabic-Indic digits (outside tests)."""
    raw = os.environ.get(key, "")
    if not raw:
        return default
    rule = ENV_SETTINGS[key]
    if not re.fullmatch(r"[0-9]{1,10}", raw) or not rule.accepts(int(raw)):
        raise SettingsError(f"environment variable {key}={raw!r} must be {rule.expected()}")
    return int(raw)


# -------------------------------------------------------------------------- sessions

_sessions: dict[tuple[str, str, int], Any] = {}
_sessions_lock = threading.Lock()


def _create_session(path: Path, sidecar: Sidecar, threads: int) -> Any:
    import onnxruntime as ort

    actual = sha256_file(path)
    if actual != sidecar.sha256:
        raise ModelError(
            f"{path}: sha256 {actual[:12]} does not match its sidecar ({sidecar.short_sha}); "
            "the model was replaced without re-exporting - run `imagesearch model export` again"
        )
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for corrupt files
        raise ModelError(f"{path}: onnxruntime cannot load the model: {type(exc).__name__}: {exc}") from exc
    inputs = [i.name for i in session.get_inputs()]
    outputs = {o.name: o.shape for o in session.get_outputs()}
    if sidecar.input_name not in inputs:
        raise ModelError(f"{path}: has inputs {inputs}, its sidecar says {sidecar.input_name!r}")
    wanted = [sidecar.embedding_output] + ([sidecar.logits_output] if sidecar.logits_output else [])
    missing = [name for name in wanted if name not in outputs]
    if missing:
        raise ModelError(f"{path}: lacks outputs {missing} named by its sidecar (has {sorted(outputs)})")
    width = outputs[sidecar.embedding_output][-1]
    if isinstance(width, int) and width != sidecar.dim:
        raise ModelError(f"{path}: embedding is {width}-d, its sidecar says {sidecar.dim}")
    return session


def get_session(path: Path, sidecar: Sidecar, threads: int) -> Any:
    """The process-wide session for this model file (one per path, sha256 and thread count)."""
    key = (str(path.resolve()), sidecar.sha256, threads)
    with _sessions_lock:
        session = _sessions.get(key)
        if session is None:
            session = _sessions[key] = _create_session(path, sidecar, threads)
        return session


_helper_pools: dict[int, ThreadPoolExecutor] = {}


def helper_pool(workers: int) -> ThreadPoolExecutor:
    """Process-wide threads that work beside a batch's caller (one pool per size)."""
    with _sessions_lock:
        pool = _helper_pools.get(workers)
        if pool is None:
            pool = _helper_pools[workers] = ThreadPoolExecutor(workers, thread_name_prefix="onnx-worker")
        return pool


# -------------------------------------------------------------------------- extractor


class OnnxCnnExtractor(Extractor):
    """A CNN served by onnxruntime, described entirely by its sidecar."""

    default_metric = "cosine"

    def __init__(
        self, sidecar: Sidecar, onnx_path: Path, *, max_batch: int | None = None, threads: int | None = None
    ) -> None:
        self.sidecar = sidecar
        self.onnx_path = onnx_path
        self.name = sidecar.name
        # A re-exported or replaced model changes the version, so collections notice.
        self.version = f"{sidecar.version}+{sidecar.short_sha}"
        self.dim = sidecar.dim
        self.description = f"{sidecar.description} [onnxruntime, {onnx_path.name}]"
        self.max_batch = max_batch or _env_setting(MAX_BATCH_ENV, DEFAULT_MAX_BATCH)
        self.threads = threads or _env_setting(THREADS_ENV, available_cpus())
        self.has_logits = sidecar.logits_output is not None

    @property
    def min_input_side(self) -> int:
        """The short side a JPEG may be shrunk to while decoding (the server's ``decode_image``) at little cost.

        Twice the resize target: shrinking all the way to it changed embeddings by up
        to 1 - cos = 0.03 on large JPEGs, keeping 2x left at most 0.004 (docs/models.md).
        """
        return 2 * self.sidecar.preprocessing.resize_short_side

    def warm_up(self) -> None:
        """Create the sessions now (checks the file's sha256) instead of on the first request."""
        get_session(self.onnx_path, self.sidecar, self.threads)
        get_session(self.onnx_path, self.sidecar, 1)

    def _run(self, images: Sequence[np.ndarray], output: str, width: int) -> np.ndarray:
        """A lone run on every core; several runs on a single-threaded session, one worker per
        core (module docstring)."""
        runs = [images[start : start + self.max_batch] for start in range(0, len(images), self.max_batch)]
        if not runs:
            return np.zeros((0, width), dtype=np.float32)
        if len(runs) == 1:
            session = get_session(self.onnx_path, self.sidecar, self.threads)
            return self._run_once(session, runs[0], output, width)
        session = get_session(self.onnx_path, self.sidecar, 1)
        pool = helper_pool(max(1, self.threads - 1))  # threads == 1: the caller alone pulls
        done = map_pulling(lambda run: self._run_once(session, run, output, width), runs, self.threads, pool)
        return np.concatenate(done)

    def _run_once(self, session: Any, images: Sequence[np.ndarray], output: str, width: int) -> np.ndarray:
        batch = preprocess(images, self.sidecar.preprocessing)
        (result,) = session.run([output], {self.sidecar.input_name: batch})
        return np.asarray(result, dtype=np.float32).reshape(len(batch), width)

    def extract(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """BGR uint8 images -> float32 (n, dim) pooled features (not normalised; the metric decides)."""
        return self._run(images, self.sidecar.embedding_output, self.dim)

    def classify(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """BGR uint8 images -> float32 (n, num_classes) classifier logits."""
        if not self.has_logits or not self.sidecar.num_classes:
            raise NotImplementedError(f"model {self.name!r} has no logits output")
        return self._run(images, str(self.sidecar.logits_output), int(self.sidecar.num_classes))

    def __repr__(self) -> str:
        return f"OnnxCnnExtractor({self.name!r}, version={self.version!r}, dim={self.dim}, file={self.onnx_path})"


# -------------------------------------------------------------------------- discovery


def _check_files(onnx_path: Path, sidecar_path: Path) -> Sidecar:
    if not sidecar_path.is_file():
        raise ModelError(
            f"{onnx_path}: no sidecar {sidecar_path.name} (export models with `imagesearch model export`)"
        )
    try:
        sidecar = read_sidecar(sidecar_path)
    except SidecarError as exc:
        raise ModelError(str(exc)) from exc
    if sidecar.onnx_file != onnx_path.name:
        raise ModelError(f"{sidecar_path}: describes {sidecar.onnx_file!r}, not {onnx_path.name!r}")
    size = onnx_path.stat().st_size
    if size != sidecar.size_bytes:
        raise ModelError(
            f"{onnx_path}: {size} bytes, its sidecar says {sidecar.size_bytes} (truncated or replaced model?)"
        )
    return sidecar


def _is_orphan_sidecar(path: Path) -> bool:
    if path.with_suffix(".onnx").exists():
        return False
    try:
        return f'"{FORMAT}"' in path.read_text(encoding="utf-8", errors="replace")[:200]
    except OSError:
        return False


def discover(
    directory: Path, settings: Mapping[str, Any] | None = None
) -> tuple[list[OnnxCnnExtractor], list[str]]:
    """Extractors for the usable models in ``directory``, and one message per unusable model.

    ``settings``: the plugin's config table, checked against SETTINGS (PluginContext.settings);
    ``threads`` and ``max_batch`` override IMAGESEARCH_ORT_THREADS and IMAGESEARCH_ORT_MAX_BATCH.
    """
    directory = Path(directory)
    settings = settings or {}
    extractors: list[OnnxCnnExtractor] = []
    problems: list[str] = []
    if not directory.is_dir():
        log.info("models directory %s does not exist: no CNN extractors", directory)
        return extractors, problems
    seen: dict[str, Path] = {}
    for onnx_path in sorted(directory.glob("*.onnx")):
        try:
            sidecar = _check_files(onnx_path, onnx_path.with_suffix(".json"))
        except (ModelError, OSError) as exc:
            problems.append(str(exc))
            continue
        if sidecar.name in seen:
            problems.append(
                f"{onnx_path}: model name {sidecar.name!r} is already used by {seen[sidecar.name]}"
            )
            continue
        seen[sidecar.name] = onnx_path
        extractors.append(
            OnnxCnnExtractor(
                sidecar, onnx_path, max_batch=settings.get("max_batch"), threads=settings.get("threads")
            )
        )
    problems.extend(
        f"{path}: sidecar without its model file {path.with_suffix('.onnx').name}"
        for path in sorted(directory.glob("*.json"))
        if _is_orphan_sidecar(path)
    )
    return extractors, problems


@hookimpl
def register_extractors(register: Callable[[OnnxCnnExtractor], None], context: PluginContext) -> None:
    """Register every good model, then report each bad model file by name.

    A broken file is an operator's mistake to fix, not something to skip
    quietly, but it must not take the good models (the default one) down with it.
    """
    settings = context.settings(SETTINGS)
    for variable in ENV_SETTINGS:  # checked like the table, models or not
        _env_setting(variable, 1)
    if context.models_dir is None:
        return
    extractors, problems = discover(context.models_dir, settings)
    for extractor in extractors:
        register(extractor)
    if problems:
        raise RegistrationProblems(
            [f"unusable model in {context.models_dir}: {problem}" for problem in problems]
        )
