"""`imagesearch serve --demo`: sample photos indexed over gRPC, a ranking printed, a contact sheet written."""

from __future__ import annotations

import pytest

from imagesearch.server.demo import DEMO_COLLECTION, run_demo, sample_photos

pytestmark = pytest.mark.e2e


def test_demo_indexes_samples_and_writes_a_contact_sheet(server, tmp_path, capsys):
    path = run_demo(server.target, tmp_path)
    out = capsys.readouterr().out
    assert path is not None and path.exists()
    sheet = path.read_text()
    assert sheet.count('<figure class="hit">') == 8 and "data:image/jpeg;base64," in sheet
    ranking = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert ranking[0][1].startswith("chelsea"), out
    pasted = out[out.index("pasted at 40%") :]
    reranked = [line.split() for line in pasted.splitlines() if line.strip()[:1].isdigit()]
    # The pasted photo is found among the re-ranked hits, confirmed by geometry.
    assert any(row[2] == "coffee" and int(row[3]) >= 10 for row in reranked), pasted
    assert server.engine.get_collection(DEMO_COLLECTION).image_count == 4 * len(sample_photos())
    run_demo(server.target, tmp_path)  # a second run reuses the collection
    assert server.engine.get_collection(DEMO_COLLECTION).image_count == 4 * len(sample_photos())
