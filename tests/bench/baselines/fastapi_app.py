"""The FastAPI peer of the service's GET by id: same SQL, same token check, same answer.

FastAPI on uvicorn as it is deployed (uvloop, httptools, the access log on, one process per
core), asyncpg, and the service's own `TokenVerifier` (PyJWT HS256 against JWT_HS256_SECRETS,
`exp` and `sub` required, the read scope) scoping the SELECT to the token's account.

    DATABASE_URL=... JWT_HS256_SECRETS=... DB_POOL_MAX=20 \\
        uvicorn tests.bench.baselines.fastapi_app:app --workers 2 --loop uvloop --http httptools
"""

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

import asyncpg
import orjson
from fastapi import Depends, FastAPI, Header, HTTPException, Request, Response

from service.api.auth import READ_SCOPE, InvalidToken, Principal, TokenVerifier
from service.conversations.repository import RESOURCE_FIELDS, SELECT_BY_ID
from service.settings import load_auth_settings

verifier = TokenVerifier(load_auth_settings())


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The pool, sized like the service's, for the worker's lifetime."""
    pool_max = int(os.environ.get("DB_POOL_MAX", "20"))
    async with asyncpg.create_pool(
        os.environ["DATABASE_URL"], min_size=pool_max, max_size=pool_max
    ) as pool:
        app.state.pool = pool
        yield


app = FastAPI(lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)


def principal(authorization: Annotated[str, Header()] = "") -> Principal:
    """The token's principal, with the read scope; 401/403 otherwise."""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise HTTPException(401, "A bearer token is required.")
    try:
        found = verifier.verify(token.strip())
    except InvalidToken as error:
        raise HTTPException(401, str(error)) from None
    if READ_SCOPE not in found.scopes:
        raise HTTPException(403, f"The bearer token lacks the {READ_SCOPE} scope.")
    return found


@app.get("/v1/conversations/{conversation_id}")
async def conversation(
    conversation_id: str, request: Request, caller: Annotated[Principal, Depends(principal)]
) -> Response:
    """GET /v1/conversations/{id}: the row as the resource, or 404."""
    async with request.app.state.pool.acquire() as conn:
        row = await conn.fetchrow(SELECT_BY_ID, caller.account_id, conversation_id)
    if row is None:
        raise HTTPException(404, "No such conversation.")
    return Response(
        orjson.dumps({field: row[field] for field in RESOURCE_FIELDS}),
        media_type="application/json",
        headers={"ETag": f'"{row["version"]}"'},
    )
