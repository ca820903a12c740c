"""The `imagesearch` command: serve, list plugins, manage models, import a folder, search, evaluate."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from imagesearch.server.client_cli import EXIT_INTERRUPTED, EXIT_TERMINATED, Terminated, path_argument
from imagesearch.server.config import load_config
from imagesearch.server.errors import DataDirLocked
from imagesearch.server.folder_cli import add_folder_command
from imagesearch.server.logs import configure_logging
from imagesearch.server.search_cli import add_search_command
from imagesearch.server.train_cli import add_train_command

log = logging.getLogger("imagesearch")


def _serve(args: argparse.Namespace) -> int:
    from imagesearch.server.app import serve_forever
    from imagesearch.server.console import print_ready_banner

    config = load_config(
        args.config,
        host=args.host,
        port=args.port,
        data_dir=args.data,
        models_dir=args.models,
        log_format=args.log_format,
    )
    configure_logging(config.log_format, config.log_level)

    def on_ready(running) -> None:
        print_ready_banner(running)
        if args.demo:
            from imagesearch.server.demo import run_demo

            run_demo(running.target, config.data_dir.parent / "demo")
            print("\nserver is running; press Ctrl-C to stop", flush=True)

    try:
        serve_forever(config, on_ready)
    except DataDirLocked as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _plugins(args: argparse.Namespace) -> int:
    from imagesearch.server.console import print_plugins

    return print_plugins(load_config(args.config, models_dir=args.models))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imagesearch", description="Content-based image retrieval over gRPC."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gRPC server")
    serve.add_argument("--host", help="interface to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 50051; 0 picks a free one)")
    serve.add_argument(
        "--data", type=path_argument, help="data directory (default $IMAGESEARCH_DATA or ./var/imagesearch)"
    )
    serve.add_argument(
        "--models",
        type=path_argument,
        help="ONNX models directory (default $IMAGESEARCH_MODELS or ./var/models)",
    )
    serve.add_argument("--config", type=path_argument, help="TOML file with settings and a [limits] table")
    serve.add_argument("--log-format", choices=("json", "text"), help="log line format (default json)")
    serve.add_argument(
        "--demo", action="store_true", help="index sample photos and print a first search result"
    )
    serve.set_defaults(handler=_serve)

    plugins = commands.add_parser("plugins", help="list loaded extractors and metrics, and plugin problems")
    plugins.add_argument("--models", type=path_argument, help="ONNX models directory (as for serve)")
    plugins.add_argument(
        "--config", type=path_argument, help="TOML file (as for serve: models_dir, [plugins.*])"
    )
    plugins.set_defaults(handler=_plugins)

    try:
        from imagesearch.server.model_cli import add_model_commands
    except ImportError as exc:
        _offered_without(commands, exc, ("model", "list, export and verify CNN models"))
    else:
        add_model_commands(commands)
    add_folder_command(commands)  # add and search use the client only: they work without the server extra
    add_search_command(commands)
    add_train_command(commands)
    try:  # these render images (OpenCV): with the client alone they are not offered
        from imagesearch.server.dataset_builder import add_dataset_command
        from imagesearch.server.eval_runner import add_eval_command
    except ImportError as exc:
        _offered_without(
            commands,
            exc,
            ("eval", "measure extractors and metrics on a labelled folder"),
            ("dataset", "write the offline labelled image set"),
        )
    else:
        add_eval_command(commands)
        add_dataset_command(commands)
    return parser


def _offered_without(commands: Any, missing: ImportError, *named: tuple[str, str]) -> None:
    """Commands whose modules need the server extra, listed all the same: run without it, each says
    what to install (an outside test met a bare "invalid choice" in a client-only install)."""
    for name, description in named:
        stub = commands.add_parser(
            name,
            help=f"{description} (needs the server extra)",
            add_help=False,
            prefix_chars="\0",  # every argument, options and -h included, is taken as it comes
        )
        stub.add_argument("arguments", nargs="*")
        stub.set_defaults(handler=lambda args, exc=missing: _server_extra_needed(exc))


def _server_extra_needed(exc: ImportError) -> int:
    print(
        f"error: {exc}. This needs the server extra: `pip install '<checkout>[server]'` "
        "(distribution imagesearch-cbir).",
        file=sys.stderr,
    )
    return 2


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        return int(args.handler(args) or 0)
    except Terminated:  # SIGTERM where a command asked to unwind on it (sigterm_unwinds)
        print("terminated", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:  # Ctrl-C: a line, not gRPC's traceback (each command says what is left)
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ModuleNotFoundError as exc:
        return _server_extra_needed(exc)
    except (ValueError, RuntimeError) as exc:  # bad configuration, plugin conflicts
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a path that is a file, not a folder, or the reverse: no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
