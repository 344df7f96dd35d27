"""Schemas of the conversation resource and of the requests that read and write it."""

from typing import Any

from marshmallow import (
    EXCLUDE,
    RAISE,
    Schema,
    ValidationError,
    fields,
    pre_load,
    validate,
    validates_schema,
)

from schemas.fields import StrictBoolean, conversation_id, reference_id, timestamp


class ConversationSchema(Schema):
    """The conversation resource, as every response and event carries it."""

    class Meta:
        unknown = EXCLUDE  # clients and subscribers must tolerate fields added later

    id = conversation_id(required=True, metadata={"example": "0ujsswThIGTUYm2K"})
    contact_id = reference_id(
        required=True, allow_none=True, metadata={"example": "WAz8eIbvDR60rouK"}
    )
    group_id = reference_id(required=True, allow_none=True, metadata={"example": None})
    pinned_message_id = reference_id(required=True, allow_none=True)
    is_pinned = StrictBoolean(required=True)
    is_muted = StrictBoolean(required=True)
    last_active_at = timestamp(required=True, allow_none=True)
    last_opened_at = timestamp(required=True, allow_none=True)
    created_at = timestamp(required=True)
    archived_at = timestamp(required=True, allow_none=True)


class _RequestBody(Schema):
    """A write body: unknown fields are an error, read-only ones get a message of their own."""

    read_only: frozenset[str] = frozenset()

    class Meta:
        unknown = RAISE

    @pre_load
    def reject_read_only(self, data: Any, **kwargs: Any) -> Any:
        """Name read-only fields as such instead of as unknown ones."""
        if isinstance(data, dict):
            errors = {key: ["Read-only field."] for key in data if key in self.read_only}
            if errors:
                raise ValidationError(errors)
        return data


class ConversationCreateSchema(_RequestBody):
    """POST /v1/conversations: a conversation for exactly one contact or one group."""

    read_only = frozenset({"id", "created_at", "archived_at"})

    contact_id = reference_id(metadata={"description": "Exactly one of contact_id, group_id."})
    group_id = reference_id(metadata={"description": "Exactly one of contact_id, group_id."})
    is_pinned = StrictBoolean(load_default=False)
    is_muted = StrictBoolean(load_default=False)
    pinned_message_id = reference_id(load_default=None, allow_none=True)
    last_active_at = timestamp(load_default=None, allow_none=True)
    last_opened_at = timestamp(load_default=None, allow_none=True)

    @validates_schema
    def exactly_one_participant(self, data: dict[str, Any], **kwargs: Any) -> None:
        """A conversation is with one contact or one group, never both, never none."""
        given = [key for key in ("contact_id", "group_id") if data.get(key) is not None]
        if len(given) != 1:
            message = "Exactly one of contact_id and group_id is required."
            raise ValidationError({key: [message] for key in (given or ["contact_id"])})


class ConversationUpdateSchema(_RequestBody):
    """PUT or PATCH /v1/conversations/{id}: any subset of the writable fields."""

    read_only = frozenset({"id", "contact_id", "group_id", "created_at"})

    last_active_at = timestamp(allow_none=True)
    last_opened_at = timestamp(allow_none=True)
    archived_at = timestamp(allow_none=True)
    is_pinned = StrictBoolean()
    is_muted = StrictBoolean()
    pinned_message_id = reference_id(allow_none=True)


class ConversationListQuerySchema(Schema):
    """GET /v1/conversations query string."""

    class Meta:
        unknown = RAISE

    limit = fields.Integer(
        load_default=10,
        validate=validate.Range(1, 100, error="Must be between {min} and {max}."),
    )
    starting_after = conversation_id(
        metadata={
            "description": "Cursor: the page of older conversations after this id. "
            "Not together with ending_before (400)."
        }
    )
    ending_before = conversation_id(
        metadata={
            "description": "Cursor: the page of newer conversations before this id. "
            "Not together with starting_after (400)."
        }
    )
    archived = fields.Boolean(truthy={"true"}, falsy={"false"})
    muted = fields.Boolean(truthy={"true"}, falsy={"false"})
    pinned = fields.Boolean(truthy={"true"}, falsy={"false"})
    contact_id = reference_id()
    group_id = reference_id()


class ConversationListSchema(Schema):
    """A page of conversations, newest first."""

    has_more = fields.Boolean(required=True)
    data = fields.List(fields.Nested(ConversationSchema), required=True)


class DeletedConversationSchema(Schema):
    """The answer to a DELETE."""

    id = conversation_id(required=True)
    deleted = fields.Boolean(required=True, metadata={"enum": [True]})
