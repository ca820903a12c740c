"""SQLite storage of one collection: the source of truth.

Everything needed to rebuild the FAISS index lives here: ids, labels,
metadata, raw feature vectors, thumbnails, optional originals, the collection
spec, a trainable extractor's fitted state (e.g. a SIFT vocabulary), each image's local
features when the collection keeps them, and a monotonically increasing sequence number per
change. WAL mode
with synchronous=FULL means a committed AddImages survives `kill -9` and power
loss; the FAISS index is only ever a cache of these rows.

Row ids (INTEGER PRIMARY KEY AUTOINCREMENT, never reused) double as FAISS ids,
so the index maps hits back to rows without a second lookup table.
"""

from __future__ import annotations

import io
import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import numpy as np

from imagesearch.server.errors import NOTHING_STORED, AlreadyExists, disk_full_reported, shown

log = logging.getLogger(__name__)

# The page sizes a new store may take, and the fill that is good enough for the smallest. A row
# holds its vector (5 KiB at 1280 dimensions): at SQLite's default 4 KiB such a row spills into an
# overflow page, at 8 KiB one row leaves a third of its page empty, at 16 KiB three fill it. Pages
# that rows fill make a durable batch commit faster (fewer bytes to write and fsync); larger pages
# make each hit a search reads a larger copy. bench/bench_ingest_stages.py prints both, at 4 KiB
# and at the size ``page_size_for`` picks for 1280 dimensions.
PAGE_SIZES = (4096, 8192, 16384, 32768)
GOOD_FILL = 0.9
PAGE_HEADER = 64  # a page's own bytes (header, cell pointers), about
ROW_OVERHEAD = 64  # a vector row's bytes beyond its vector: id, seq, label, "{}", created, cell header
DEFAULT_PAGE_SIZE = 4096  # SQLite's own, for a store made without a vector size (tests, old stores)


