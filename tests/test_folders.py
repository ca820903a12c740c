"""``imagesearch.client.folders`` over the fake server, and the CLI's progress line.

The fake server remembers ids across calls and rejects ``b"bad"`` content, which is
what the real server does with ``skip_existing`` / ``skip_invalid`` (the real
thing is tested through the CLI in test_folder_cli.py).
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from google.rpc import code_pb2

from imagesearch.client import ImageSearchClient
from imagesearch.client.folders import add_folder, scan_folder
from imagesearch.server.progress import ProgressLine, format_duration, format_progress
from imagesearch.v1 import image_search_service_pb2 as pb
from tests.support import fake_server as fake


@dataclass
class RememberingServicer(fake.FakeServicer):
    """AddImagesStream that keeps ids (ALREADY_EXISTS on a second add) and rejects b"bad" content."""

    stored: dict[str, str] = field(default_factory=dict)

    def AddImagesStream(self, request_iterator, context: grpc.ServicerContext) -> pb.AddImagesStreamResponse:
        chunks = list(request_iterator)
        self._record("AddImagesStream", context, chunks)
        response = pb.AddImagesStreamResponse(chunk_count=len(chunks))
        for index, image in enumerate(i for chunk in chunks for i in chunk.images):
            if image.id in self.stored:
                response.results.add(
                    index=index, id=image.id, code=code_pb2.ALREADY_EXISTS, reason="IMAGE_EXISTS"
                )
            elif image.content == b"bad":
                response.results.add(
                    index=index,
                    code=code_pb2.INVALID_ARGUMENT,
                    message=f"images[{index}]: not a decodable image",
                    reason="IMAGE_UNDECODABLE",
                )
            else:
                self.stored[image.id] = image.label
                response.results.add(index=index, id=image.id, code=code_pb2.OK)
                response.added_count += 1
            response.ids.append(image.id if image.id in self.stored else "")
        return response


@pytest.fixture
def remembering(monkeypatch) -> Iterator[tuple[RememberingServicer, ImageSearchClient]]:
    monkeypatch.setattr(fake, "FakeServicer", RememberingServicer)
    with fake.fake_server() as (servicer, target), ImageSearchClient(target) as client:
        yield servicer, client


def make_tree(root: Path) -> Path:
    files = {
        "cats/a.jpg": b"jpeg",
        "cats/B.PNG": b"png",
        "cats/deeper/c.webp": b"webp",
        "dogs/d.gif": b"gif",
        "dogs/bad.jpg": b"bad",
        "top.tiff": b"tiff",
        "notes.txt": b"text",
        "dogs/e.jpeg.bak": b"backup",
        ".DS_Store": b"hidden",
        ".git/config.png": b"hidden folder",
    }
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return root


def test_scan_labels_by_first_folder_and_ids_by_relative_path(tmp_path):
    scan = scan_folder(make_tree(tmp_path))
    assert [(image.id, image.label) for image in scan.images] == [
        ("cats/B.PNG", "cats"),
        ("cats/a.jpg", "cats"),
        ("cats/deeper/c.webp", "cats"),
        ("dogs/bad.jpg", "dogs"),
        ("dogs/d.gif", "dogs"),
        ("top.tiff", ""),
    ]
    assert [path.relative_to(tmp_path).as_posix() for path in scan.not_images] == [
        "dogs/e.jpeg.bak",
        "notes.txt",
    ]
    assert scan.labels == {"cats": 3, "dogs": 2, "": 1}


def test_scan_refuses_what_is_not_a_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        scan_folder(tmp_path / "missing")
    (tmp_path / "file.jpg").write_bytes(b"x")
    with pytest.raises(NotADirectoryError):
        scan_folder(tmp_path / "file.jpg")


def test_add_folder_sends_images_with_ids_labels_and_skip_flags(remembering, tmp_path):
    servicer, client = remembering
    make_tree(tmp_path)
    seen: list[tuple[int, int]] = []
    outcome = add_folder(
        client, tmp_path, collection="pets", batch_size=2, progress=lambda *a: seen.append(a)
    )
    chunks = servicer.last("AddImagesStream").request
    assert [len(chunk.images) for chunk in chunks] == [2, 2, 2]
    assert all(chunk.collection == "pets" and chunk.skip_existing and chunk.skip_invalid for chunk in chunks)
    sent = {image.id: image.label for chunk in chunks for image in chunk.images}
    assert sent == {image.id: image.label for image in scan_folder(tmp_path).images}
    assert seen == [(2, 6), (4, 6), (6, 6)]

    assert (outcome.stored, outcome.already_stored) == (5, 0)
    (failure,) = outcome.failed
    assert (failure.id, failure.reason, failure.message) == (
        "dogs/bad.jpg",
        "IMAGE_UNDECODABLE",
        "not a decodable image",
    )
    assert failure.path == tmp_path / "dogs" / "bad.jpg" and not outcome.ok
    assert [path.name for path in outcome.not_images] == ["e.jpeg.bak", "notes.txt"]


def test_running_add_folder_again_stores_nothing_twice(remembering, tmp_path):
    servicer, client = remembering
    make_tree(tmp_path)
    add_folder(client, tmp_path)
    (tmp_path / "dogs" / "new.png").write_bytes(b"png")
    again = add_folder(client, tmp_path)
    assert (again.stored, again.already_stored, len(again.failed)) == (1, 5, 1)
    assert len(servicer.stored) == 6


def test_files_too_large_for_a_message_are_reported_not_sent(tmp_path):
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "huge.jpg").write_bytes(b"x" * 40_000)
    (tmp_path / "big" / "small.jpg").write_bytes(b"x")
    with (
        fake.fake_server() as (servicer, target),
        ImageSearchClient(target, max_message_bytes=48_000) as client,
    ):
        outcome = add_folder(client, tmp_path)
    assert outcome.stored == 1 and [(f.id, f.reason) for f in outcome.failed] == [
        ("big/huge.jpg", "FILE_TOO_LARGE")
    ]
    assert [image.id for image in servicer.last("AddImagesStream").request[0].images] == ["big/small.jpg"]


def test_a_fifo_or_a_device_among_the_images_is_listed_and_the_rest_stored(remembering, tmp_path):
    """One FIFO named like an image aborted the whole import, and every re-run the same way
    (an outside test): it is listed as unreadable, as a dangling link is."""
    _, client = remembering
    (tmp_path / "cats").mkdir()
    (tmp_path / "cats" / "a.jpg").write_bytes(b"jpg")
    os.mkfifo(tmp_path / "cats" / "pipe.jpg")
    (tmp_path / "cats" / "zero.png").symlink_to("/dev/zero")
    outcome = add_folder(client, tmp_path)
    assert outcome.stored == 1
    assert sorted((f.id, f.reason, f.message) for f in outcome.failed) == [
        ("cats/pipe.jpg", "FILE_UNREADABLE", "not a regular file"),
        ("cats/zero.png", "FILE_UNREADABLE", "not a regular file"),
    ]


def test_a_folder_without_images_sends_nothing(remembering, tmp_path):
    servicer, client = remembering
    (tmp_path / "readme.md").write_text("no images here")
    outcome = add_folder(client, tmp_path)
    assert (outcome.stored, outcome.already_stored, outcome.failed, outcome.ok) == (0, 0, (), True)
    assert not servicer.calls


# -- the progress line -------------------------------------------------------------------------


def test_progress_format_shows_count_rate_and_eta():
    assert format_progress(50, 200, 4.0) == "[######..................]  50/200  25%  12.5 images/s  ETA 0:12"
    assert format_progress(0, 10, 0.0).endswith("0.0 images/s  ETA --:--")
    assert format_progress(0, 0, 1.0).startswith("[########################] 0/0 100%")
    assert [format_duration(s) for s in (0, 59.6, 61, 3725)] == ["0:00", "1:00", "1:01", "1:02:05"]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_into_a_pipe_writes_throttled_whole_lines():
    stream, clock = io.StringIO(), FakeClock()
    progress = ProgressLine(stream, interval=2.0, clock=clock)
    for done in range(1, 11):
        clock.now = done * 0.5
        progress(done, 10)
    progress.close()
    lines = stream.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["1/10", "5/10", "9/10", "10/10"]  # first, every 2 s, last


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_on_a_terminal_redraws_one_line():
    stream, clock = Terminal(), FakeClock()
    progress = ProgressLine(stream, clock=clock)
    for done in (1, 2):
        clock.now += 1
        progress(done, 2)
    progress.close()
    text = stream.getvalue()
    assert text.count("\r") == 2 and text.endswith("\n") and text.count("\n") == 1


def test_client_doc_folder_example_runs(remembering, tmp_path, monkeypatch, capsys):
    _, client = remembering
    text = (Path(__file__).resolve().parents[1] / "docs" / "client.md").read_text()
    (example,) = [
        block for block in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "add_folder(" in block
    ]
    make_tree(tmp_path / "photos")
    monkeypatch.chdir(tmp_path)
    exec(compile(example.replace('"127.0.0.1:50051"', repr(client.target)), "docs/client.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert printed[-3:] == [
        "5 stored, 0 already stored",
        "dogs/bad.jpg IMAGE_UNDECODABLE not a decodable image",
        f"not images: {[str(tmp_path / 'photos' / name) for name in ('dogs/e.jpeg.bak', 'notes.txt')]}",
    ]
