"""Open file descriptors: the server's budget for them, so that clients cannot exhaust it.

Each collection holds SQLite connections, and each connection file descriptors; a client that
created a few hundred collections ran the server out of them (an outside test): every call then
failed INTERNAL, health checks timed out, and a restart under the same limit either did not start
or marked most collections damaged, advising to delete them. So the server raises its soft limit to
the hard one at start, refuses to start with collections it could not open, and refuses
CreateCollection (RESOURCE_EXHAUSTED) past what its limit allows.
"""

from __future__ import annotations

import errno
import os
import resource

from imagesearch.server.store import MAX_READERS

# Kept for everything else: client connections (one each), model files, snapshots being written,
# logs, the plugins' own files.
RESERVED = 256
# A collection at most: its writer (database, WAL, shared memory) and MAX_READERS readers (database
# and WAL each; SQLite keeps a closed reader's database descriptor open for reuse).
PER_COLLECTION = 3 + 2 * MAX_READERS
# A collection just opened: the writer and the reader that loaded its index.
AT_OPEN = 5
# The most the soft limit is raised to when the hard one is unlimited.
CEILING = 1 << 20

SEE = "raise it (ulimit -n, or LimitNOFILE= for a systemd service) and restart the server"


class NotEnoughDescriptors(RuntimeError):
    """The open-files limit cannot hold the collections the data directory has."""


def raise_soft_limit() -> int:
    """Raise this process's soft open-files limit to its hard limit (as Go programs do at start);
    return the limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = CEILING if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError):
            return soft
        return wanted
    return soft


def open_files_limit() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return CEILING if soft == resource.RLIM_INFINITY else soft


def collections_allowed(limit: int) -> int:
    """How many collections a server with ``limit`` open files can serve under any load."""
    return max(0, (limit - RESERVED) // PER_COLLECTION)


def check_can_open(collections: int, limit: int) -> None:
    """Refuse to start (NotEnoughDescriptors) with more collections than ``limit`` can open."""
    needed = collections * AT_OPEN + RESERVED
    if needed > limit:
        raise NotEnoughDescriptors(
            f"the data directory holds {collections} collections, which need at least {needed} open "
            f"files; this process may open {limit}: {SEE} (about {PER_COLLECTION} a collection "
            "under load)"
        )


def out_of_descriptors() -> bool:
    """Whether this process cannot open one more file right now (EMFILE, or the system's ENFILE):
    what SQLite reports only as "unable to open database file"."""
    try:
        os.close(os.open(os.devnull, os.O_RDONLY))
    except OSError as exc:
        return exc.errno in (errno.EMFILE, errno.ENFILE)
    return False


def out_of_descriptors_said() -> str:
    """What to tell an operator when ``out_of_descriptors``."""
    return f"the server has run out of open files (its limit is {open_files_limit()}): {SEE}"
