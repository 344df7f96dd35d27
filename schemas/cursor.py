"""List orders and their cursors.

Under `-created_at` a cursor is a conversation id, as in v1. Under `-last_active_at` it is an
opaque string: base64url (unpadded) of `a<last_active_at>.<id>`, the time empty for a
conversation never active. It encodes a position, never names a row to look up.
"""

import base64
import binascii
import enum
import re
from typing import NamedTuple

from schemas.fields import CONVERSATION_ID_MESSAGE, CONVERSATION_ID_PATTERN, MAX_TIMESTAMP


class Sort(enum.StrEnum):
    """The list orders: newest first (v1's), or last activity first, never-active last."""

    CREATED = "-created_at"
    ACTIVITY = "-last_active_at"


class Position(NamedTuple):
    """A place in a list order: the id and, under the activity order, the activity time."""

    id: str
    last_active_at: int | None = None


_ID = re.compile(CONVERSATION_ID_PATTERN)
_ACTIVITY = re.compile(r"a(0|[1-9][0-9]{0,11})?\.([0-9A-Za-z]{16})")
_BASE64URL = re.compile(r"[A-Za-z0-9_-]{1,64}")
_ACTIVITY_MESSAGE = "Must be a cursor of sort=-last_active_at (from `cursors` of such a page)."


def encode(sort: Sort, position: Position) -> str:
    """The cursor of `position` under `sort`."""
    if sort is Sort.CREATED:
        return position.id
    time = "" if position.last_active_at is None else str(position.last_active_at)
    text = f"a{time}.{position.id}".encode("ascii")
    return base64.urlsafe_b64encode(text).rstrip(b"=").decode("ascii")


def _activity(cursor: str) -> Position | None:
    """The position an activity cursor encodes; None if `cursor` is not one, exactly."""
    if not _BASE64URL.fullmatch(cursor):
        return None
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except (binascii.Error, UnicodeDecodeError):
        return None
    match = _ACTIVITY.fullmatch(text)
    if match is None:
        return None
    time = None if match[1] is None else int(match[1])
    if time is not None and time > MAX_TIMESTAMP:
        return None
    position = Position(match[2], time)
    # One spelling per position: a cursor whose unused bits differ is not ours.
    return position if encode(Sort.ACTIVITY, position) == cursor else None


def decode(sort: Sort, cursor: str) -> Position:
    """The position `cursor` encodes under `sort`; ValueError (the message for the caller) if it
    is malformed or was made for the other order."""
    if sort is Sort.CREATED:
        if _ID.fullmatch(cursor):
            return Position(cursor)
        if _activity(cursor) is not None:
            raise ValueError(
                "This cursor belongs to sort=-last_active_at; "
                "with sort=-created_at a cursor is a conversation id."
            )
        raise ValueError(CONVERSATION_ID_MESSAGE)
    position = _activity(cursor)
    if position is not None:
        return position
    if _ID.fullmatch(cursor):
        raise ValueError(
            "A conversation id is a cursor of sort=-created_at; with sort=-last_active_at "
            "pass a cursor from `cursors` of a page in that order."
        )
    raise ValueError(_ACTIVITY_MESSAGE)
