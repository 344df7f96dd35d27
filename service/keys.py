"""Every typed key for shared state on the application and on requests, in one place."""

import asyncpg
from aiohttp import web

from service.auth import Principal, TokenVerifier
from service.events import Events
from service.settings import Settings

SETTINGS = web.AppKey("settings", Settings)
DB_POOL = web.AppKey("db_pool", asyncpg.Pool)
TOKEN_VERIFIER = web.AppKey("token_verifier", TokenVerifier)
OPENAPI_DOCUMENT = web.AppKey("openapi_document", bytes)
EVENTS = web.AppKey("events", Events)

REQUEST_ID = web.RequestKey("request_id", str)
PRINCIPAL = web.RequestKey("principal", Principal)
