"""The `imagesearch` command's small paths: plugins listing and start-up errors."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

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


def _raising(error: BaseException):
    def call(*args, **kwargs):
        raise error

    return call


def test_train_interrupted_or_timed_out_says_the_server_goes_on(monkeypatch, capsys):
    """The server finishes a training its caller stopped waiting for; the CLI said only "failed"
    (or printed a traceback on Ctrl-C) and the version changed seconds later (an outside test)."""

    from imagesearch.client import DeadlineExceeded, ImageSearchClient

    train = ["train", "--collection", "c", "--target", "127.0.0.1:9"]
    monkeypatch.setattr(ImageSearchClient, "train_collection", _raising(KeyboardInterrupt()))
    assert main(train) == 130
    err = capsys.readouterr().err
    assert "stopped waiting; the server goes on training collection 'c'" in err and "Traceback" not in err
    monkeypatch.setattr(
        ImageSearchClient, "train_collection", _raising(DeadlineExceeded("Deadline Exceeded"))
    )
    assert main(train) == 2
    err = capsys.readouterr().err
    assert "did not answer in time" in err and "commits it unless it is stopped first" in err
    for bad in ("0", "-1"):
        with pytest.raises(SystemExit):
            from imagesearch.server.cli import build_parser

            build_parser().parse_args([*train, "--timeout", bad])
        assert "must be above 0" in capsys.readouterr().err


def test_ctrl_c_in_any_command_is_one_line_and_exit_130(monkeypatch, capsys):
    """`search` and `eval` died of SIGINT with gRPC's traceback; `add` said one line (an outside test)."""
    from imagesearch.client import ImageSearchClient

    monkeypatch.setattr(ImageSearchClient, "search", _raising(KeyboardInterrupt()))
    assert main(["search", __file__, "--target", "127.0.0.1:9"]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "interrupted"


def test_paths_and_seeds_the_commands_cannot_use_are_one_line_errors(tmp_path, capsys):
    """`dataset FILE` and `model vocabulary --out FILE` ended in tracebacks; `--seed -1` was taken;
    `eval --json /missing/x.json` ran the whole evaluation before failing to write (an outside test)."""
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main(["dataset", str(a_file)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert main(["model", "vocabulary", "--seed", "-1"]) == 2
    assert "must be at least 0" in capsys.readouterr().err
    missing = tmp_path / "missing" / "x.json"
    assert main(["eval", str(tmp_path), "--json", str(missing), "--target", "127.0.0.1:9"]) == 2
    assert f"cannot write {missing}" in capsys.readouterr().err


def test_an_empty_target_and_a_refusal_by_the_client_say_so(tmp_path, capsys):
    """`--target ""` printed gRPC core's log lines and a source-location trace, port 116537 reached
    the server on 50001, a missing port meant 443; a request the client refused itself (over its max_message_bytes) was reported "from" the server it never reached
    (an outside test)."""
    from imagesearch.client._requests import DEFAULT_MAX_MESSAGE_BYTES

    for target in ("", " ", "127.0.0.1 :50051", "127.0.0.1:116537", "127.0.0.1", "::1", "127.0.0.1:0"):
        assert main(["search", __file__, "--target", target]) == 2
        err = capsys.readouterr().err
        assert "argument --target: must be HOST:PORT" in err and "dns_resolver" not in err
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG" + bytes(DEFAULT_MAX_MESSAGE_BYTES))
    assert main(["search", str(big), "--target", "127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert "refused by this client, nothing sent to 127.0.0.1:9" in err and "from 127.0.0.1:9" not in err


def test_sigterm_unwinds_an_evaluation_like_ctrl_c(monkeypatch, capsys):
    """SIGTERM (timeout, CI cancellation, systemd) killed `imagesearch eval` without its cleanup,
    leaving its collections on the server (an outside test); it now unwinds as Ctrl-C does."""
    import signal

    from imagesearch.server import eval_runner
    from imagesearch.server.client_cli import Terminated, sigterm_unwinds

    before = signal.getsignal(signal.SIGTERM)
    cleaned: list[str] = []
    with pytest.raises(Terminated):
        try:
            with sigterm_unwinds():
                os.kill(os.getpid(), signal.SIGTERM)  # handled at the next bytecode boundary
                time.sleep(5)  # not reached
        finally:
            cleaned.append("collections deleted")
    assert cleaned and signal.getsignal(signal.SIGTERM) is before

    def terminated(args):
        raise Terminated

    monkeypatch.setattr(eval_runner, "main_with_args", terminated)
    assert main(["eval", __file__, "--target", "127.0.0.1:9"]) == 143
    assert capsys.readouterr().err.strip().splitlines()[-1] == "terminated"


def test_search_checks_where_its_contact_sheet_goes_first(tmp_path, capsys):
    """It searched, then failed to write into a missing folder (an outside test); nothing listens
    at the target, so reaching it would say so instead."""
    missing = tmp_path / "missing" / "sheet.html"
    assert main(["search", __file__, "--html", str(missing), "--target", "127.0.0.1:9"]) == 2
    assert f"cannot write {missing}" in capsys.readouterr().err


def test_a_second_signal_waits_for_the_cleanup_the_first_started():
    """A second Ctrl-C or SIGTERM a moment after the first interrupted eval's cleanup, leaving its
    collections (an outside test); held off during it, it is delivered after."""
    import signal

    from imagesearch.server.client_cli import signals_held

    cleaned: list[int] = []
    with pytest.raises(KeyboardInterrupt), signals_held():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # a handler would run here: it must not
        cleaned.append(1)
    assert cleaned == [1] and signal.getsignal(signal.SIGINT) is signal.default_int_handler
