"""The events published to RabbitMQ: the documentation family's webhook envelope."""

from marshmallow import Schema, fields, validate

from schemas.conversation import ConversationSchema
from schemas.fields import timestamp

EVENT_TYPES = (
    "conversation.created",
    "conversation.updated",
    "conversation.archived",
    "conversation.deleted",
)


class EventDataSchema(Schema):
    """The conversation after the change and, for updates, the fields' values before it."""

    object = fields.Nested(ConversationSchema, required=True)
    previous_attributes = fields.Dict(
        keys=fields.String(),
        values=fields.Raw(allow_none=True),
        metadata={"description": "On updated and archived events: changed fields' old values."},
    )


class EventSchema(Schema):
    """One event; `sequence` is the conversation's version, strictly increasing per conversation."""

    id = fields.String(required=True, validate=validate.Regexp(r"^evt_[0-9A-Za-z]{16}$"))
    type = fields.String(required=True, validate=validate.OneOf(EVENT_TYPES))
    created_at = timestamp(required=True)
    account_id = fields.String(required=True)
    sequence = fields.Integer(required=True, strict=True, validate=validate.Range(min=1))
    data = fields.Nested(EventDataSchema, required=True)
