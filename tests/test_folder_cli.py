"""`imagesearch add DIR` and `imagesearch search IMG` against a real server process.

The commands run as subprocesses with the server's dependencies blocked
(tests.support.client_only_cli), so every test also proves they need the client only.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from itertools import count
from pathlib import Path

import numpy as np
import pytest

from imagesearch.client import ImageSearchClient
from imagesearch.client.folders import add_folder
from tests.support.images import encode, pattern
from tests.support.process import REPO, ServerProcess, tiny_server
from tests.support.tiny_plugin import TinyExtractor

pytestmark = pytest.mark.e2e

LABELS = ("cats", "dogs", "cars", "boats")
TREE_SIZE = 200
_names = count()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    process = tiny_server(tmp_path_factory.mktemp("data"))
    try:
        yield process
    finally:
        process.terminate()


@pytest.fixture
def client(server: ServerProcess) -> Iterator[ImageSearchClient]:
    with ImageSearchClient(server.target) as connected:
        yield connected


@pytest.fixture
def collection(client: ImageSearchClient) -> str:
    """A fresh collection for each test (they share one server)."""
    name = f"folder-{next(_names)}"
    client.create_collection(name, extractor=TinyExtractor.name)
    return name


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DIR/<label>/<file>.png: TREE_SIZE small distinct images in four classes."""
    root = tmp_path_factory.mktemp("tree")
    for label in LABELS:
        (root / label).mkdir()
    for i in range(TREE_SIZE):
        (root / LABELS[i % len(LABELS)] / f"{i:03d}.png").write_bytes(encode(pattern(i, (48, 64))))
    return root


def expected_ids(root: Path) -> set[str]:
    return {path.relative_to(root).as_posix() for path in root.rglob("*.png")}


def stored(client: ImageSearchClient, collection: str) -> dict[str, str]:
    """id -> label of every image in the collection."""
    return {image.id: image.label for image in client.iter_images(collection=collection, page_size=1000)}


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "tests.support.client_only_cli", *args]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cli_command(*args),
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_add_twice_stores_each_image_once(server, client, collection, tree):
    first = run_cli("add", str(tree), "--collection", collection, "--target", server.target)
    assert first.returncode == 0, first.stderr
    assert "stored 200, already stored 0, rejected 0, not images 0" in first.stdout
    assert f"{TREE_SIZE}/{TREE_SIZE}" in first.stderr  # the progress line's last update

    # The target may come from the environment instead of --target.
    second = run_cli("add", str(tree), "--collection", collection, env={"IMAGESEARCH_TARGET": server.target})
    assert second.returncode == 0, second.stderr
    assert "stored 0, already stored 200" in second.stdout

    images = stored(client, collection)
    assert set(images) == expected_ids(tree) and len(images) == TREE_SIZE
    assert all(label == image_id.split("/")[0] for image_id, label in images.items())


def start_until_progress(*args: str) -> subprocess.Popen[str]:
    """Start the command and return once it has printed its first progress update (stdout: a pipe)."""
    process = subprocess.Popen(cli_command(*args), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert process.stderr is not None
    for line in process.stderr:
        if re.search(rf"\d+/{TREE_SIZE}", line):
            return process
    process.kill()
    raise AssertionError(f"no progress update; exit code {process.wait(10)}")


def test_killed_import_completes_on_rerun_storing_each_image_once(server, client, collection, tree):
    args = ("add", str(tree), "--collection", collection, "--target", server.target, "--batch-size", "4")
    process = start_until_progress(*args)
    process.kill()
    process.communicate(timeout=10)
    interrupted = client.get_collection(collection).image_count
    assert interrupted < TREE_SIZE, "the import finished before the kill: the test proves nothing"

    rerun = run_cli(*args)
    assert rerun.returncode == 0, rerun.stderr
    counts = re.search(r"stored (\d+), already stored (\d+)", rerun.stdout)
    assert counts is not None, rerun.stdout
    assert int(counts[1]) + int(counts[2]) == TREE_SIZE and int(counts[2]) >= interrupted
    images = stored(client, collection)
    assert set(images) == expected_ids(tree) and client.get_collection(collection).image_count == TREE_SIZE


def test_a_server_lost_mid_import_is_not_called_unreachable(tree, tmp_path):
    """A killed server was reported as "cannot reach ... Is it running? Pass --target", advice for
    a wrong address, after it had stored part of the import (an outside test)."""
    own = tiny_server(tmp_path / "data")
    try:
        process = start_until_progress("add", str(tree), "--target", own.target, "--batch-size", "2")
        own.kill9()
        _, errors = process.communicate(timeout=60)
    finally:
        if own.proc.poll() is None:
            own.kill9()
    assert process.returncode == 2, errors
    assert f"lost the imagesearch server at {own.target}" in errors and "--target" not in errors
    assert "run the same command again" in errors


def test_ctrl_c_is_exit_code_130_and_says_how_to_finish(server, collection, tree):
    process = start_until_progress("add", str(tree), "--collection", collection, "--target", server.target, "--batch-size", "2")  # fmt: skip
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=30)
    assert process.returncode == 130
    assert "run the same command again to complete it" in err and "Traceback" not in err


