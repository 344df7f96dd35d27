"""Schemas of the conversation resource and of the requests that read and write it."""

from typing import Any

from marshmallow import (
    EXCLUDE,
    RAISE,
    Schema,
    ValidationError,
    fields,
    post_load,
    pre_load,
    validate,
    validates_schema,
)

from schemas import cursor
from schemas.cursor import Sort
from schemas.fields import (
    METADATA_MAX_FILTERS,
    METADATA_MAX_KEYS,
    Metadata,
    StrictBoolean,
    conversation_id,
    reference_id,
    timestamp,
)

_METADATA_KEYS = "keys of 1 to 40 characters [A-Za-z0-9_.:-]"
_METADATA_CHANGE = (
    f"Metadata to set: at most {METADATA_MAX_KEYS} {_METADATA_KEYS} in all. On update, merged key by key: "
    'a string sets the key, null or "" removes it, keys not named are kept. '
    "In a form body: metadata[key]=value (an empty value removes the key)."
)


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
    metadata = Metadata(
        required=True,
        metadata={
            "description": f"Labels of the caller's own: {_METADATA_KEYS}, string values; "
            "{} when none."
        },
    )


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
    metadata = Metadata(
        removals=True, load_default=dict, metadata={"description": _METADATA_CHANGE}
    )

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
    metadata = Metadata(removals=True, metadata={"description": _METADATA_CHANGE})


class WalkQuerySchema(Schema):
    """A list's query string. `WALK` names the parameters that place a page in one walk (a
    cursor, a sync token): service/api/bodies.load_query loads the rest of a query string once
    for every request that sends it, and these for each, through their fields and `place`."""

    WALK: tuple[str, ...] = ()

    def place(self, data: dict[str, Any]) -> dict[str, Any]:
        """What the loaded WALK values mean given the rest of the query (ValidationError if
        nothing); a whole load runs it too, after the fields."""
        return data

    @post_load
    def _place(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        return self.place(data)


class ConversationListQuerySchema(WalkQuerySchema):
    """GET /v1/conversations query string."""

    class Meta:
        unknown = RAISE

    WALK = ("starting_after", "ending_before")

    limit = fields.Integer(
        load_default=10,
        validate=validate.Range(1, 100, error="Must be between {min} and {max}."),
    )
    sort = fields.Enum(
        Sort,
        by_value=True,
        load_default=Sort.CREATED,
        metadata={
            "description": "-created_at: newest first. -last_active_at: last activity first, "
            "never-active conversations last; ties by id, newest first."
        },
    )
    starting_after = fields.String(
        metadata={
            "description": "Cursor: the page after this position (a page's cursors.after). "
            "A conversation id under -created_at, an opaque cursor under -last_active_at. "
            "Not together with ending_before (400)."
        }
    )
    ending_before = fields.String(
        metadata={
            "description": "Cursor: the page before this position (a page's cursors.before). "
            "Not together with starting_after (400)."
        }
    )
    unread = fields.Boolean(
        truthy={"true"},
        falsy={"false"},
        metadata={
            "description": "true: active since last opened (last_active_at set, and "
            "last_opened_at null or earlier); false: the others."
        },
    )
    metadata = Metadata(
        max_keys=METADATA_MAX_FILTERS,
        metadata={
            "description": f"metadata[key]=value, up to {METADATA_MAX_FILTERS}: only "
            "conversations whose metadata has each key with exactly that value.",
        },
    )
    archived = fields.Boolean(truthy={"true"}, falsy={"false"})
    muted = fields.Boolean(truthy={"true"}, falsy={"false"})
    pinned = fields.Boolean(truthy={"true"}, falsy={"false"})
    contact_id = reference_id()
    group_id = reference_id()

    def place(self, data: dict[str, Any]) -> dict[str, Any]:
        """The cursors as positions of the chosen order (`schemas.cursor.Position`)."""
        errors = {}
        for name in ("starting_after", "ending_before"):
            if name in data:
                try:
                    data[name] = cursor.decode(data["sort"], data[name])
                except ValueError as error:
                    errors[name] = [str(error)]
        if errors:
            raise ValidationError(errors)
        return data


class CursorsSchema(Schema):
    """Where a page starts and ends: pass `after` as starting_after for the next page, `before`
    as ending_before for the previous one."""

    before = fields.String(required=True, allow_none=True)
    after = fields.String(required=True, allow_none=True)


class ConversationListSchema(Schema):
    """A page of conversations in the order asked for."""

    has_more = fields.Boolean(required=True)
    data = fields.List(fields.Nested(ConversationSchema), required=True)
    cursors = fields.Nested(
        CursorsSchema,
        required=True,
        metadata={"description": "Cursors of the first and last items; both null when empty."},
    )


class DeletedConversationSchema(Schema):
    """The answer to a DELETE."""

    id = conversation_id(required=True)
    deleted = fields.Boolean(required=True, metadata={"enum": [True]})


class ConversationChangesQuerySchema(WalkQuerySchema):
    """GET /v1/conversations/changes query string."""

    class Meta:
        unknown = RAISE

    WALK = ("since",)  # the token is read where the walk is (service/conversations/sync.py)

    since = fields.String(
        validate=validate.Length(1, 512),
        metadata={
            "description": "The `next_since` of the previous answer; absent: from the beginning."
        },
    )
    limit = fields.Integer(
        load_default=100,
        validate=validate.Range(1, 1000, error="Must be between {min} and {max}."),
    )


class ConversationChange(fields.Field):
    """One item of a sync page: the conversation as it is now, or its deletion."""

    def __init__(self, **kwargs: Any) -> None:
        refs = ("#/components/schemas/Conversation", "#/components/schemas/DeletedConversation")
        super().__init__(metadata={"oneOf": [{"$ref": ref} for ref in refs]}, **kwargs)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        if isinstance(value, dict) and value.get("deleted") is True:
            return DeletedConversationSchema().load(value)
        return ConversationSchema().load(value)


class ConversationChangesSchema(Schema):
    """A page of an account's changes since a token, in the order they were made."""

    data = fields.List(ConversationChange(), required=True)
    has_more = fields.Boolean(
        required=True, metadata={"description": "Call again with next_since while true."}
    )
    next_since = fields.String(
        required=True,
        metadata={
            "description": "Opaque token: the `since` of the next call, or of the next sync."
        },
    )
