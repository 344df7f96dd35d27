"""Strict field types shared by the request schemas.

JSON callers must send JSON booleans and JSON integers: marshmallow's own fields would
accept "true", 1 or "1700000000", which the contract rejects.
"""

import re
from typing import Any

from marshmallow import ValidationError, fields, validate

# Unix seconds from 1970-01-01 to 9999-12-31T23:59:59Z: what every timestamp may hold.
MAX_TIMESTAMP = 253402300799
# Ids the service generates: 8 base62 characters of time, 8 random ones.
CONVERSATION_ID_PATTERN = r"^[0-9A-Za-z]{16}$"
CONVERSATION_ID_MESSAGE = "Must be a conversation id: 16 characters of 0-9, A-Z, a-z."
# W3C Trace Context `traceparent`: version-trace id-parent id-flags, in lower-case hex.
TRACEPARENT_PATTERN = r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$"
# Ids owned by other services (contacts, groups, messages).
REFERENCE_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"


class FullMatch(validate.Regexp):
    """`validate.Regexp` that must match the whole value: its `re.match` lets `$` match before a
    final newline, so "c1\\n" would pass. The pattern stays readable for the OpenAPI document."""

    def __call__(self, value: Any) -> Any:
        if not isinstance(value, str) or self.regex.fullmatch(value) is None:
            raise ValidationError(self._format_error(value))
        return value


class StrictBoolean(fields.Boolean):
    """A boolean that accepts only JSON true/false (and never 1, "true" or "yes")."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> bool:
        if value is True or value is False:
            return value
        raise self.make_error("invalid", input=value)


def timestamp(**kwargs: Any) -> fields.Integer:
    """An integer Unix-seconds field, strict on type and range."""
    return fields.Integer(
        strict=True,
        validate=validate.Range(0, MAX_TIMESTAMP, error="Must be between {min} and {max}."),
        metadata={"description": "Unix time in seconds.", **kwargs.pop("metadata", {})},
        **kwargs,
    )


def reference_id(**kwargs: Any) -> fields.String:
    """An id of another service's object: 1 to 64 characters of [A-Za-z0-9_-]."""
    return fields.String(
        validate=FullMatch(
            REFERENCE_ID_PATTERN, error="Must be 1 to 64 characters of A-Z, a-z, 0-9, _ or -."
        ),
        **kwargs,
    )


def conversation_id(**kwargs: Any) -> fields.String:
    """A conversation id: 16 characters of [0-9A-Za-z]."""
    return fields.String(
        validate=FullMatch(
            CONVERSATION_ID_PATTERN,
            error=CONVERSATION_ID_MESSAGE,
        ),
        **kwargs,
    )


# Metadata: at most 20 keys of 1 to 40 characters, values non-empty strings of at most 500.
METADATA_KEY_PATTERN = r"^[A-Za-z0-9_.:-]{1,40}$"
METADATA_MAX_KEYS = 20
METADATA_MAX_VALUE_LENGTH = 500
# A list filters on at most this many metadata[key]=value pairs.
METADATA_MAX_FILTERS = 5
_METADATA_KEY = re.compile(METADATA_KEY_PATTERN)
_KEY_MESSAGE = "Keys are 1 to 40 characters of A-Z, a-z, 0-9, _, ., : or -."
_VALUE_MESSAGE = f"Must be a string of 1 to {METADATA_MAX_VALUE_LENGTH} characters, without NUL"


def _metadata_value_ok(value: object) -> bool:
    return (
        isinstance(value, str)
        and 0 < len(value) <= METADATA_MAX_VALUE_LENGTH
        and "\x00" not in value
    )


class Metadata(fields.Dict):
    """A metadata object; an invalid key or value is reported under that key.

    `removals`: a change, where null or "" removes the key (they load as None). Otherwise every
    value must be set (a filter). `max_keys` bounds the object as given.
    """

    def __init__(
        self, *, removals: bool = False, max_keys: int | None = None, **kwargs: Any
    ) -> None:
        # The key and value fields only describe the object in the OpenAPI document.
        values = fields.String(
            allow_none=removals,
            validate=validate.Length(0 if removals else 1, METADATA_MAX_VALUE_LENGTH),
        )
        if max_keys is not None:
            kwargs["metadata"] = {"maxProperties": max_keys, **kwargs.get("metadata", {})}
        super().__init__(keys=fields.String(), values=values, **kwargs)
        self.removals = removals
        self.max_keys = max_keys

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        if not isinstance(value, dict):
            raise self.make_error("invalid")
        errors: dict[str, list[str]] = {}
        loaded: dict[str, str | None] = {}
        for key, item in value.items():
            messages = [] if _METADATA_KEY.fullmatch(key) else [_KEY_MESSAGE]
            if self.removals and item in (None, ""):
                loaded[key] = None
            elif _metadata_value_ok(item):
                loaded[key] = item
            else:
                removal = '; null or "" removes the key.' if self.removals else "."
                messages.append(_VALUE_MESSAGE + removal)
            if messages:
                errors[key] = messages
        if errors:
            raise ValidationError(errors)
        if self.max_keys is not None and len(loaded) > self.max_keys:
            raise ValidationError(f"At most {self.max_keys} keys.")
        return loaded