def test_non_images_are_listed_and_rejected_images_do_not_abort(server, client, collection, tmp_path):
    (tmp_path / "cats").mkdir()
    (tmp_path / "dogs").mkdir()
    (tmp_path / "cats" / "tabby.PNG").write_bytes(encode(pattern(1)))
    (tmp_path / "dogs" / "rex.jpg").write_bytes(encode(pattern(2), ".jpg"))
    (tmp_path / "loose.png").write_bytes(encode(pattern(3)))
    (tmp_path / "cats" / "broken.jpg").write_bytes(b"this is not a JPEG")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "dogs" / "list.csv").write_text("a,b")
    (tmp_path / ".DS_Store").write_bytes(b"hidden files are ignored")

    result = run_cli("add", str(tmp_path), "--collection", collection, "--target", server.target)

    assert result.returncode == 1, result.stdout + result.stderr  # some images rejected
    assert "stored 3, already stored 0, rejected 1, not images 2" in result.stdout
    assert re.search(r"^  cats/broken\.jpg: IMAGE_UNDECODABLE: ", result.stdout, re.M), result.stdout
    assert re.search(r"^  dogs/list\.csv$", result.stdout, re.M) and re.search(
        r"^  notes\.txt$", result.stdout, re.M
    )
    assert ".DS_Store" not in result.stdout
    assert stored(client, collection) == {"cats/tabby.PNG": "cats", "dogs/rex.jpg": "dogs", "loose.png": ""}


def test_unreachable_server_is_exit_code_2_naming_the_target(tree, tmp_path):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        target = f"127.0.0.1:{sock.getsockname()[1]}"
    query = next(tree.rglob("*.png"))
    for args in (("add", str(tree)), ("search", str(query))):
        result = run_cli(*args, "--target", target)
        assert result.returncode == 2, result.stderr
        assert f"cannot reach an imagesearch server at {target}" in result.stderr
        assert "Traceback" not in result.stderr


def test_commands_that_need_the_server_extra_say_so_in_a_client_only_install():
    """Listed, and each names what to install (an outside test met a bare "invalid choice")."""
    listing = run_cli("--help")
    assert all(name in listing.stdout for name in ("model", "eval", "dataset"))
    for args in (
        ("model", "list"),
        ("eval", "photos"),
        ("dataset", "out"),
        ("eval", "--target", "x", "ds"),
        ("model", "-h"),
    ):
        result = run_cli(*args)
        assert result.returncode == 2 and "needs the server extra" in result.stderr, (args, result.stderr)


def test_usage_errors_are_exit_code_2(server, tmp_path):
    assert run_cli("add", str(tmp_path / "missing"), "--target", server.target).returncode == 2
    assert run_cli("add", str(tmp_path), "--batch-size", "0").returncode == 2
    bad_name = run_cli("add", str(tmp_path), "--collection", "no such", "--target", server.target)
    assert bad_name.returncode == 2 and "invalid collection name" in bad_name.stderr


def test_add_creates_a_missing_collection_with_the_server_defaults(server, tree):
    made = run_cli("add", str(tree), "--collection", "fresh", "--target", server.target)
    assert made.returncode in (0, 1), made.stderr  # 1: the tree holds a deliberately broken image
    assert "created collection 'fresh'" in made.stdout


@pytest.fixture
def indexed(server, client, collection, tree) -> str:
    """The tree imported through the SDK (the CLI's import is tested above)."""
    assert add_folder(client, tree, collection=collection).stored == TREE_SIZE
    return collection


def test_search_prints_a_ranked_table_and_filters_labels(server, indexed, tree):
    query = tree / "dogs" / "001.png"
    result = run_cli("search", str(query), "-k", "5", "--collection", indexed, "--target", server.target)
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["rank", "id", "label", "score"]
    assert [row.split()[0] for row in rows] == ["1", "2", "3", "4", "5"]
    assert rows[0].split()[1:3] == ["dogs/001.png", "dogs"]  # the indexed copy of the query comes first
    scores = [float(row.split()[3]) for row in rows]
    assert scores == sorted(scores, reverse=True)

    only = run_cli("search", str(query), "-k", "4", "--label", "cars", "--collection", indexed, "--target", server.target)  # fmt: skip
    assert only.returncode == 0, only.stderr
    assert [row.split()[2] for row in only.stdout.splitlines()[1:]] == ["cars"] * 4

    bucketed = run_cli("search", str(query), "--bucketed", "--collection", indexed, "--target", server.target)  # fmt: skip
    assert bucketed.returncode == 0, bucketed.stderr
    recognised, _, *rows = bucketed.stdout.splitlines()
    assert recognised.startswith("recognised as dogs (confidence")
    assert {row.split()[2] for row in rows} == {"dogs"}