def page_size_for(dim: int) -> int:
    """The smallest page size that rows of ``dim`` float32 values fill to GOOD_FILL, else the one
    they fill best (equal fills: the smaller). Rows carrying images are larger; their ingest is
    paced by decoding and extraction, not by the store."""
    row = 4 * dim + ROW_OVERHEAD
    fills = {size: ((size - PAGE_HEADER) // row) * row / size for size in PAGE_SIZES}
    good = [size for size in PAGE_SIZES if fills[size] >= GOOD_FILL]
    return good[0] if good else max(PAGE_SIZES, key=lambda size: (fills[size], -size))


SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    row_id    INTEGER PRIMARY KEY AUTOINCREMENT,
    id        TEXT NOT NULL UNIQUE,
    seq       INTEGER NOT NULL,
    label     TEXT NOT NULL,
    metadata  TEXT NOT NULL,
    vector    BLOB NOT NULL,
    thumbnail BLOB,
    original  BLOB,
    width     INTEGER NOT NULL DEFAULT 0,
    height    INTEGER NOT NULL DEFAULT 0,
    created   REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS images_label ON images(label, row_id);
CREATE INDEX IF NOT EXISTS images_seq ON images(seq);
CREATE TABLE IF NOT EXISTS removals (seq INTEGER PRIMARY KEY, row_id INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS local_features (row_id INTEGER PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS extractor_state (slot INTEGER PRIMARY KEY CHECK (slot = 1), data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS index_learnt (slot INTEGER PRIMARY KEY CHECK (slot = 1), data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS commits (seq INTEGER PRIMARY KEY, token BLOB NOT NULL);
"""


@dataclass(slots=True)
class NewImage:
    """A row to insert: the vector is the extractor's raw output (not metric-prepared). One per
    image of a batch: slotted, not frozen, for the cost of making 256 of them (records.ImageItem)."""

    id: str
    label: str
    vector: np.ndarray
    metadata: dict[str, str] = field(default_factory=dict)
    thumbnail: bytes | None = None
    original: bytes | None = None
    width: int = 0
    height: int = 0
    local: bytes | None = None  # serialised local features, when the collection keeps them
    encoded_with: str = ""  # the extractor version that made ``vector`` ("" for a client's own vector)


@dataclass(frozen=True)
class HitRow:
    """What a search hit shows of its image."""

    row_id: int
    id: str
    label: str
    metadata: dict[str, str]


@dataclass(frozen=True)
class ImageRow(HitRow):
    """A stored image: what a hit shows, its size and time, and the blobs a caller asks for."""

    width: int
    height: int
    created: float
    thumbnail: bytes | None = None
    original: bytes | None = None
    vector: np.ndarray | None = None


# ``column IN {ANY_OF}`` with ``any_of(values)`` as its one parameter: a set of any size in one bound
# variable (SQLite refuses more variables than its limit: a SearchBatch of 256 queries of 1,000 hits
# asked for 256,000 rows, and a query with 300,000 labels failed).
ANY_OF = "(SELECT value FROM json_each(?))"
MAX_SEQ = 2**63 - 1
CORE_TABLES = (
    "meta",
    "images",
    "removals",
)  # in every store since the first version  # past any sequence number (SQLite integers are 64-bit)


def any_of(values: Iterable[object]) -> str:
    """The values as the JSON array ANY_OF reads (NumPy integers as plain ints)."""
    return json.dumps([v if isinstance(v, str) else int(v) for v in values])  # type: ignore[call-overload]


# Reader connections a store has at most (reads beyond wait for one: each is one short statement),
# and how long an unused one stays open (``CollectionStore._take_reader``).
MAX_READERS = 4
READER_IDLE_S = 60.0


def insert_many(conn: sqlite3.Connection, insert: str, rows: Sequence[tuple[object, ...]]) -> None:
    """``insert`` ("INSERT INTO t(a, b) VALUES ") of every row, as few statements of many rows each.

    Not ``executemany``: it runs one statement per row, and Python's sqlite3 lets go of the GIL
    around each and must win it back after; while another thread runs Python (the server checking
    the next batch), every row then waits for that thread to yield, up to the interpreter's switch
    interval (5 ms): a batch of 256 took 70 times as long (bench/bench_ingest_stages.py). One
    statement lets go of the GIL once.
    """
    if not rows:
        return
    width = len(rows[0])
    per_statement = max(1, conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // width)
    row_marks = "(" + ", ".join("?" * width) + ")"
    for start in range(0, len(rows), per_statement):
        chunk = rows[start : start + per_statement]
        conn.execute(insert + ", ".join([row_marks] * len(chunk)), [value for row in chunk for value in row])


def _connect(path: Path, create: bool, page_size: int = DEFAULT_PAGE_SIZE) -> sqlite3.Connection:
    """A connection to the store at ``path``; unless ``create``, the file must exist: opening an
    existing collection must never leave an empty store where a moved-away one was."""
    uri = f"file:{quote(str(path))}?mode={'rwc' if create else 'rw'}"
    conn = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None, timeout=30)
    if create:  # takes effect only in a new, empty file, and only before WAL mode is set
        conn.execute(f"PRAGMA page_size={page_size}")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


class CollectionStore:
    """One collection's SQLite database.

    Writes go through a single connection and must be serialised by the caller
    (the collection's writer lock); reads use one connection per thread, which
    WAL lets run alongside the writer.
    """

    def __init__(
        self, path: Path, *, create: bool = True, page_size: int = DEFAULT_PAGE_SIZE, migrate: bool = True
    ) -> None:
        """Open the store at ``path``, making it if ``create`` (else sqlite3.OperationalError when
        the file is missing), with pages of ``page_size`` bytes when it is new (``page_size_for``).
        ``migrate`` adds the tables later versions brought (not when only the spec is read: the
        collection checks first that none it relies on was lost, ``tables_at_open``)."""
        self.path = path
        self.tables_at_open: frozenset[str] = frozenset()  # an existing store's tables (``require_tables``)
        self._idle_readers: list[tuple[sqlite3.Connection, float]] = []  # (connection, when given back)
        self._reader_slots = threading.BoundedSemaphore(MAX_READERS)
        self._readers_lock = threading.Lock()
        self._closed = False
        self._writer = _connect(path, create, page_size)
        if not create:
            self.tables_at_open = frozenset(
                r[0] for r in self._writer.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            )
            self.require_tables(CORE_TABLES)
        if create or migrate:
            self._writer.executescript(SCHEMA)
        self.identity = self._identity()

    def require_tables(self, names: Iterable[str]) -> None:
        """sqlite3.DatabaseError (the store closed) unless an existing store held ``names`` when it
        opened: SCHEMA would make an empty table in place of a lost one, and the collection serve
        as READY without its images (an outside test). CORE_TABLES every store has had; a
        collection requires the later ones its spec relies on."""
        missing = sorted(set(names) - self.tables_at_open)
        if missing:
            self.close()
            raise sqlite3.DatabaseError(f"the store has lost its {', '.join(missing)} table(s) (damaged)")

    # -- connections -----------------------------------------------------------
    # Reads take one of at most MAX_READERS connections (waiting for one when all are busy) and
    # give it back after their statement, instead of one connection for every thread that ever
    # read. A connection holds two file descriptors, the database's and its WAL's, and SQLite keeps
    # a closed connection's database descriptor open for reuse while the writer holds its lock: so
    # a collection's descriptors follow the most connections it ever had at once. With every
    # worker thread reading, that came to 41, and a client creating a few hundred collections ran
    # the server out of descriptors: every call failed, and a restart under the same limit left
    # most collections unreadable or did not start (an outside test). Now at most 3 + 2 x
    # MAX_READERS. No read holds a connection while it asks for another (a statement is run and
    # fetched whole), so waiting for one cannot deadlock. Connections unused for READER_IDLE_S are
    # closed (``close_idle_readers``, from the snapshot thread): their WAL descriptors and caches go.
    def _take_reader(self) -> sqlite3.Connection:
        self._reader_slots.acquire()
        try:
            with self._readers_lock:
                if self._closed:  # as a closed connection says it
                    raise sqlite3.ProgrammingError("Cannot operate on a closed database.")
                if self._idle_readers:
                    return self._idle_readers.pop()[0]  # the most recently used: its pages are warm
            return _connect(self.path, create=False)
        except BaseException:
            self._reader_slots.release()
            raise

    def _give_back(self, conn: sqlite3.Connection) -> None:
        try:
            with self._readers_lock:
                if not self._closed:
                    self._idle_readers.append((conn, time.monotonic()))
                    return
            conn.close()
        finally:
            self._reader_slots.release()

    def _rows(self, sql: str, args: Sequence[object] = ()) -> list[tuple]:
        """Every row of one read statement, on a pooled reader connection."""
        conn = self._take_reader()
        try:
            return conn.execute(sql, args).fetchall()
        finally:
            self._give_back(conn)

    def _row(self, sql: str, args: Sequence[object] = ()) -> tuple | None:
        """The first row of one read statement (or None), its statement ended before the connection
        goes back: one left open would hold its snapshot, and the next reader would see old data."""
        conn = self._take_reader()
        try:
            cursor = conn.execute(sql, args)
            try:
                return cursor.fetchone()
            finally:
                cursor.close()
        finally:
            self._give_back(conn)

    def close_idle_readers(self, unused_for_s: float = 0.0) -> int:
        """Close the pooled reader connections unused for ``unused_for_s``; returns how many."""
        cutoff = time.monotonic() - unused_for_s
        with self._readers_lock:
            closing = [conn for conn, since in self._idle_readers if since <= cutoff]
            self._idle_readers = [(conn, since) for conn, since in self._idle_readers if since > cutoff]
        for conn in closing:
            conn.close()
        return len(closing)

    def close(self) -> None:
        with self._readers_lock:
            self._closed = True
            idle, self._idle_readers = self._idle_readers, []
        for conn, _ in idle:
            conn.close()
        self._writer.close()

    @contextmanager
    def _transaction(self, undone: str = NOTHING_STORED) -> Iterator[sqlite3.Connection]:
        """One write transaction on the writer connection: committed whole, or rolled back whole
        (a full disk raises DiskFull, saying ``undone``: what the rollback means to the caller)."""
        conn = self._writer
        with disk_full_reported(undone):
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise

    def _rollback(self) -> None:
        """Undo the open transaction, if any: SQLite ends it itself when a COMMIT fails (a full
        disk), and an error here must never replace the one that made us roll back."""
        if not self._writer.in_transaction:
            return
        try:
            self._writer.execute("ROLLBACK")
        except sqlite3.Error as exc:
            log.error("%s: rollback after a failed write failed too: %s", self.path, exc)

    # -- small key/value state ---------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        row = self._row("SELECT value FROM meta WHERE key = ?", (key,))
        return None if row is None else row[0]

    def set_meta(self, key: str, value: str) -> None:
        self._writer.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    def _advance(self, seq: int, to: int) -> None:
        """Move the last sequence number from ``seq`` to ``to`` in the open write transaction, and
        mark the change with a random token (``commit_token``): a snapshot records the token of
        the last change it covers, so a store restored from another point of the same history
        (two backups, and writes in between) cannot pass its snapshot off as its own just by
        having as many writes (an outside test served other images' vectors under the ids)."""
        if to == seq:
            return
        self.set_meta("seq", str(to))
        self._writer.execute("INSERT OR REPLACE INTO commits(seq, token) VALUES (?, ?)", (to, os.urandom(8)))

    def snapshot_token(self, seq: int) -> bytes:
        """The token a snapshot covering the store's writes up to ``seq`` records: that change's
        own, or one made now when it has none (made before stores kept them, or an empty store),
        so that every snapshot can prove which history it covers. The caller holds the writer."""
        self._writer.execute("INSERT OR IGNORE INTO commits(seq, token) VALUES (?, ?)", (seq, os.urandom(8)))
        return bytes(self._writer.execute("SELECT token FROM commits WHERE seq = ?", (seq,)).fetchone()[0])

    def commit_token(self, seq: int) -> bytes | None:
        """The token of the change that ended at ``seq`` (``_advance``), None if there is none: no
        change ends there, or it was made before stores kept them, or pruned (``prune_removals``)."""
        try:
            row = self._row("SELECT token FROM commits WHERE seq = ?", (seq,))
        except sqlite3.OperationalError as exc:
            if "no such table" not in str(exc):
                raise
            return None
        return None if row is None else bytes(row[0])

    def _identity(self) -> str:
        """A random id made once per store, kept in it: a snapshot records the id of the store it
        was made from, so one copied from another collection, or left over when an older copy of
        this store was restored, is never mistaken for this store's own."""
        identity = self.get_meta("store_id")
        if identity is None:
            identity = uuid.uuid4().hex
            self.set_meta("store_id", identity)
        return identity

    def last_seq(self) -> int:
        value = self.get_meta("seq")
        return int(value) if value is not None else 0

    # -- writes ------------------------------------------------------------------
    def existing_ids(self, ids: Sequence[str]) -> set[str]:
        rows = self._rows(f"SELECT id FROM images WHERE id IN {ANY_OF}", (any_of(ids),))
        return {r[0] for r in rows}

    def insert(self, images: Sequence[NewImage]) -> tuple[list[int], list[int]]:
        """Insert all rows in one transaction (``insert_many``); return (row_ids, seqs).

        Row ids are given explicitly, continuing after the largest ever used (what
        AUTOINCREMENT would pick), so they are known without a query per row. An id
        already stored raises AlreadyExists and the whole batch rolls back.
        """
        now = time.time()
        # A batch of bare vectors leaves the image columns to their defaults: fewer values to bind
        # (bound holding the GIL), and the rows are made before the writer's transaction opens.
        with_image = any(
            i.thumbnail is not None or i.original is not None or i.width or i.height for i in images
        )
        columns = "id, label, metadata, vector, created" + (
            ", thumbnail, original, width, height" if with_image else ""
        )
        payloads = [
            (
                image.id,
                image.label,
                json.dumps(image.metadata, sort_keys=True) if image.metadata else "{}",
                np.asarray(image.vector, dtype=np.float32).tobytes(),
                now,
                *((image.thumbnail, image.original, image.width, image.height) if with_image else ()),
            )
            for image in images
        ]
        with self._transaction() as conn:
            seq, last_row_id = self._tail()
            first = last_row_id + 1
            rows = [(first + offset, seq + 1 + offset, *payload) for offset, payload in enumerate(payloads)]
            try:
                insert_many(conn, f"INSERT INTO images(row_id, seq, {columns}) VALUES ", rows)
            except sqlite3.IntegrityError as exc:
                ids = [image.id for image in images]
                # What a committed batch (the reader cannot see this transaction) or this batch itself holds.
                taken = [i for n, i in enumerate(ids) if i in ids[:n]] + sorted(self.existing_ids(ids))
                raise AlreadyExists(
                    f"image id {shown(taken[0]) if taken else '(unknown)'} already exists",
                    reason="IMAGE_EXISTS",
                ) from exc
            local = [(row[0], image.local) for row, image in zip(rows, images, strict=True) if image.local]
            if local:
                insert_many(conn, "INSERT INTO local_features(row_id, data) VALUES ", local)
            self._advance(seq, seq + len(images))
        return [row[0] for row in rows], [row[1] for row in rows]

    def _tail(self) -> tuple[int, int]:
        """(last sequence number, largest row id ever used, deleted rows included: ids are never
        reused), read in the open write transaction on the writer's own connection (a reader would
        first catch up with the commits since its last read), by one statement (each statement
        lets go of the GIL and must win it back: ``insert_many``)."""
        seq, used, largest = self._writer.execute(
            "SELECT (SELECT value FROM meta WHERE key = 'seq'),"
            " (SELECT seq FROM sqlite_sequence WHERE name = 'images'), (SELECT MAX(row_id) FROM images)"
        ).fetchone()
        return int(seq or 0), max(used or 0, largest or 0)

    def delete(self, ids: Sequence[str]) -> list[int]:
        """Delete rows by id in one transaction, logging each removal with a sequence number."""
        with self._transaction("nothing was removed") as conn:
            seq, _ = self._tail()
            first = seq
            removed: list[int] = []
            for image_id in ids:
                row = conn.execute("SELECT row_id FROM images WHERE id = ?", (image_id,)).fetchone()
                if row is None:
                    continue
                seq += 1
                conn.execute("DELETE FROM images WHERE row_id = ?", (row[0],))
                conn.execute("DELETE FROM local_features WHERE row_id = ?", (row[0],))
                conn.execute("INSERT INTO removals(seq, row_id) VALUES (?, ?)", (seq, row[0]))
                removed.append(int(row[0]))
            self._advance(first, seq)
        return removed

    def reencode(self, spec_json: str, state: bytes, vectors: dict[int, np.ndarray]) -> int:
        """Commit a refitted extractor in one transaction: its state, the spec naming its version
        and every row's new vector. Returns the change's sequence number. Before the commit
        nothing has changed; after it, everything has (the index is then rebuilt)."""
        with self._transaction("the training was not committed (the collection is as it was)") as conn:
            conn.executemany(
                "UPDATE images SET vector = ? WHERE row_id = ?",
                ((np.asarray(v, dtype=np.float32).tobytes(), int(r)) for r, v in vectors.items()),
            )
            conn.execute("INSERT OR REPLACE INTO extractor_state(slot, data) VALUES (1, ?)", (state,))
            conn.execute("DELETE FROM index_learnt")  # learnt from the vectors replaced here
            self.set_meta("spec", spec_json)
            seq = self._tail()[0] + 1
            self._advance(seq - 1, seq)
        return seq

    def keep_learnt(self, learnt: np.ndarray) -> None:
        """Keep what the index learnt (``VectorIndex.learnt``). On a connection of its own: it is
        written during an add's index update, while the next add may be committing on the writer
        (SQLite's lock orders the two; that add waits for this one's update only after its commit)."""
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(learnt, np.float32), allow_pickle=False)
        conn = _connect(self.path, create=False)
        try:
            with disk_full_reported("what the index learnt was not kept (a rebuild learns it again)"):
                conn.execute(
                    "INSERT OR REPLACE INTO index_learnt(slot, data) VALUES (1, ?)", (buffer.getvalue(),)
                )
        finally:
            conn.close()

    def learnt(self) -> np.ndarray | None:
        """What the index learnt, as ``keep_learnt`` kept it; None if nothing was (or the store is
        read without the tables later versions brought)."""
        try:
            row = self._row("SELECT data FROM index_learnt WHERE slot = 1")
        except sqlite3.OperationalError as exc:
            if "no such table" not in str(exc):
                raise
            return None
        return None if row is None else np.load(io.BytesIO(row[0]), allow_pickle=False)

    def set_extractor_state(self, state: bytes) -> None:
        self._writer.execute("INSERT OR REPLACE INTO extractor_state(slot, data) VALUES (1, ?)", (state,))

    def prune_removals(self, upto_seq: int) -> None:
        """Forget removals an index snapshot already covers, and the commit tokens before its own."""
        self._writer.execute("DELETE FROM removals WHERE seq <= ?", (upto_seq,))
        self._writer.execute("DELETE FROM commits WHERE seq < ?", (upto_seq,))

    # -- reads -------------------------------------------------------------------
    def count(self, label: str | None = None) -> int:
        if label:
            sql, args = "SELECT COUNT(*) FROM images WHERE label = ?", (label,)
        else:
            sql, args = "SELECT COUNT(*) FROM images", ()
        return int(self._row(sql, args)[0])

    def get(
        self, image_id: str, *, with_original: bool = False, with_vector: bool = False
    ) -> ImageRow | None:
        row = self._row(
            "SELECT row_id, id, label, metadata, width, height, created, thumbnail, original, vector"
            " FROM images WHERE id = ?",
            (image_id,),
        )
        if row is None:
            return None
        return ImageRow(
            row_id=row[0],
            id=row[1],
            label=row[2],
            metadata=json.loads(row[3]),
            width=row[4],
            height=row[5],
            created=row[6],
            thumbnail=row[7],
            original=row[8] if with_original else None,
            vector=np.frombuffer(row[9], dtype=np.float32).copy() if with_vector else None,
        )

    def vector_of(self, image_id: str) -> tuple[int, np.ndarray] | None:
        row = self._row("SELECT row_id, vector FROM images WHERE id = ?", (image_id,))
        if row is None:
            return None
        return int(row[0]), np.frombuffer(row[1], dtype=np.float32).copy()

    def rows_by_row_id(self, row_ids: Sequence[int]) -> dict[int, HitRow]:
        """Id, label and metadata of search hits, keyed by row id. Only the columns stored before
        the vector: reading one after it would walk the vector's overflow pages (~0.4 ms for 10
        hits instead of ~0.1)."""
        if len(row_ids) == 0:
            return {}
        rows = self._rows(
            f"SELECT row_id, id, label, metadata FROM images WHERE row_id IN {ANY_OF}", (any_of(row_ids),)
        )
        return {r[0]: HitRow(r[0], r[1], r[2], {} if r[3] == "{}" else json.loads(r[3])) for r in rows}

    def vectors_by_row_id(self, row_ids: Sequence[int]) -> dict[int, np.ndarray]:
        """Raw float32 vectors keyed by row id (rows deleted meanwhile are absent)."""
        if len(row_ids) == 0:
            return {}
        rows = self._rows(f"SELECT row_id, vector FROM images WHERE row_id IN {ANY_OF}", (any_of(row_ids),))
        return {r[0]: np.frombuffer(r[1], dtype=np.float32) for r in rows}

    def row_ids_with_labels(self, labels: Sequence[str], upto_seq: int) -> np.ndarray:
        """Row ids with one of ``labels`` among rows written up to ``upto_seq`` (the ones the index
        holds: a commit the index has not applied yet is left out), ascending: the order the rows
        were stored in, which a filtered search's equal scores keep (docs/api.md)."""
        # SQLite's json_each cuts a string at a NUL character, so a label holding one (accepted, and
        # stored whole) is bound on its own: "a\x00b" matched the images labelled "a" (an outside test).
        plain = [label for label in labels if "\x00" not in label]
        queries = (
            [(f"SELECT row_id FROM images WHERE label IN {ANY_OF} AND seq <= ?", any_of(plain))]
            if plain
            else []
        )
        queries += [
            ("SELECT row_id FROM images WHERE label = ? AND seq <= ?", label)
            for label in labels
            if "\x00" in label
        ]
        found = [row[0] for sql, value in queries for row in self._rows(sql, (value, upto_seq))]
        return np.unique(np.array(found, dtype=np.int64))

    def page(self, after_row_id: int, limit: int, label: str | None = None) -> list[ImageRow]:
        """Rows in insertion order after ``after_row_id`` (keyset pagination: stable under concurrent writes)."""
        sql = "SELECT row_id, id, label, metadata, width, height, created FROM images WHERE row_id > ?"
        args: list[object] = [after_row_id]
        if label:
            sql += " AND label = ?"
            args.append(label)
        sql += " ORDER BY row_id LIMIT ?"
        args.append(limit)
        return [ImageRow(r[0], r[1], r[2], json.loads(r[3]), r[4], r[5], r[6]) for r in self._rows(sql, args)]

    def iter_vectors(
        self, after_seq: int = 0, chunk: int = 4096, upto_seq: int | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
        """Yield (row_ids, raw vectors, their seqs) in seq order for rows added after ``after_seq``
        (and up to ``upto_seq``, when given)."""
        last = after_seq
        upto = MAX_SEQ if upto_seq is None else upto_seq
        while True:
            rows = self._rows(
                "SELECT row_id, vector, seq FROM images WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?",
                (last, upto, chunk),
            )
            if not rows:
                return
            ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
            vectors = np.stack([np.frombuffer(r[1], dtype=np.float32) for r in rows])
            seqs = np.fromiter((r[2] for r in rows), dtype=np.int64, count=len(rows))
            last = int(seqs[-1])
            yield ids, vectors, seqs

    def iter_labelled(self, chunk: int = 4096) -> Iterator[tuple[np.ndarray, list[str], np.ndarray]]:
        """Yield (row_ids, labels, raw vectors) of every labelled row, in row order."""
        last = 0
        while True:
            rows = self._rows(
                "SELECT row_id, label, vector FROM images WHERE label != '' AND row_id > ? ORDER BY row_id LIMIT ?",
                (last, chunk),
            )
            if not rows:
                return
            last = rows[-1][0]
            ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
            yield ids, [r[1] for r in rows], np.stack([np.frombuffer(r[2], dtype=np.float32) for r in rows])

    def extractor_state(self) -> bytes | None:
        row = self._row("SELECT data FROM extractor_state WHERE slot = 1")
        return None if row is None else bytes(row[0])

    def local_features_of(self, row_ids: Sequence[int]) -> dict[int, bytes]:
        """Stored local features by row id (rows without any are absent)."""
        rows = self._rows(
            f"SELECT row_id, data FROM local_features WHERE row_id IN {ANY_OF}", (any_of(row_ids),)
        )
        return {r: bytes(d) for r, d in rows}

    def local_row_ids(self) -> np.ndarray:
        """Row ids of every image with local features, ascending."""
        rows = self._rows("SELECT row_id FROM local_features ORDER BY row_id")
        return np.fromiter((r[0] for r in rows), dtype=np.int64)

    def local_features_bytes(self) -> int:
        return int(self._row("SELECT COALESCE(SUM(LENGTH(data)), 0) FROM local_features")[0])

    def removals_after(self, seq: int, upto_seq: int | None = None) -> list[tuple[int, int]]:
        """(seq, row_id) of removals logged after ``seq`` (and up to ``upto_seq``, when given)."""
        rows = self._rows(
            "SELECT seq, row_id FROM removals WHERE seq > ? AND seq <= ? ORDER BY seq",
            (seq, MAX_SEQ if upto_seq is None else upto_seq),
        )
        return [(int(s), int(r)) for s, r in rows]
