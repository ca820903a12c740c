"""Opaque page tokens (AIP-158): where a listing continues, bound to the listing they came from.

A token is base64 of "v1:<scope key>:<position>". The scope key ties it to one
listing (a collection and a label filter, or the collection list), so a token
replayed against another listing is refused instead of silently skipping rows.
"""

from __future__ import annotations

import base64
import binascii
import hashlib

from imagesearch.server.errors import InvalidArgument

MAX_ROW_ID = 2**63 - 1  # SQLite's INTEGER range


def row_position(after: str) -> int:
    """A listing position from a page token: a row id SQLite can hold, else BAD_PAGE_TOKEN."""
    if after.isascii() and after.isdigit() and int(after) <= MAX_ROW_ID:
        return int(after)
    raise InvalidArgument("page_token is invalid", field="page_token", reason="BAD_PAGE_TOKEN")


def _scope_key(scope: str) -> str:
    return hashlib.sha256(scope.encode()).hexdigest()[:12]


def encode_page_token(after: str, scope: str) -> str:
    """An opaque token: continue after ``after`` in the listing identified by ``scope``."""
    return base64.urlsafe_b64encode(f"v1:{_scope_key(scope)}:{after}".encode()).decode()


def decode_page_token(token: str, scope: str) -> str | None:
    """The position to continue after (None for the first page); InvalidArgument for a foreign token."""
    if not token:
        return None
    try:
        version, key, after = base64.urlsafe_b64decode(token.encode()).decode().split(":", 2)
        if version != "v1" or key != _scope_key(scope):
            raise ValueError
        return after
    except (ValueError, UnicodeDecodeError, binascii.Error) as exc:
        raise InvalidArgument(
            "page_token is invalid or belongs to a different listing (collection or filter changed)",
            field="page_token",
            reason="BAD_PAGE_TOKEN",
        ) from exc