@pytest.fixture
def sheet(server, indexed, tree, tmp_path) -> Path:
    page = tmp_path / "hits.html"
    query = tree / "cats" / "000.png"
    result = run_cli("search", str(query), "-k", "6", "--collection", indexed, "--target", server.target, "--html", str(page))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"contact sheet: {page}" in result.stdout
    return page


def test_search_html_writes_a_contact_sheet(sheet):
    html = sheet.read_text()
    assert html.count("<img ") == 7  # the query and six hits
    assert html.count('<figure class="hit">') == 6 and "cats/000.png" in html
    assert "data:image/png;base64," in html and "data:image/jpeg;base64," in html  # query file, thumbnails


def test_contact_sheet_shows_every_thumbnail_in_a_headless_browser(sheet, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run installs it)")
    rendered = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}",
         "--virtual-time-budget=5000", "--dump-dom", sheet.as_uri()],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert rendered.returncode == 0, rendered.stderr[-2000:]
    loaded = re.search(r'data-images-loaded="(\d+)"', rendered.stdout)
    total = re.search(r'data-images-total="(\d+)"', rendered.stdout)
    assert loaded and total, "the page's load script did not run:\n" + rendered.stdout[:2000]
    assert int(loaded[1]) == int(total[1]) == sheet.read_text().count("<img ") == 7


def test_the_search_table_and_file_names_print_unprintable_characters_as_escapes() -> None:
    """A server may hold what it now refuses (stored before the rule): a newline in a label forged
    a row of the table, ESC sequences cleared the screen, a newline in a file name split the
    import's summary (an outside test)."""
    from imagesearch.client import SearchHit
    from imagesearch.server.folder_cli import _shown
    from imagesearch.server.search_cli import format_hits

    hits = [
        SearchHit(id="g\u202egnp.exe", label="cats\n   2  forged", score=0.5, distance=0.5),
        SearchHit(id="b", label="\x1b[2Jdogs", score=0.25, distance=0.75),
    ]
    table = format_hits(hits)
    assert table.splitlines()[1:] == [
        "   1  g\\u202egnp.exe  cats\\n   2  forged   0.5000",
        "   2  b               \\x1b[2Jdogs          0.2500",
    ]
    assert _shown("nl/new\nline.png") == "nl/new\\nline.png"


def test_an_import_that_loses_the_race_to_create_its_collection_uses_it(server, tree, monkeypatch):
    """Two imports into one new collection at once: the one whose create came second exited 2 with
    ALREADY_EXISTS (an outside test, 1 run in 3)."""
    from imagesearch.client import NotFound
    from imagesearch.server.folder_cli import _ensure_collection

    with ImageSearchClient(server.target) as client:
        client.create_collection("raced")  # made by the other import after this one looked
        real_get = client.get_collection
        looked: list[str] = []

        def not_yet(name: str | None = None, **options: object):
            if not looked:
                looked.append(str(name))
                raise NotFound("collection 'raced' not found")
            return real_get(name, **options)

        monkeypatch.setattr(client, "get_collection", not_yet)
        _ensure_collection(client, "raced")  # no AlreadyExists
        assert looked == ["raced"] and client.get_collection("raced").name == "raced"


def test_a_query_browsers_cannot_show_gets_no_broken_picture_and_a_removed_hit_no_failure(
    server, indexed, tree, tmp_path
):
    """A TIFF query was inlined labelled image/jpeg (broken in every browser), and a hit removed
    before its thumbnail was fetched failed the whole sheet with NOT_FOUND (outside tests)."""
    import cv2

    from imagesearch.server.contact_sheet import SheetItem, cell
    from imagesearch.server.search_cli import _thumbnail

    tiff = tmp_path / "query.tiff"
    assert cv2.imwrite(str(tiff), np.full((40, 40, 3), 200, np.uint8))
    shown = cell(SheetItem("query", tiff.read_bytes(), ["query.tiff"]), "query")
    assert "<img" not in shown and "no preview" in shown
    assert 'src="data:image/png;base64,' in cell(SheetItem("hit", b"\x89PNG\r\n", []), "hit")
    with ImageSearchClient(server.target) as client:
        assert _thumbnail(client, "no-such-image", indexed) is None
