"""The SERVER span of each request, named by its route template, while tracing is on.

Our own middleware rather than opentelemetry-instrumentation-aiohttp-server's: it measured
cheaper (docs/operations.md, "Tracing"), because it builds the span's attributes only when
the span is sampled and records no metrics of its own (the service has its Prometheus ones).
"""

from aiohttp import web
from opentelemetry import context, trace
from opentelemetry.context import _SUPPRESS_INSTRUMENTATION_KEY
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from service import tracing
from service.api.middleware import Handler
from service.logs import SPAN_CONTEXT, route_template

_W3C = TraceContextTextMapPropagator()
# Probes and scrapes come every few seconds and tell nothing a trace would: not traced.
UNTRACED_ROUTES = frozenset({"/healthz", "/readyz", "/metrics"})
# Semantic conventions: other methods are reported as _OTHER, in a span named "HTTP".
KNOWN_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"}
)


@web.middleware
async def server_span_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The outermost middleware while tracing is on: a SERVER span around everything a request
    does, continuing the caller's trace (its W3C `traceparent` header, the contract's).

    A request the sampler drops also suppresses the instrumentations (the SQL spans) for its
    work: their spans would be dropped too, after costing as much to make as a recorded one.
    """
    tracer = tracing.tracer()
    route = route_template(request)
    if tracer is None or route in UNTRACED_ROUTES:  # None: before start-up or after shutdown
        return await handler(request)
    method = request.method if request.method in KNOWN_METHODS else "_OTHER"
    name = "HTTP" if method == "_OTHER" else method
    span = tracer.start_span(
        f"{name} {route}" if route else name,
        context=_W3C.extract(request.headers) if "traceparent" in request.headers else None,
        kind=SpanKind.SERVER,
    )
    request[SPAN_CONTEXT] = span.get_span_context()
    current = trace.set_span_in_context(span)
    if span.is_recording():
        span.set_attributes(
            {
                "http.request.method": method,
                "http.route": route or "",
                "url.path": request.path,
                "url.scheme": request.scheme,
                "network.protocol.version": f"{request.version.major}.{request.version.minor}",
            }
        )
    else:
        current = context.set_value(_SUPPRESS_INSTRUMENTATION_KEY, True, current)
    token = context.attach(current)
    try:
        response = await handler(request)
        _answered(span, response.status)
    except web.HTTPException as answer:  # redirects and the like, raised as answers
        _answered(span, answer.status)
        raise
    except BaseException as error:  # cancelled: the client went away
        span.set_attribute("error.type", type(error).__qualname__)
        span.set_status(StatusCode.ERROR)
        raise
    finally:
        context.detach(token)
        span.end()
    return response


def _answered(span: trace.Span, status: int) -> None:
    """The answer's status; only a 5xx marks a SERVER span as failed (semantic conventions)."""
    if span.is_recording():
        span.set_attribute("http.response.status_code", status)
        if status >= 500:
            span.set_attribute("error.type", str(status))
            span.set_status(StatusCode.ERROR)
