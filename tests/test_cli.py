"""The `imagesearch` command's small paths: plugins listing and start-up errors."""

from __future__ import annotations

import os
import subprocess
import sys

from imagesearch.plugins.manager import ALLOW_ENV, BLOCK_ENV
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


def test_documented_config_example_loads_and_lists_every_limit(tmp_path):
    """docs/operations.md's TOML example is valid and shows every limit with its real default."""
    import dataclasses
    import re
    import tomllib
    from pathlib import Path

    from imagesearch.server.config import Limits, load_config

    doc = (Path(__file__).resolve().parents[1] / "docs" / "operations.md").read_text()
    (example,) = re.findall(r"```toml\n(.*?)```", doc, flags=re.S)
    path = tmp_path / "server.toml"
    path.write_text(example)
    load_config(path)
    documented = tomllib.loads(example)["limits"]
    defaults = dataclasses.asdict(Limits())
    assert documented == defaults


def test_plugins_prints_each_problem_once(tmp_path):
    """A real process, whose logging is Python's default, as an operator runs it: each problem was
    printed on stdout and logged again on stderr (an outside test)."""
    config = tmp_path / "server.toml"
    config.write_text("[plugins.nope]\nsize = 1\n")
    env = {**os.environ, ALLOW_ENV: "", BLOCK_ENV: "onnx_cnn"}
    command = [sys.executable, "-m", "imagesearch.server.cli", "plugins", "--config", str(config)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1
    assert done.stdout.count("[plugins.nope] configures no loaded plugin") == 1
    assert "[plugins.nope]" not in done.stderr
