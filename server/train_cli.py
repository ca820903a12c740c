"""`imagesearch train`: refit a collection's trainable extractor (its SIFT vocabulary) on its own images.

Uses the client SDK only. The server does the work in one TrainCollection call; this command
shows the time elapsed while it runs (fitting and re-encoding a large collection takes minutes)
and then what changed. Exit codes: 0 trained, 2 could not train (not trainable, too few images,
server unreachable).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

from imagesearch.client import DeadlineExceeded, ImageSearchClient, ImageSearchError
from imagesearch.server.client_cli import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    add_server_arguments,
    positive_float,
    server_error,
)
from imagesearch.server.progress import format_duration

TICK_S = 1.0


def add_train_command(commands: argparse._SubParsersAction) -> None:
    """Register `train` on the `imagesearch` command."""
    parser = commands.add_parser(
        "train",
        help="refit a collection's SIFT vocabulary on its own images and re-encode them",
        description="Fit the collection's trainable extractor (sift-bovw, sift-vlad) on the local "
        "features it stores and re-encode every image; the old vocabulary serves until the new one "
        "is committed. Exit codes: 0 trained, 2 could not train.",
    )
    parser.add_argument(
        "--words", type=int, default=0, metavar="K", help="vocabulary size (default: the extractor's)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the fit (same images + seed: same vocabulary)"
    )
    parser.add_argument(
        "--timeout",
        type=positive_float,
        default=3600.0,
        metavar="S",
        help="stop waiting after S seconds (the server finishes the training all the same)",
    )
    add_server_arguments(parser)
    parser.set_defaults(handler=cmd_train)


def _ticker(label: str, done: threading.Event) -> None:
    """Print the elapsed time until ``done`` (in place on a terminal, every 10 s otherwise)."""
    started, tty = time.monotonic(), sys.stderr.isatty()
    interval = TICK_S if tty else 10 * TICK_S
    while not done.wait(interval):
        line = f"{label}: {format_duration(time.monotonic() - started)} elapsed"
        sys.stderr.write(f"\r{line}" if tty else f"{line}\n")
        sys.stderr.flush()
    if tty:
        sys.stderr.write("\n")


def _still_training(name: str, code: int) -> int:
    """What waiting less than the training leaves: the server carries on and commits it (TrainCollection
    is not cancelled by its caller going away), which a user told only "failed" did not expect (an
    outside test: the version changed five seconds after the error)."""
    print(
        f"stopped waiting; the server goes on training collection '{name}' and commits it unless it is "
        f"stopped first: `imagesearch` cannot tell when. Its extractor version changes when it lands "
        "(GetCollection); a second training meanwhile is refused (TRAINING_RUNNING).",
        file=sys.stderr,
    )
    return code


def cmd_train(args: argparse.Namespace) -> int:
    name = args.collection or "default"
    done = threading.Event()
    ticker = threading.Thread(target=_ticker, args=(f"training collection '{name}'", done), daemon=True)
    ticker.start()
    try:
        with ImageSearchClient(args.target) as client:
            result = client.train_collection(
                args.collection, model_size=args.words, seed=args.seed, timeout=args.timeout
            )
    except DeadlineExceeded as error:
        server_error(error, args.target)
        return _still_training(name, EXIT_ERROR)
    except ImageSearchError as error:
        return server_error(error, args.target)
    except KeyboardInterrupt:
        return _still_training(name, EXIT_INTERRUPTED)
    finally:
        done.set()
        ticker.join()
    info = result.collection
    print(
        f"collection '{info.name}' ({info.extractor}): vocabulary fitted on {result.training_images} images, "
        f"{result.reencoded_images} re-encoded in {result.train_ms / 1000:.1f} s\n"
        f"extractor version {result.previous_extractor_version} -> {info.extractor_version}, "
        f"dimension {info.dimension}"
    )
    return EXIT_OK
