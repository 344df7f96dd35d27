"""What a SERVER span costs per request: the service's middleware (service/api/tracing.py)
against opentelemetry-instrumentation-aiohttp-server's, at sampling ratios 0.01 and 1.0.

    python -m tests.bench.span_middleware

Each middleware wraps a handler that answers at once, called in a loop on a routed request
(GET /v1/conversations/{id}) in this process: the figure is the middleware's own CPU time per
request, spans batched to an exporter that discards them. Prints microseconds per request.
"""

import asyncio
import time
from collections.abc import Callable, Sequence

from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from opentelemetry.instrumentation import aiohttp_server
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from service import tracing
from service.api.tracing import server_span_middleware

REQUESTS = 50_000


class Discard(SpanExporter):
    """Takes every batch and keeps nothing."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


async def ok(request: web.Request) -> web.StreamResponse:
    return web.Response(text="{}")


async def routed_request() -> web.Request:
    app = web.Application()
    app.router.add_get("/v1/conversations/{id}", ok)
    request = make_mocked_request("GET", "/v1/conversations/xgQQXg3hrtjh7AvZ", app=app)
    request._match_info = await app.router.resolve(request)  # as the app's handler would
    return request


async def per_request(middleware: Callable | None, request: web.Request) -> float:
    """CPU microseconds per request, the handler's own included."""
    for _ in range(1000):  # warm-up
        await (middleware(request, ok) if middleware else ok(request))
    started = time.process_time()
    for _ in range(REQUESTS):
        await (middleware(request, ok) if middleware else ok(request))
    return (time.process_time() - started) / REQUESTS * 1e6


def provider(ratio: float) -> TracerProvider:
    made = TracerProvider(sampler=ParentBased(TraceIdRatioBased(ratio)))
    made.add_span_processor(BatchSpanProcessor(Discard()))
    return made


async def main() -> None:
    request = await routed_request()
    print(f"no middleware: {await per_request(None, request):.1f} us/request")
    for ratio in (0.01, 1.0):
        made = provider(ratio)
        tracing._tracer = made.get_tracer("service")
        ours = await per_request(server_span_middleware, request)
        aiohttp_server.AioHttpServerInstrumentor().instrument(tracer_provider=made)
        theirs = await per_request(aiohttp_server.create_aiohttp_middleware(made), request)
        aiohttp_server.AioHttpServerInstrumentor().uninstrument()
        print(
            f"ratio {ratio:g}: service middleware {ours:.1f} us/request, "
            f"aiohttp-server instrumentation {theirs:.1f} us/request"
        )
        made.shutdown()
    tracing._tracer = None


if __name__ == "__main__":
    asyncio.run(main())
