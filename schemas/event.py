"""The events published to RabbitMQ: the documentation family's webhook envelope."""

from marshmallow import EXCLUDE, INCLUDE, Schema, fields, validate

from schemas.conversation import ConversationSchema
from schemas.fields import TRACEPARENT_PATTERN, FullMatch, conversation_id, timestamp

EVENT_TYPES = (
    "conversation.created",
    "conversation.updated",
    "conversation.archived",
    "conversation.deleted",
)


class EventDataSchema(Schema):
    """The conversation after the change and, for updates, the fields' values before it."""

    class Meta:
        unknown = EXCLUDE  # subscribers must tolerate fields added later

    object = fields.Nested(ConversationSchema, required=True)
    previous_attributes = fields.Dict(
        keys=fields.String(),
        values=fields.Raw(allow_none=True),
        metadata={"description": "On updated and archived events: changed fields' old values."},
    )


class EventSchema(Schema):
    """One event; `sequence` is the conversation's version, strictly increasing per conversation."""

    class Meta:
        unknown = EXCLUDE  # subscribers must tolerate fields added later

    id = fields.String(required=True, validate=validate.Regexp(r"^evt_[0-9A-Za-z]{16}$"))
    type = fields.String(required=True, validate=validate.OneOf(EVENT_TYPES))
    created_at = timestamp(required=True)
    account_id = fields.String(required=True)
    sequence = fields.Integer(required=True, strict=True, validate=validate.Range(min=1))
    data = fields.Nested(EventDataSchema, required=True)


class EventHeadersSchema(Schema):
    """The AMQP headers of every event message, for routing or tracing without parsing the body."""

    class Meta:
        # RabbitMQ adds headers of its own (x-delivery-count on quorum queues, x-death).
        unknown = INCLUDE

    account_id = fields.String(required=True)
    conversation_id = conversation_id(required=True)
    partition = fields.Integer(
        required=True,
        strict=True,
        validate=validate.Range(min=0),
        metadata={
            "description": "The outbox partition the event was published from: a hash of the "
            "conversation id modulo the partition count, so the same for all of one "
            "conversation's events while that count is unchanged. For diagnosis; to spread "
            "events over consumers, hash `conversation_id` (docs/events.md)."
        },
    )
    traceparent = fields.String(
        validate=FullMatch(TRACEPARENT_PATTERN),
        metadata={
            "description": "The W3C trace context of the request that made the change: its "
            "own span's when the service traces (always present then), else the caller's "
            "traceparent if it sent one. A consumer span continues the request's trace from it."
        },
    )
