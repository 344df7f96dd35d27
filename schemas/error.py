"""The one error body that every failure answers with."""

from marshmallow import Schema, fields, validate

ERROR_TYPES = (
    "invalid_request",
    "authentication_error",
    "permission_error",
    "not_found_error",
    "validation_error",
    "rate_limit_error",
    "api_error",
)


class ErrorSchema(Schema):
    """`{"type", "message", "errors"?, "param"?, "request_id", "documentation_url"}`."""

    type = fields.String(required=True, validate=validate.OneOf(ERROR_TYPES))
    message = fields.String(required=True)
    errors = fields.Dict(
        keys=fields.String(),
        values=fields.Raw(),
        metadata={"description": "Field name to its list of messages, where input was invalid."},
    )
    param = fields.String(metadata={"description": "The first parameter at fault."})
    request_id = fields.String(required=True)
    documentation_url = fields.String(required=True)
    retry_after = fields.Integer(metadata={"description": "Seconds to wait, on 429."})
