"""Run a real server process with the tiny test extractor: `python -m tests.support.serve_tiny DATA_DIR [key=value | limits.key=value ...]`.

Prints `PORT <n>` once serving, so a test can connect; exits on SIGTERM like
`imagesearch serve`. Crash tests kill it with SIGKILL.
"""

from __future__ import annotations

import sys
from pathlib import Path

from imagesearch.server.app import serve_forever
from imagesearch.server.logs import configure_logging
from tests.conftest import tiny_config
from tests.support.tiny_plugin import TINY_PLUGIN


def main() -> None:
    base = tiny_config(Path())
    overrides: dict = {}
    for arg in sys.argv[2:]:
        key, value = arg.split("=", 1)
        if key.startswith("limits."):  # limits.max_image_pixels=1000000
            name = key.removeprefix("limits.")
            overrides.setdefault("limits", {})[name] = type(getattr(base.limits, name))(value)
        else:
            overrides[key] = type(getattr(base, key))(value)
    configure_logging("text", "WARNING")
    config = tiny_config(Path(sys.argv[1]), **overrides)
    serve_forever(
        config, lambda running: print(f"PORT {running.port}", flush=True), extra_plugins=[TINY_PLUGIN]
    )


if __name__ == "__main__":
    main()
