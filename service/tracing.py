"""OpenTelemetry tracing of a process: the tracer provider, its sampler, the OTLP exporter, and
the SQL spans (opentelemetry-instrumentation-asyncpg).

Off unless an OTLP endpoint is configured (`TracingSettings.enabled`): then `start` is never
called, no tracer provider is installed (OpenTelemetry's global stays its no-op proxy), asyncpg
is not instrumented, and the spans' call sites find `tracer()` None and do nothing.
"""

import asyncio
import contextlib
import logging
import threading
from collections.abc import Sequence
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace import SpanKind
from opentelemetry.util.types import Attributes

from service.settings import TracingSettings

log = logging.getLogger(__name__)

# How long shutdown waits for the last spans to reach the collector.
FLUSH_TIMEOUT_SECONDS = 5.0

_tracer: trace.Tracer | None = None


def tracer() -> trace.Tracer | None:
    """The service's tracer while tracing runs in this process; None when it is off."""
    return _tracer


class _StatementsOnlyInTraces(Sampler):
    """The configured sampler, except that a CLIENT span (a SQL statement) is recorded only
    within a recorded span: a statement outside any request (the relay's reads, housekeeping, a
    readiness check) would otherwise start a trace of its own, several a second."""

    def __init__(self, sampler: Sampler) -> None:
        self._sampler = sampler

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[trace.Link] | None = None,
        trace_state: trace.TraceState | None = None,
    ) -> SamplingResult:
        if kind is SpanKind.CLIENT and not trace.get_current_span(parent_context).is_recording():
            return SamplingResult(Decision.DROP)
        return self._sampler.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        return f"StatementsOnlyInTraces{{{self._sampler.get_description()}}}"


def sampler(settings: TracingSettings) -> Sampler:
    """The sampler OTEL_TRACES_SAMPLER (and _ARG) name, statements only within traces."""
    ratio = TraceIdRatioBased(settings.ratio)
    roots: dict[str, Sampler] = {
        "always_on": ALWAYS_ON,
        "always_off": ALWAYS_OFF,
        "traceidratio": ratio,
        "parentbased_always_on": ParentBased(ALWAYS_ON),
        "parentbased_always_off": ParentBased(ALWAYS_OFF),
        "parentbased_traceidratio": ParentBased(ratio),
    }
    return _StatementsOnlyInTraces(roots[settings.sampler])


def new_exporter(settings: TracingSettings) -> SpanExporter:
    """OTLP over HTTP/protobuf to the configured endpoint (headers, timeout, compression and
    certificates from the exporter's own OTEL_EXPORTER_OTLP_* variables)."""
    # Imported only here: with its HTTP client and protobuf it weighs about 15 MB per process,
    # which a process with tracing off does not need.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=settings.endpoint)


def start(settings: TracingSettings, *, sql: bool) -> TracerProvider:
    """Install the tracer provider (spans batched to `new_exporter`) and, with `sql`, the SQL
    spans. Called in each process that serves, after a fork: the batch processor's thread does
    not survive one."""
    global _tracer
    provider = TracerProvider(
        sampler=sampler(settings),
        # Resource.create also reads OTEL_RESOURCE_ATTRIBUTES (and OTEL_SERVICE_NAME).
        resource=Resource.create({SERVICE_NAME: settings.service_name}),
    )
    provider.add_span_processor(BatchSpanProcessor(new_exporter(settings)))
    trace.set_tracer_provider(provider)
    _tracer = provider.get_tracer("service")
    if sql:
        from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor

        # Statements only, never their parameters (capture_parameters is off by default).
        AsyncPGInstrumentor(capture_parameters=False).instrument(tracer_provider=provider)
    where = urlsplit(settings.endpoint or "")
    log.info(  # the endpoint without any user:password in it
        "tracing to %s://%s%s, sampler %s",
        where.scheme,
        where.hostname,
        f":{where.port}" if where.port else "",
        provider.sampler.get_description(),
    )
    return provider


async def stop_within(provider: TracerProvider) -> None:
    """`stop`, waited for at most FLUSH_TIMEOUT_SECONDS: with the collector down, the SDK's flush retries
    each batch for up to OTEL_EXPORTER_OTLP_TIMEOUT, which must not hold up a shutdown. The
    flush runs in a daemon thread (as the SDK's batch worker does), so that one still under
    way when the process ends does not keep it alive."""
    loop = asyncio.get_running_loop()
    stopped = loop.create_future()

    def run() -> None:
        try:
            stop(provider)
        finally:
            with contextlib.suppress(RuntimeError):  # the loop has closed meanwhile
                loop.call_soon_threadsafe(lambda: stopped.done() or stopped.set_result(None))

    threading.Thread(target=run, name="tracing-stop", daemon=True).start()
    try:
        await asyncio.wait_for(stopped, FLUSH_TIMEOUT_SECONDS)
    except TimeoutError:
        log.warning(
            "tracing: the last spans were not exported within %gs; dropped", FLUSH_TIMEOUT_SECONDS
        )


def stop(provider: TracerProvider) -> None:
    """Export the spans still batched, then stop tracing. Blocks until the export is done or
    has failed: see `stop_within`."""
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor

    global _tracer
    _tracer = None
    instrumentor = AsyncPGInstrumentor()
    if instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.uninstrument()
    provider.shutdown()  # exports what is batched first


def current_traceparent() -> str | None:
    """The W3C traceparent of the current span, or None outside a span (or with tracing off)."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"
