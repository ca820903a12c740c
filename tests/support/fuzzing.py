"""How hard the fuzz tests dig: a quick run in the suite, ``make fuzz`` sets IMAGESEARCH_FUZZ_EXAMPLES."""

from __future__ import annotations

import os


def fuzz_examples(default: int) -> int:
    """Examples per fuzz test: ``default`` in the suite, IMAGESEARCH_FUZZ_EXAMPLES when set."""
    return int(os.environ.get("IMAGESEARCH_FUZZ_EXAMPLES", default))
