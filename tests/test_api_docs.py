"""Every error reason the server can send is in docs/api.md's error table: clients in other
languages branch on ``ErrorInfo.reason``, and a reason only the code knows is a contract no one
can read (an outside test found eight missing)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REASON = re.compile(r'reason="([A-Z][A-Z0-9_]*)"')
# catalog._registered's reason is UNKNOWN_<KIND> for each kind of plugin object it looks up.
LOOKED_UP_KINDS = ("extractor", "metric", "local features")


def reasons_in_code() -> set[str]:
    found = {f"UNKNOWN_{kind.upper().replace(' ', '_')}" for kind in LOOKED_UP_KINDS}
    for path in [*ROOT.joinpath("server").glob("*.py"), *ROOT.joinpath("plugins").rglob("*.py")]:
        found |= set(REASON.findall(path.read_text()))
    return found


def error_table() -> str:
    text = (ROOT / "docs" / "api.md").read_text()
    start = text.index("| status | when | reasons |")
    return text[start : text.index("\n\n", start)]


def test_every_reason_the_server_sends_is_in_the_error_table() -> None:
    table = error_table()
    missing = sorted(r for r in reasons_in_code() if f"`{r}`" not in table)
    assert not missing, f"add these to docs/api.md's error table: {missing}"


def test_the_lookup_reasons_follow_the_catalogs_rule() -> None:
    """UNKNOWN_<KIND> is built, not written out: check the rule the test assumes is the code's."""
    source = (ROOT / "server" / "catalog.py").read_text()
    assert "reason=f\"UNKNOWN_{kind.upper().replace(' ', '_')}\"" in source


def test_client_md_gives_query_every_field_it_has() -> None:
    """The documented signature left out mode, rerank and extractor_version (an outside test)."""
    import dataclasses

    from imagesearch.client import Query

    text = " ".join((ROOT / "docs" / "client.md").read_text().split())
    signature = re.search(r"Each `Query\((.*?)\)` takes", text)
    assert signature is not None
    documented = re.findall(r"(\w+)=", signature.group(1))
    assert documented == [field.name for field in dataclasses.fields(Query)]
