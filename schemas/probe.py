"""The bodies of the operational endpoints: liveness and readiness."""

from marshmallow import Schema, fields, validate


class HealthSchema(Schema):
    """`GET /healthz`: the process answers."""

    status = fields.String(required=True, validate=validate.Equal("ok"))


class OutboxBacklogSchema(Schema):
    """The events not yet confirmed by RabbitMQ; both null when they could not be counted in time."""

    pending = fields.Integer(required=True, allow_none=True)
    oldest_pending_age_seconds = fields.Float(required=True, allow_none=True)


class ReadinessChecksSchema(Schema):
    """What readiness requires (database, migrations) and what it only reports (the rest)."""

    database = fields.String(required=True, validate=validate.Equal("ok"))
    migrations = fields.String(required=True, validate=validate.Equal("ok"))
    broker = fields.String(required=True, validate=validate.OneOf(["connected", "disconnected"]))
    relay = fields.String(required=True, validate=validate.OneOf(["active", "standby", "disabled"]))
    relay_partitions = fields.List(
        fields.Integer(validate=validate.Range(min=0)),
        required=True,
        allow_none=True,
        metadata={
            "description": "The outbox partitions this process's relay publishes now (null "
            "when it runs no relay; empty while it stands by)."
        },
    )
    outbox = fields.Nested(OutboxBacklogSchema, required=True)
    rate_limits = fields.String(
        required=True,
        validate=validate.OneOf(["connected", "disconnected", "in-process", "off"]),
        metadata={
            "description": "Where the per-account budgets are counted: Redis (connected or, "
            "serving without limits meanwhile, disconnected), each process (in-process), or "
            "nowhere (off: every budget is 0, or a relay process)."
        },
    )


class ReadinessSchema(Schema):
    """`GET /readyz` when ready (200); not ready is a 503 with the error body."""

    status = fields.String(required=True, validate=validate.Equal("ready"))
    checks = fields.Nested(ReadinessChecksSchema, required=True)
