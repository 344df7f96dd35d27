"""Time-ordered object ids: 8 base62 characters of creation time in ms, then 8 random ones."""

import secrets
import time

# Digits < upper case < lower case, as in ASCII, so ids sort bytewise by time.
ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_TIME_CHARS = 8
_RANDOM_CHARS = 8
_RANDOM_SPACE = len(ALPHABET) ** _RANDOM_CHARS


def _encode(number: int, width: int) -> str:
    chars = []
    for _ in range(width):
        number, digit = divmod(number, len(ALPHABET))
        chars.append(ALPHABET[digit])
    if number:
        raise ValueError("number does not fit in the width")
    return "".join(reversed(chars))


def new_id(now_ms: int | None = None) -> str:
    """A new 16-character id whose first 8 characters encode `now_ms` (default: the clock)."""
    millis = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    return _encode(millis, _TIME_CHARS) + _encode(secrets.randbelow(_RANDOM_SPACE), _RANDOM_CHARS)


def id_time_ms(object_id: str) -> int:
    """The creation time, in Unix milliseconds, that an id encodes."""
    millis = 0
    for char in object_id[:_TIME_CHARS]:
        millis = millis * len(ALPHABET) + ALPHABET.index(char)
    return millis
