"""The floor under the service's GET by id: aiohttp + asyncpg as TechEmpower's entries write it.

One route, an asyncpg pool, the service's own SELECT (prepared once per connection by asyncpg's
statement cache), orjson, uvloop; no middleware, no auth, no access log. The account comes from
the X-Account-ID header, unverified. WORKERS processes share PORT with SO_REUSEPORT, as the
service's do.

    DATABASE_URL=... PORT=8081 WORKERS=2 DB_POOL_MAX=20 python -m tests.bench.baselines.minimal_aiohttp
"""

import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator

import asyncpg
import orjson
import uvloop
from aiohttp import web

from service.conversations.repository import RESOURCE_FIELDS, SELECT_BY_ID

POOL = web.AppKey("pool", asyncpg.Pool)


async def conversation(request: web.Request) -> web.Response:
    """GET /v1/conversations/{id}: the row as the resource, or 404."""
    async with request.app[POOL].acquire() as conn:
        row = await conn.fetchrow(
            SELECT_BY_ID, request.headers.get("X-Account-ID", ""), request.match_info["id"]
        )
    if row is None:
        return web.Response(status=404)
    return web.Response(
        body=orjson.dumps({field: row[field] for field in RESOURCE_FIELDS}),
        headers={"ETag": f'"{row["version"]}"'},
        content_type="application/json",
    )


async def database(app: web.Application) -> AsyncIterator[None]:
    """The pool, sized like the service's."""
    pool_max = int(os.environ.get("DB_POOL_MAX", "20"))
    async with asyncpg.create_pool(
        os.environ["DATABASE_URL"], min_size=pool_max, max_size=pool_max
    ) as pool:
        app[POOL] = pool
        yield


def serve() -> None:
    """One worker: the app on PORT, sharing it with the other workers."""
    app = web.Application()
    app.cleanup_ctx.append(database)
    app.router.add_get("/v1/conversations/{id}", conversation)
    web.run_app(
        app,
        host="127.0.0.1",
        port=int(os.environ["PORT"]),
        reuse_port=True,
        access_log=None,
        print=None,
        loop=uvloop.new_event_loop(),
    )


def main() -> int:
    """Fork WORKERS workers; forward SIGTERM/SIGINT to them and wait for all."""
    children = []
    for _ in range(int(os.environ.get("WORKERS", "2"))):
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            serve()
            os._exit(0)
        children.append(pid)

    def forward(signum: int, frame: object) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for child in children:
        os.waitpid(child, 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
