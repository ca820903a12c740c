"""The onnx_cnn plugin: discovery from the models directory, errors naming files, threads, batching."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from imagesearch.plugins import SettingsError, onnx_cnn
from imagesearch.plugins.manager import PluginRegistry
from imagesearch.plugins.onnx_cnn import ModelError, OnnxCnnExtractor, discover
from imagesearch.plugins.types import Extractor
from imagesearch.server import config
from imagesearch.server.config import MODELS_ENV
from tests.cnn_fixtures import DEFAULT_MODEL, default_extractor, default_models_dir, photos  # noqa: F401


@pytest.fixture
def models_dir(tmp_path, default_models_dir, monkeypatch):  # noqa: F811
    """A private models dir holding a copy of the default model, selected through the env var."""
    directory = tmp_path / "models"
    directory.mkdir()
    for suffix in (".onnx", ".json"):
        shutil.copy(default_models_dir / f"{DEFAULT_MODEL}{suffix}", directory / f"{DEFAULT_MODEL}{suffix}")
    monkeypatch.setenv(MODELS_ENV, str(directory))
    return directory


def _registry(**plugin_config) -> PluginRegistry:
    """The registry a server configured from the environment builds (models dir from IMAGESEARCH_MODELS)."""
    return PluginRegistry(
        load_entry_points=False,
        models_dir=config.default_models_dir(),
        plugin_config={"onnx_cnn": plugin_config},
    )


def _add_renamed_copy(directory: Path, new_name: str) -> Path:
    """Another model: the default one under a new name (sidecar edited accordingly)."""
    shutil.copy(directory / f"{DEFAULT_MODEL}.onnx", directory / f"{new_name}.onnx")
    sidecar = json.loads((directory / f"{DEFAULT_MODEL}.json").read_text())
    sidecar["name"] = new_name
    sidecar["onnx"]["file"] = f"{new_name}.onnx"
    (directory / f"{new_name}.json").write_text(json.dumps(sidecar))
    return directory / f"{new_name}.onnx"


def test_registers_one_extractor_per_model(models_dir):
    _add_renamed_copy(models_dir, "lite-copy")
    registry = _registry()
    # this models directory holds the ONNX files only: the one problem is the SIFT vocabulary's
    assert [p for p in registry.problems if "no SIFT vocabulary" not in p] == []
    extractor = registry.extractors[DEFAULT_MODEL].item
    assert isinstance(extractor, Extractor)
    assert registry.extractors[DEFAULT_MODEL].plugin == "onnx_cnn"
    assert registry.extractors["lite-copy"].item.dim == 1280
    sidecar = json.loads((models_dir / f"{DEFAULT_MODEL}.json").read_text())
    assert extractor.version == f"{sidecar['version']}+{sidecar['onnx']['sha256'][:12]}"
    assert extractor.dim == 1280
    assert extractor.default_metric == "cosine"
    assert "EfficientNet-Lite0" in extractor.description


def test_registration_reads_sidecars_only(models_dir):
    before = set(onnx_cnn._sessions)
    extractor = _registry().extractors[DEFAULT_MODEL].item
    assert set(onnx_cnn._sessions) == before  # no session until first use
    extractor.warm_up()
    assert any(key[0] == str((models_dir / f"{DEFAULT_MODEL}.onnx").resolve()) for key in onnx_cnn._sessions)


def test_the_plugin_config_table_sets_threads_and_batch(models_dir):
    extractor = _registry(threads=1, max_batch=4).extractors[DEFAULT_MODEL].item
    assert (extractor.threads, extractor.max_batch) == (1, 4)
    with pytest.raises(
        SettingsError, match=r"\[plugins.onnx_cnn\] threads must be an integer from 1 to 1024, got 'two'"
    ):
        _registry(threads="two")  # the operator's mistake: start-up stops (tests/test_config_validation.py)


def test_no_models_dir_from_the_host_registers_nothing():
    registry = PluginRegistry(load_entry_points=False)
    assert not any(r.plugin == "onnx_cnn" for r in registry.extractors.values())
    assert registry.problems == []


def test_missing_models_dir_registers_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv(MODELS_ENV, str(tmp_path / "absent"))
    registry = _registry()
    assert not any(r.plugin == "onnx_cnn" for r in registry.extractors.values())
    assert registry.problems == []


def _problem_mentions(registry: PluginRegistry, *needles: str) -> None:
    problems = " | ".join(p for p in registry.problems if "onnx_cnn" in p)
    for needle in needles:
        assert needle in problems, problems


def test_bad_models_are_reported_by_file_name(models_dir):
    (models_dir / "nosidecar.onnx").write_bytes(b"\x08\x07")
    (models_dir / "badjson.onnx").write_bytes(b"\x08\x07")
    (models_dir / "badjson.json").write_text("{ not json")
    truncated = _add_renamed_copy(models_dir, "truncated")
    truncated.write_bytes(truncated.read_bytes()[:1000])
    _add_renamed_copy(models_dir, "orphan").unlink()

    good, problems = discover(models_dir)
    registry = _registry()

    assert [extractor.name for extractor in good] == [DEFAULT_MODEL]  # discovery keeps the good model
    assert len(problems) == 4
    assert DEFAULT_MODEL in registry.extractors, "bad files must not take the good model down"
    _problem_mentions(  # each bad file is reported by name, under the plugin's name
        registry,
        "nosidecar.onnx: no sidecar",
        "badjson.json: cannot read sidecar",
        "truncated.onnx: 1000 bytes",
        "orphan.json: sidecar without its model file",
    )


def test_two_models_with_one_name_is_an_error_naming_both(models_dir):
    _add_renamed_copy(models_dir, "other")
    sidecar_path = models_dir / "other.json"
    sidecar = json.loads(sidecar_path.read_text())
    sidecar["name"] = DEFAULT_MODEL
    sidecar_path.write_text(json.dumps(sidecar))
    registry = _registry()
    _problem_mentions(registry, "other.onnx", f"{DEFAULT_MODEL}.onnx")


def test_replaced_model_file_is_caught_on_first_use(models_dir, photos):  # noqa: F811
    model = models_dir / f"{DEFAULT_MODEL}.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes
    model.write_bytes(bytes(data))
    extractor = _registry().extractors[DEFAULT_MODEL].item
    with pytest.raises(ModelError, match=r"efficientnet-lite0\.onnx: sha256 .* does not match"):
        extractor.extract([photos["coffee"]])


def test_corrupt_model_with_matching_sidecar_names_the_file(tmp_path, photos):  # noqa: F811
    from imagesearch.plugins.cnn.recipes import TF_EFFICIENTNET_LITE
    from imagesearch.plugins.cnn.sidecar import Sidecar, sha256_file, write_sidecar

    model = tmp_path / "broken.onnx"
    model.write_bytes(b"this is not protobuf" * 50)
    write_sidecar(
        tmp_path / "broken.json",
        Sidecar(
            "broken",
            "1",
            "",
            8,
            TF_EFFICIENTNET_LITE,
            "broken.onnx",
            sha256_file(model),
            model.stat().st_size,
        ),
    )
    (extractor,), problems = discover(tmp_path)
    assert problems == []
    with pytest.raises(ModelError, match=r"broken\.onnx: onnxruntime cannot load the model"):
        extractor.extract([photos["coffee"]])


def test_extract_and_classify_shapes(default_extractor, photos):  # noqa: F811
    images = list(photos.values())
    embeddings = default_extractor.extract(images)
    assert embeddings.shape == (len(images), 1280) and embeddings.dtype == np.float32
    assert default_extractor.extract([]).shape == (0, 1280)
    logits = default_extractor.classify(images[:2])
    assert logits.shape == (2, 1000) and logits.dtype == np.float32


def _varied_images(photos: dict[str, np.ndarray], count: int) -> list[np.ndarray]:  # noqa: F811
    base = list(photos.values())
    return [np.ascontiguousarray(np.roll(base[i % len(base)], 7 * i, axis=1)) for i in range(count)]


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_batches_equal_one_by_one(default_extractor, photos, threads):  # noqa: F811
    images = _varied_images(photos, 8)
    one_by_one = np.concatenate([default_extractor.extract([image]) for image in images])
    for max_batch in (1, 3, 8):
        batched = OnnxCnnExtractor(
            default_extractor.sidecar, default_extractor.onnx_path, max_batch=max_batch, threads=threads
        ).extract(images)
        assert np.abs(batched - one_by_one).max() <= 1e-5


def test_a_batch_runs_image_by_image_on_a_single_threaded_session_one_worker_per_core(
    default_extractor,  # noqa: F811
    photos,  # noqa: F811
    monkeypatch,
):
    """Whole images split over the cores better than one image's convolutions (docs/models.md)."""
    images = _varied_images(photos, 5)
    one_by_one = np.concatenate([default_extractor.extract([image]) for image in images])
    calls: list[tuple[int, int, str]] = []
    real_get_session = onnx_cnn.get_session

    class Recording:
        def __init__(self, session, threads: int) -> None:
            self.session, self.threads = session, threads

        def run(self, outputs, feeds):
            (batch,) = feeds.values()
            calls.append((self.threads, len(batch), threading.current_thread().name))
            if self.threads == 1 and len(calls) <= 2:
                both_running.wait(timeout=10)  # the first two runs are in flight at once
            return self.session.run(outputs, feeds)

    def recording_session(path, sidecar, threads):
        return Recording(real_get_session(path, sidecar, threads), threads)

    both_running = threading.Barrier(2)
    monkeypatch.setattr(onnx_cnn, "get_session", recording_session)
    extractor = OnnxCnnExtractor(default_extractor.sidecar, default_extractor.onnx_path, threads=2)
    batched = extractor.extract(images)
    assert sorted((threads, size) for threads, size, _ in calls) == [(1, 1)] * 5
    assert len({name for _, _, name in calls[:2]}) == 2  # two workers took the runs
    assert not both_running.broken
    assert np.abs(batched - one_by_one).max() <= 1e-5
    calls.clear()
    extractor.extract(images[:1])  # a lone image keeps every intra-op thread
    assert [(threads, size) for threads, size, _ in calls] == [(2, 1)]
    calls.clear()
    paired = OnnxCnnExtractor(default_extractor.sidecar, default_extractor.onnx_path, threads=2, max_batch=2)
    assert np.abs(paired.extract(images) - one_by_one).max() <= 1e-5
    assert sorted(size for _, size, _ in calls) == [1, 2, 2]


