"""Run the `imagesearch` command with the server's dependencies blocked: `python -m tests.support.client_only_cli ARGS`.

`add` and `search` must work with the client install (no extras) alone (the client): here
importing faiss, onnxruntime, OpenCV, pluggy, torch or the plugins package raises
ImportError, so a test that runs them through this module proves they need none of it.
"""

from __future__ import annotations

import importlib.abc
import sys

BLOCKED_MODULES = frozenset({"faiss", "onnxruntime", "cv2", "pluggy", "torch"})
BLOCKED_PACKAGE = "imagesearch.plugins"
BROKEN_BLOCKER_EXIT = 99


class _Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED_MODULES or name.startswith(BLOCKED_PACKAGE):
            raise ImportError(f"blocked: `imagesearch add/search` must not need {name}")
        return None


def main() -> int:
    sys.meta_path.insert(0, _Blocker())
    try:
        import faiss  # noqa: F401  (installed in the dev venv: the blocker must stop it)
    except ImportError:
        pass
    else:
        return BROKEN_BLOCKER_EXIT
    from imagesearch.server.cli import main as cli_main

    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
