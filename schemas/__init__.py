"""The Conversations contract as marshmallow schemas: requests, responses, errors and
the operational endpoints' bodies.

Importable by clients and subscribers without the server: nothing here imports `service`.
"""

from schemas.conversation import (
    ConversationChangesQuerySchema,
    ConversationChangesSchema,
    ConversationCreateSchema,
    ConversationListQuerySchema,
    ConversationListSchema,
    ConversationSchema,
    ConversationUpdateSchema,
    DeletedConversationSchema,
)
from schemas.error import ErrorSchema
from schemas.probe import HealthSchema, ReadinessSchema

__all__ = [
    "ConversationChangesQuerySchema",
    "ConversationChangesSchema",
    "ConversationCreateSchema",
    "ConversationListQuerySchema",
    "ConversationListSchema",
    "ConversationSchema",
    "ConversationUpdateSchema",
    "DeletedConversationSchema",
    "ErrorSchema",
    "HealthSchema",
    "ReadinessSchema",
]
