"""A stand-in OpenTelemetry collector for scenario 11: accepts OTLP/HTTP exports
(POST /v1/traces) on loopback, counts them, keeps nothing."""

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web

from tests.bench.processes import free_port


@dataclass
class Sink:
    """Where the services export to, and what arrived so far."""

    endpoint: str  # OTEL_EXPORTER_OTLP_ENDPOINT (the base URL; the exporter adds v1/traces)
    exports: int = 0
    bytes: int = 0


@contextlib.asynccontextmanager
async def otlp_sink() -> AsyncIterator[Sink]:
    """The sink, served in this event loop until the block ends."""
    port = free_port()
    sink = Sink(f"http://127.0.0.1:{port}")

    async def accept(request: web.Request) -> web.Response:
        sink.exports += 1
        sink.bytes += len(await request.read())
        # An empty ExportTraceServiceResponse: every span accepted.
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/traces", accept)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield sink
    finally:
        await runner.cleanup()
