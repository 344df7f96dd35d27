"""The Conversations contract as marshmallow schemas: requests, responses and errors.

Importable by clients and subscribers without the server: nothing here imports `service`.
"""

from schemas.conversation import (
    ConversationCreateSchema,
    ConversationListQuerySchema,
    ConversationListSchema,
    ConversationSchema,
    ConversationUpdateSchema,
    DeletedConversationSchema,
)
from schemas.error import ErrorSchema

__all__ = [
    "ConversationCreateSchema",
    "ConversationListQuerySchema",
    "ConversationListSchema",
    "ConversationSchema",
    "ConversationUpdateSchema",
    "DeletedConversationSchema",
    "ErrorSchema",
]
