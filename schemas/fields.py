"""Strict field types shared by the request schemas.

JSON callers must send JSON booleans and JSON integers: marshmallow's own fields would
accept "true", 1 or "1700000000", which the contract rejects.
"""

from typing import Any

from marshmallow import ValidationError, fields, validate

# Unix seconds from 1970-01-01 to 9999-12-31T23:59:59Z: what every timestamp may hold.
MAX_TIMESTAMP = 253402300799
# Ids the service generates: 8 base62 characters of time, 8 random ones.
CONVERSATION_ID_PATTERN = r"^[0-9A-Za-z]{16}$"
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
            error="Must be a conversation id: 16 characters of 0-9, A-Z, a-z.",
        ),
        **kwargs,
    )