def test_concurrent_extraction_equals_serial(default_extractor, photos):  # noqa: F811
    images = _varied_images(photos, 8)
    serial = [default_extractor.extract(images[i : i + 2]) for i in range(0, 8, 2)]
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def work(slot: int) -> None:
        try:
            barrier.wait()
            for _ in range(3):
                results[slot] = default_extractor.extract(images[2 * slot : 2 * slot + 2])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(slot,)) for slot in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    for slot in range(4):
        assert np.abs(results[slot] - serial[slot]).max() <= 1e-5


def test_one_session_per_model_file(default_extractor):  # noqa: F811
    twin = OnnxCnnExtractor(
        default_extractor.sidecar, default_extractor.onnx_path, threads=default_extractor.threads
    )
    assert onnx_cnn.get_session(twin.onnx_path, twin.sidecar, twin.threads) is onnx_cnn.get_session(
        default_extractor.onnx_path, default_extractor.sidecar, default_extractor.threads
    )


def test_thread_and_batch_settings_from_env(default_extractor, monkeypatch):  # noqa: F811
    monkeypatch.setenv(onnx_cnn.THREADS_ENV, "1")
    monkeypatch.setenv(onnx_cnn.MAX_BATCH_ENV, "4")
    extractor = OnnxCnnExtractor(default_extractor.sidecar, default_extractor.onnx_path)
    assert (extractor.threads, extractor.max_batch) == (1, 4)
    monkeypatch.setenv(onnx_cnn.THREADS_ENV, "many")
    with pytest.raises(SettingsError, match="IMAGESEARCH_ORT_THREADS"):
        OnnxCnnExtractor(default_extractor.sidecar, default_extractor.onnx_path)
