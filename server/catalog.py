"""The data directory: which collections exist, and the lock that makes it ours.

Layout: ``<data>/LOCK`` (flock held for the life of the process, with our pid
inside for the error message) and ``<data>/collections/<name>/`` per
collection. Creation builds the directory under a temporary name and renames
it into place; deletion renames it away first. Either way a crash never
leaves a half-made collection under a real name.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from imagesearch.plugins.manager import PluginRegistry, Registered
from imagesearch.plugins.types import (
    ALL_INDEX_TYPES,
    FLAT,
    Extractor,
    LocalFeatures,
    Metric,
    TrainableExtractor,
)
from imagesearch.server.collection import (
    NAME_PATTERN,
    NAME_RULE,
    SNAPSHOT_ERRORS,
    STORE_FILE,
    Collection,
    CollectionInfo,
    CollectionSpec,
    check_collection_name,
    check_index_params,
    index_params,
)
from imagesearch.server.config import Limits
from imagesearch.server.descriptors import (
    PER_COLLECTION,
    RESERVED,
    SEE,
    NotEnoughDescriptors,
    check_can_open,
    collections_allowed,
    open_files_limit,
    out_of_descriptors,
    out_of_descriptors_said,
)
from imagesearch.server.errors import (
    AlreadyExists,
    DataDirLocked,
    FailedPrecondition,
    ImageSearchError,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    disk_full_reported,
    is_disk_full,
    plugin_failure,
    shown,
)
from imagesearch.server.files import fsync_dir, remove_temp_files
from imagesearch.server.store import READER_IDLE_S
from imagesearch.server.vector_index import FLOAT16, INT8, quantizable

log = logging.getLogger(__name__)

DEFAULT_COLLECTION = "default"


class DataDirLock:
    """Exclusive flocks on the data directory itself and on ``<data>/LOCK`` (which keeps the
    owner's pid for the message a second server prints); released by the OS if the process dies.

    The directory's own lock is the one that cannot be taken away: a file lock alone went with
    the file, and a LOCK deleted by hand (a kill -9 leaves it, pid and all, which invites it) let
    a second server open the same collections beside the first, whose indexes then disagreed and
    whose adds went into a collection the other had deleted (an outside test). The file keeps its
    lock too, so a server of an earlier version, which locks only the file, is kept out as well."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "LOCK"
        self._fds: list[int] = []
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
            directory = os.open(data_dir, os.O_RDONLY | os.O_DIRECTORY)
            self._fds.append(directory)
            self._lock(directory, data_dir)
            lock_file = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            self._fds.append(lock_file)
            self._lock(lock_file, data_dir)
            os.ftruncate(lock_file, 0)
            os.pwrite(lock_file, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:
            self.release()
            if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise DataDirLocked(
                    f"data directory {data_dir} cannot be written ({exc.strerror}): the server keeps its "
                    "collections there and must write them; mount it read-write, give this user write "
                    "access, or point --data (IMAGESEARCH_DATA) elsewhere"
                ) from None
            raise
        except DataDirLocked:
            self.release()
            raise

    def _lock(self, fd: int, data_dir: Path) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = "unknown"
            with suppress(OSError):
                holder = self.path.read_text(errors="replace").strip() or holder
            raise DataDirLocked(
                f"data directory {data_dir} is in use by another process (pid {holder})"
            ) from None

    def release(self) -> None:
        for fd in self._fds:
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)
        self._fds = []


class Catalog:
    def __init__(self, data_dir: Path, registry: PluginRegistry, limits: Limits | None = None) -> None:
        self.data_dir = data_dir
        self.registry = registry
        self.limits = limits or Limits()
        self._lock = DataDirLock(data_dir)
        self._root = data_dir / "collections"
        self._root.mkdir(exist_ok=True)
        self._collections: dict[str, Collection] = {}
        # Collections on disk that cannot be opened at all, with the reason: reported, never hidden,
        # and never a reason to stop serving the others.
        self._unavailable: dict[str, str] = {}
        self._no_default = ""  # why the default collection was not made, for its NOT_FOUND (ensure_default)
        self._mutex = threading.Lock()
        try:
            self._clean_leftovers()
            found = [p for p in sorted(self._root.iterdir()) if p.is_dir() and not p.name.startswith(".")]
            check_can_open(len(found), open_files_limit())  # not half of them, the rest "damaged"
            for path in found:
                _remove_temp_files(path)
                self._open_or_report(path)
        except BaseException:
            self.close()
            raise

    def _open_or_report(self, path: Path) -> None:
        try:
            self._open(path)
        except MisplacedCollection as exc:
            self._report_unavailable(path.name, str(exc))
        except (sqlite3.DatabaseError, ValueError, TypeError, OSError) as exc:
            if out_of_descriptors():  # not the collection's fault: say so, and do not serve half
                raise NotEnoughDescriptors(
                    f"collection {path.name} cannot be opened ({exc}): {out_of_descriptors_said()}"
                ) from exc
            self._report_unavailable(path.name, _why_unopenable(path, exc))

    def _report_unavailable(self, name: str, reason: str) -> None:
        self._unavailable[name] = reason
        log.error("collection %s is unavailable: %s", name, reason)

    def _clean_leftovers(self) -> None:
        """Remove half-created and half-deleted collections from an earlier crash."""
        for path in self._root.iterdir():
            if path.name.startswith((".creating-", ".deleting-")):
                log.info("removing leftover %s", path)
                shutil.rmtree(path, ignore_errors=True)

    def _loaded_extractor(self, spec: CollectionSpec) -> tuple[Extractor | None, str]:
        """The registered extractor of the spec's name, warmed up (the collection checks its version),
        or None and why: the collection's errors and GetCollection say it, not only this log."""
        registered = self.registry.extractors.get(spec.extractor)
        if registered is None:
            problem = "it is not loaded" + _because(self.registry.problems_naming(spec.extractor))
            log.warning("collection %s: extractor %s: %s", spec.name, spec.extractor, problem)
            return None, problem
        try:
            registered.item.warm_up()
        except Exception as exc:  # a replaced or corrupt model: refuse image queries, keep the data
            log.error("collection %s: extractor %s cannot start: %s", spec.name, spec.extractor, exc)
            return None, f"it cannot start: {exc}"
        return registered.item, ""

    def _open(self, path: Path) -> None:
        spec = Collection.read_spec(path)
        if spec.name != path.name:
            # Collections are found by directory and served by the name their store holds: a copy
            # beside the original would take its name (and its writes, and its deletion), a renamed
            # one would keep serving under the old name (an outside test lost data both ways).
            raise MisplacedCollection(
                f"its store belongs to collection {spec.name!r}, not {path.name!r}: the directory was "
                f"copied or renamed. Nothing was changed; rename it back to {spec.name!r} (if that "
                f"collection is not there already) or move it out of {self._root}, and restart the "
                "server"
            )
        unwritable = _unwritable_store_files(path)
        if unwritable:  # SQLite would open it read-only without a word, and fail every write
            raise PermissionError(f"no read-write access to {unwritable[0]}")
        metric = self.registry.metrics.get(spec.metric)
        if metric is None:
            self._report_unavailable(
                path.name, f"it needs metric {spec.metric!r}, which no loaded plugin provides"
            )
            return
        started = time.monotonic()
        extractor, extractor_problem = self._loaded_extractor(spec)
        collection = Collection(path, spec, metric.item, extractor, self._local(spec), extractor_problem)
        try:
            count = collection.count()  # a store whose spec reads may still be damaged past it
        except sqlite3.DatabaseError:
            collection.close(snapshot=False)
            raise
        collection.store.close_idle_readers()  # the reader that loaded the index: its WAL descriptor goes
        self._collections[spec.name] = collection
        log.info(
            "collection %s loaded: %d images in %.1f ms",
            spec.name,
            count,
            (time.monotonic() - started) * 1000,
        )

    # -- queries -------------------------------------------------------------------
    def get(self, name: str, field: str = "collection") -> Collection:
        """The serving collection ``name`` ("" for the default); ``field`` names the request field
        that gave it (``name`` for the calls on a collection itself) in the error when there is none:
        INVALID_ARGUMENT for a name no collection can have (NOT_FOUND said it might exist: an
        outside test), FAILED_PRECONDITION for one that cannot serve, else NOT_FOUND."""
        name = name or DEFAULT_COLLECTION
        collection = self._collections.get(name)
        if collection is None or collection.closed:
            if name in self._unavailable:
                raise FailedPrecondition(
                    f"collection {name!r} is unavailable: {self._unavailable[name]}",
                    field=field,
                    reason="COLLECTION_UNAVAILABLE",
                )
            if not NAME_PATTERN.fullmatch(name):
                raise InvalidArgument(
                    f"invalid collection name {shown(name)}: {NAME_RULE}",
                    field=field,
                    reason="BAD_COLLECTION_NAME",
                )
            why = self._no_default if name == DEFAULT_COLLECTION else ""
            raise NotFound(
                f"collection {shown(name)} not found{why}", field=field, reason="COLLECTION_NOT_FOUND"
            )
        return collection

    def problem(self, name: str) -> str | None:
        """Why a collection cannot serve searches ("" when it can); None if there is no such collection."""
        if name in self._unavailable:
            return self._unavailable[name]
        collection = self._collections.get(name)
        return None if collection is None else collection.problem

    def list(self) -> list[Collection]:
        return sorted(self._collections.values(), key=lambda c: c.spec.name)

    def unavailable(self) -> dict[str, str]:
        """Collections on disk that could not be opened, by name, each with its reason."""
        with self._mutex:
            return dict(sorted(self._unavailable.items()))

    def _local(self, spec: CollectionSpec) -> LocalFeatures | None:
        registered = self.registry.local_features.get(spec.local_features) if spec.local_features else None
        return None if registered is None else registered.item

    def local_features(self, name: str) -> LocalFeatures:
        """The registered local features ``name``, or INVALID_ARGUMENT listing the available ones."""
        return _registered(
            self.registry.local_features,
            "local features",
            name,
            "collection.local_features",
            self.registry.problems_naming(name),
        )

    def extractor(self, name: str) -> Extractor:
        """The registered extractor ``name``, or INVALID_ARGUMENT listing the available ones (and
        why a model-backed one may be missing: a plugin problem, or no models directory at all)."""
        problems = self.registry.problems_naming(name)
        missing = self.registry.missing_models_dir()
        if missing is not None:
            problems.append(
                f"the models directory {missing} does not exist, so no model-backed extractor is loaded: "
                "`make models` builds the default models there, `imagesearch model export NAME` one, or "
                "point --models (IMAGESEARCH_MODELS) at them"
            )
        return _registered(self.registry.extractors, "extractor", name, "extractor", problems)

    def metric(self, name: str) -> Metric:
        """The registered metric ``name``, or INVALID_ARGUMENT listing the available ones."""
        return _registered(
            self.registry.metrics, "metric", name, "metric", self.registry.problems_naming(name)
        )

    # -- changes -------------------------------------------------------------------
    def create(
        self,
        name: str,
        *,
        extractor: str,
        metric: str = "",
        index_type: str = FLAT,
        params: dict[str, int] | None = None,
        store_originals: bool = False,
        description: str = "",
        storage: str = "",
        local_features: str = "",
        before_commit: Callable[[], None] | None = None,
    ) -> CollectionInfo:
        """Validate, stage the collection's files, then make it visible with one rename; return
        what it is.
        ``before_commit`` runs just before that rename and may raise to stop it (a caller's
        deadline: nothing is created)."""
        check_collection_name(name)
        chosen = self.extractor(extractor)
        if isinstance(chosen, TrainableExtractor):
            if local_features and local_features != chosen.local_features:
                raise InvalidArgument(
                    f"extractor {chosen.name!r} encodes local features {chosen.local_features!r}, "
                    f"not {shown(local_features)}; leave local_features empty",
                    field="collection.local_features",
                    reason="LOCAL_FEATURES_MISMATCH",
                )
            local_features = chosen.local_features
        local = self.local_features(local_features) if local_features else None
        try:
            with plugin_failure(f"extractor {shown(extractor)}", "EXTRACTOR_UNAVAILABLE"):
                chosen.warm_up()  # in a worker thread: a KeyboardInterrupt there stopped the event loop
        except Internal as exc:
            raise FailedPrecondition(
                f"extractor {shown(extractor)} cannot start: {exc.message}",
                field="extractor",
                reason="EXTRACTOR_UNAVAILABLE",
            ) from exc
        metric = metric or chosen.default_metric
        metric_obj = self.metric(metric)
        if index_type not in ALL_INDEX_TYPES:
            raise InvalidArgument(
                f"unknown index_type {shown(index_type)} (available: {', '.join(sorted(ALL_INDEX_TYPES))})",
                field="collection.index_type",
                reason="UNKNOWN_INDEX_TYPE",
            )
        if index_type not in metric_obj.index_types:
            raise FailedPrecondition(
                f"metric {metric!r} supports index types {sorted(metric_obj.index_types)}, not {index_type!r}",
                field="index_type",
                reason="METRIC_INDEX_MISMATCH",
            )
        if storage in (FLOAT16, INT8) and not quantizable(metric_obj):
            raise FailedPrecondition(
                f"storage {storage} keeps quantised vectors, which FAISS searches by L2 and inner product "
                f"only; metric {metric!r} needs float32 storage",
                field="collection.storage",
                reason="METRIC_STORAGE_MISMATCH",
            )
        spec = CollectionSpec(
            name=name,
            extractor=chosen.name,
            extractor_version=chosen.version,
            extractor_base_version=chosen.base_version if isinstance(chosen, TrainableExtractor) else "",
            local_features=local.name if local else "",
            local_features_version=local.version if local else "",
            metric=metric,
            dim=chosen.dim,
            index_type=index_type,
            store_originals=store_originals,
            **({"storage": storage} if storage else {}),  # "": the spec's default, float32
            description=description,
            **index_params(index_type, params or {}, self.limits),
        )
        check_index_params(spec, self.limits)
        with self._mutex:
            if name in self._collections or name in self._unavailable:
                raise AlreadyExists(
                    f"collection {name!r} already exists", field="name", reason="COLLECTION_EXISTS"
                )
            self._check_room_for_one_more()
            if (self._root / name).exists():  # a file, or a directory the server skipped at start
                raise FailedPrecondition(
                    f"{self._root / name} is in the way and is not a collection: move it away first",
                    field="name",
                    reason="COLLECTION_PATH_TAKEN",
                )
            staging = self._root / f".creating-{name}"
            shutil.rmtree(staging, ignore_errors=True)
            with disk_full_reported(f"collection {name!r} was not created"), _discarded_on_failure(staging):
                Collection.create(staging, spec, metric_obj, chosen, local).close(snapshot=False)
                if before_commit is not None:  # may raise: the staging directory is discarded
                    before_commit()
                os.replace(staging, self._root / name)
            fsync_dir(self._root)
            collection = Collection(self._root / name, spec, metric_obj, chosen, local)
            self._collections[name] = collection
            info = collection.info()  # before another caller can delete it (and answer NOT_FOUND for it)
        log.info(
            "collection %s created: %s %s, %s, %s", name, chosen.name, chosen.version, metric, index_type
        )
        return info

    def delete(self, name: str) -> None:
        """Delete a collection, an unavailable one included (that is how an operator clears it)."""
        with self._mutex:
            if name in self._unavailable:
                directory = self._root / name
                del self._unavailable[name]
            else:
                collection = self.get(name, "name")
                unmovable = _why_unmovable(collection.directory)
                if unmovable:  # refused while it still serves: nothing to reopen, no restart to advise
                    raise FailedPrecondition(
                        f"collection {name!r} was not deleted: its directory {collection.directory} cannot "
                        f"be moved ({unmovable}); it is untouched and still served. Make its parent "
                        "directory writable or unmount it, then delete it again",
                        field="name",
                        reason="DELETE_REFUSED",
                    )
                collection.close(snapshot=False)
                del self._collections[collection.spec.name]
                directory = collection.directory
            doomed = self._root / f".deleting-{name}-{time.time_ns()}"
            try:
                os.replace(directory, doomed)
            except OSError as exc:  # unmovable after all (the checks above cannot foresee every refusal):
                # reopened (or reported unavailable, as at start-up, if it can no longer be served)
                self._open_or_report(directory)
                raise FailedPrecondition(
                    f"collection {name!r} was not deleted: its directory {directory} cannot be moved "
                    f"({exc.strerror or exc}); its data is untouched. Stop the server, make its parent "
                    "writable or unmount it, start the server, then delete it again",
                    field="name",
                    reason="DELETE_REFUSED",
                ) from exc
            fsync_dir(self._root)
        shutil.rmtree(doomed, onerror=_leftover_reported)
        log.info("collection %s deleted", name)

    def ensure_default(self, extractor: str) -> None:
        """Create the zero-setup ``default`` collection (default CNN + cosine) if it is missing."""
        if DEFAULT_COLLECTION in self._collections or DEFAULT_COLLECTION in self._unavailable:
            return  # an unavailable one (a full disk at start-up) is reported, not made again over it
        if extractor not in self.registry.extractors:  # said at start-up (app.default_extractor_reported)
            self._no_default = (
                f"; it is made at start-up with default_extractor {extractor!r}, which is not loaded "
                "(see the server's start-up log)"
            )
            return
        try:
            self.create(
                DEFAULT_COLLECTION, extractor=extractor, metric="cosine", description="zero-setup collection"
            )
        except ImageSearchError as exc:  # never a reason not to start: the others serve
            # (a full collection budget or disk stopped start-up with a traceback: an outside test)
            log.error("default collection not created: %s", exc.message)
            self._no_default = f"; it was not created at start-up: {exc.message}"

    def snapshot_due(self, every_ops: int, interval_s: float) -> None:
        for collection in list(self._collections.values()):
            try:
                collection.snapshot_if_due(every_ops, interval_s)
            except SNAPSHOT_ERRORS as exc:
                log.error("collection %s: snapshot failed: %s", collection.spec.name, exc)

    def collections_allowed(self) -> int:
        """How many collections this server takes: ``max_collections``, or fewer if its open-files
        limit cannot hold that many under load (``descriptors``)."""
        return min(self.limits.max_collections, collections_allowed(open_files_limit()))

    def _check_room_for_one_more(self) -> None:
        """RESOURCE_EXHAUSTED when one more collection would pass ``collections_allowed``."""
        held = len(self._collections) + len(self._unavailable)
        allowed = self.collections_allowed()
        if held < allowed:
            return
        why = (
            "the limit max_collections: delete one first, or raise the limit"
            if allowed == self.limits.max_collections
            else f"as many as its open-files limit ({open_files_limit()}) holds at {PER_COLLECTION} "
            f"descriptors a collection and {RESERVED} kept for the rest: {SEE}"
        )
        raise ResourceExhausted(
            f"the server holds {held} collections, {why}",
            reason="TOO_MANY_COLLECTIONS",
            metadata={"limit": str(allowed), "value": str(held)},
        )

    def close_idle_readers(self) -> None:
        """Close every store's reader connections unused for READER_IDLE_S: an idle collection
        gives back their WAL descriptors and page caches (``CollectionStore._take_reader``)."""
        for collection in list(self._collections.values()):
            collection.store.close_idle_readers(READER_IDLE_S)

    def close(self) -> None:
        with self._mutex:
            for collection in self._collections.values():
                collection.close()
            self._collections.clear()
        self._lock.release()


def _why_unmovable(directory: Path) -> str:
    """Why renaming ``directory`` within its parent would fail, as far as can be told without trying
    ("" if nothing is known against it): a delete checks this before it closes the collection."""
    if os.path.ismount(directory):
        return "it is a mount point"
    parent = directory.parent
    if os.statvfs(parent).f_flag & os.ST_RDONLY:
        return f"{parent} is on a read-only file system"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{parent} is not writable by this server"
    return ""


def _leftover_reported(function: object, path: str, exc_info: tuple[type, BaseException, object]) -> None:
    """A deleted collection's file that cannot be removed now: said, and removed at the next start."""
    log.warning("could not remove %s (%s); the next start removes it", path, exc_info[1])


LOW_DISK_BYTES = 1 << 20
"""Below this much free space a store that cannot be opened is taken as stopped by a full disk."""


class MisplacedCollection(ValueError):
    """A collection directory whose store belongs to another name (copied or renamed)."""


def _why_unopenable(directory: Path, exc: Exception) -> str:
    """Why a collection cannot be opened, with advice that fits the cause: deleting the collection
    is suggested only for a damaged store, never for intact data the server may not write or a
    store that was moved away (opening never creates one: CollectionStore(create=False))."""
    store = directory / STORE_FILE
    if out_of_descriptors():
        return f"{directory} cannot be opened ({exc}): {out_of_descriptors_said()}. Nothing was changed"
    disk = os.statvfs(directory)
    if disk.f_flag & os.ST_RDONLY:
        return (
            f"{directory} is on a read-only file system ({exc}). Its data is intact: mount it "
            "read-write and restart the server"
        )
    free = disk.f_bavail * disk.f_frsize
    if is_disk_full(exc) or free < LOW_DISK_BYTES:
        # SQLite says "disk I/O error" when it cannot make its shared-memory file: the advice to
        # restore or delete intact data was wrong (an outside test, restarting on a full disk).
        return (
            f"{directory} cannot be opened ({exc}): the disk holding it is full ({free} bytes free). "
            "Nothing was changed: free space on that disk and restart the server"
        )
    if not os.access(directory, os.R_OK | os.W_OK | os.X_OK):
        return _no_access(directory, exc)
    if not store.exists():
        return (
            f"{STORE_FILE} is missing from {directory}; nothing was changed. Put the file back (or "
            "restore it from a backup) and restart the server"
        )
    unwritable = _unwritable_store_files(directory)
    if unwritable:
        return _no_access(unwritable[0], exc)
    return (
        f"{directory} cannot be opened: {exc}. Nothing was changed; restore it from a backup, or "
        "delete the collection"
    )


def _unwritable_store_files(directory: Path) -> list[Path]:
    """The store's files (the database, its WAL and shared memory) that exist but that the server
    may not read and write."""
    store = directory / STORE_FILE
    files = [store, *(store.with_name(store.name + end) for end in ("-wal", "-shm"))]
    return [f for f in files if f.exists() and not os.access(f, os.R_OK | os.W_OK)]


def _no_access(path: Path, exc: Exception) -> str:
    return (
        f"the server may not read and write {path} ({exc}). Its data is intact: give the server's "
        "user read-write access to it and restart the server"
    )


def _remove_temp_files(directory: Path) -> None:
    """Remove what writes interrupted by a crash left in a collection's directory, saying so."""
    try:
        removed = remove_temp_files(directory)
    except OSError as exc:  # a read-only or unreadable directory: opening it reports the cause
        log.warning("collection %s: leftover temp files not removed: %s", directory.name, exc)
        return
    for path, size in removed:
        log.info(
            "collection %s: removed %s (%d bytes), left by an interrupted write",
            directory.name,
            path.name,
            size,
        )


@contextmanager
def _discarded_on_failure(staging: Path) -> Iterator[None]:
    """Remove a half-made collection directory when making it fails (a full disk): the space goes
    back at once, not at the next start-up."""
    try:
        yield
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _registered(
    table: Mapping[str, Registered], kind: str, name: str, field: str, problems: Sequence[str]
) -> Any:
    """``table[name]``'s plugin object, or INVALID_ARGUMENT (reason UNKNOWN_<KIND>) listing the
    names, and the plugin problems naming ``name`` (a missing SIFT vocabulary: "unknown" alone
    sent the operator looking for a typo)."""
    registered = table.get(name)
    if registered is None:
        available = ", ".join(sorted(table)) or "none"
        raise InvalidArgument(
            f"unknown {kind} {shown(name)} (available: {available}){_because(problems)}",
            field=field,
            reason=f"UNKNOWN_{kind.upper().replace(' ', '_')}",
        )
    return registered.item


def _because(problems: Sequence[str]) -> str:
    """`` (problem; problem)`` after a message, or nothing."""
    return f" ({'; '.join(problems)})" if problems else ""
