"""What text may hold to be shown as it is: one rule for the server's checks of ids and labels and
for the CLI, which prints what a server holds (stored before the rule, or by another server)."""

from __future__ import annotations

import re

# Control characters (C0, DEL, C1), line and paragraph separators, and the bidirectional controls
# that reorder what a terminal shows ("g\u202egnp.exe" reads "gexe.png"). In a label, a newline
# forged a row of `imagesearch search`'s table and ESC sequences cleared the screen (an outside
# test).
UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """``text`` with each UNPRINTABLE character written as its escape (``\\n``, ``\\x1b``, ``\\u202e``)."""
    return UNPRINTABLE.sub(lambda found: ascii(found.group())[1:-1], text)
