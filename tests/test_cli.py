"""The `imagesearch` command's small paths: plugins listing and start-up errors."""

from __future__ import annotations

from imagesearch.server.cli import main


def test_plugins_lists_builtins(capsys):
    code = main(["plugins"])
    out = capsys.readouterr().out
    assert "metrics:" in out and "cosine" in out and "l2" in out and "inner_product" in out
    assert code in (0, 1)  # 1 only when a plugin reports a problem, which is then printed
    assert (code == 1) == ("problem:" in out)


def test_bad_config_file_is_a_clear_error(tmp_path, capsys):
    config = tmp_path / "server.toml"
    config.write_text("[limits]\nmax_topk = 3\n")
    assert main(["serve", "--config", str(config), "--data", str(tmp_path / "data")]) == 2
    assert "unknown [limits] keys: max_topk" in capsys.readouterr().err


def test_usage_errors_exit_with_argparse_code(capsys):
    assert main(["serve", "--port", "not-a-number"]) == 2
    assert main([]) == 2
