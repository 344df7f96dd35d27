"""Tracing: a request's SERVER span, its SQL spans, the relay's PRODUCER span in the same trace
across the outbox, a subscriber continuing it; the OTLP export; tracing off; the OTEL_* checks."""

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request
from opentelemetry import trace
from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanContext, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util._once import Once

from service import tracing
from service.api.app import create_app
from service.api.tracing import server_span_middleware
from service.events.broker import Outgoing
from service.events.relay import build_message
from service.events.tracing import end_publish_spans, start_publish_spans
from service.logs import SPAN_CONTEXT, AccessLogger, JsonFormatter
from service.settings import TracingSettings, load_settings
from tests.events_support import wait_until
from tests.proxy import free_port

CALLER = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
UNSAMPLED_CALLER = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"
# Anything well-formed: the tests that use it replace the exporter or serve it themselves.
UNUSED_ENDPOINT = "http://127.0.0.1:9/v1/traces"


@pytest.fixture(autouse=True)
def no_global_provider():
    """Each test starts and ends with OpenTelemetry's global tracer provider unset (the SDK
    allows setting it once per process; its own tests reset it the same way)."""
    yield
    trace._TRACER_PROVIDER_SET_ONCE = Once()
    trace._TRACER_PROVIDER = None


@pytest.fixture
def spans(monkeypatch) -> InMemorySpanExporter:
    """Spans exported to memory instead of OTLP, batched every 50 ms."""
    exporter = InMemorySpanExporter()
    monkeypatch.setattr(tracing, "new_exporter", lambda settings: exporter)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    return exporter


def traced(settings, sampler: str = "parentbased_always_on", ratio: float = 1.0):
    return dataclasses.replace(
        settings, tracing=TracingSettings(UNUSED_ENDPOINT, "conversations", sampler, ratio)
    )


def of_kind(exporter: InMemorySpanExporter, kind: SpanKind) -> list:
    return [span for span in exporter.get_finished_spans() if span.kind is kind]


# --- a create, from the request to the subscriber ----------------------------------------------


async def test_a_create_is_one_trace_from_the_request_to_the_subscriber(
    event_settings, spans, aiohttp_client, headers, subscriber, db
):
    client = await aiohttp_client(create_app(traced(event_settings)))
    resp = await client.post("/v1/conversations", json={"contact_id": "c1"}, headers=headers)
    assert resp.status == 201
    [message] = await subscriber.receive(1)

    async def produced() -> bool:
        return bool(of_kind(spans, SpanKind.PRODUCER))

    await wait_until(produced)
    [server] = of_kind(spans, SpanKind.SERVER)
    assert server.name == "POST /v1/conversations"
    assert server.attributes["http.route"] == "/v1/conversations"
    assert server.attributes["http.request.method"] == "POST"
    assert server.attributes["http.response.status_code"] == 201
    assert server.parent is None  # the caller sent no traceparent: the request starts the trace
    trace_id = server.context.trace_id

    statements = of_kind(spans, SpanKind.CLIENT)
    assert statements, "no SQL span"
    for statement in statements:
        assert statement.context.trace_id == trace_id
        assert statement.parent.span_id == server.context.span_id
        assert statement.attributes["db.system"] == "postgresql"
        assert not any("parameters" in key for key in statement.attributes)
    # The create's one statement: the row and its outbox row.
    assert any("INSERT INTO outbox" in s.attributes["db.statement"] for s in statements)

    [producer] = of_kind(spans, SpanKind.PRODUCER)
    event_id = await db.fetchval("SELECT event_id FROM outbox")
    assert producer.context.trace_id == trace_id
    assert producer.parent.span_id == server.context.span_id
    assert producer.name == f"publish {event_settings.events.exchange}"
    assert producer.attributes["messaging.system"] == "rabbitmq"
    assert producer.attributes["messaging.destination.name"] == event_settings.events.exchange
    assert producer.attributes["messaging.rabbitmq.destination.routing_key"] == (
        "conversation.created"
    )
    assert producer.attributes["messaging.message.id"] == event_id == message.message_id
    assert producer.status.is_ok

    # The subscriber continues the request's trace, from the message's headers alone.
    carried = trace.get_current_span(TraceContextTextMapPropagator().extract(message.headers))
    assert carried.get_span_context().trace_id == trace_id
    assert carried.get_span_context().span_id == server.context.span_id
    assert carried.get_span_context().trace_flags.sampled


async def test_the_request_continues_the_callers_trace(
    settings, spans, aiohttp_client, headers, db
):
    client = await aiohttp_client(create_app(traced(settings)))
    resp = await client.post(
        "/v1/conversations", json={"contact_id": "c1"}, headers={**headers, "traceparent": CALLER}
    )
    assert resp.status == 201
    conversation = await resp.json()
    resp = await client.get(f"/v1/conversations/{conversation['id']}", headers=headers)
    assert resp.status == 200

    async def both() -> bool:
        return len(of_kind(spans, SpanKind.SERVER)) == 2

    await wait_until(both)
    create, get = of_kind(spans, SpanKind.SERVER)
    assert f"{create.context.trace_id:032x}" == CALLER.split("-")[1]
    assert f"{create.parent.span_id:016x}" == CALLER.split("-")[2]
    # The outbox keeps the request's own span, a child of the caller's.
    stored = await db.fetchval("SELECT traceparent FROM outbox")
    assert stored == f"00-{CALLER.split('-')[1]}-{create.context.span_id:016x}-01"
    # The route template, never the path.
    assert get.name == "GET /v1/conversations/{id}"
    assert get.attributes["http.route"] == "/v1/conversations/{id}"


async def test_an_unsampled_request_records_nothing_but_its_context_is_kept(
    settings, spans, aiohttp_client, headers, db
):
    client = await aiohttp_client(create_app(traced(settings)))
    resp = await client.post(
        "/v1/conversations",
        json={"contact_id": "c1"},
        headers={**headers, "traceparent": UNSAMPLED_CALLER},
    )
    assert resp.status == 201
    # Without a span of its own, a probe's statement would start a trace: none is recorded.
    assert (await client.get("/readyz")).status == 200
    tracing_provider = trace.get_tracer_provider()
    assert tracing_provider.force_flush()
    assert spans.get_finished_spans() == ()
    stored = await db.fetchval("SELECT traceparent FROM outbox")
    assert stored.startswith(f"00-{UNSAMPLED_CALLER.split('-')[1]}-")
    assert stored.endswith("-00")


# --- the relay's spans ---------------------------------------------------------------------------


def _message(traceparent: str | None) -> Outgoing:
    return build_message(
        {
            "account_id": "acct_1",
            "conversation_id": "xgQQXg3hrtjh7AvZ",
            "partition": 3,
            "traceparent": traceparent,
            "event_type": "conversation.updated",
            "payload": "{}",
            "event_id": "evt_1",
            "created_at": 1700000000,
        }
    )


def test_the_relay_traces_only_events_of_sampled_requests(spans):
    provider = tracing.start(TracingSettings(UNUSED_ENDPOINT), sql=False)
    try:
        messages = [_message(CALLER), _message(None), _message(UNSAMPLED_CALLER), _message(CALLER)]
        started = start_publish_spans("conversations", messages)
        assert [span is not None for span in started] == [True, False, False, True]
        end_publish_spans(started, 1, TimeoutError("not confirmed"))
    finally:
        tracing.stop(provider)
    confirmed, failed = spans.get_finished_spans()
    assert confirmed.status.is_ok
    assert not failed.status.is_ok
    assert failed.attributes["error.type"] == "TimeoutError"
    # The headers still carry the stored context, not the publish span's.
    assert messages[0].properties.headers["traceparent"] == CALLER


def test_with_tracing_off_the_relay_does_nothing():
    assert tracing.tracer() is None
    assert start_publish_spans("conversations", [_message(CALLER)]) is None
    end_publish_spans(None, 0, None)


# --- tracing off ---------------------------------------------------------------------------------


async def test_with_tracing_off_no_provider_is_installed(settings, aiohttp_client, headers, db):
    app = create_app(settings)
    client = await aiohttp_client(app)
    resp = await client.post(
        "/v1/conversations", json={"contact_id": "c1"}, headers={**headers, "traceparent": CALLER}
    )
    assert resp.status == 201
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    assert tracing.tracer() is None
    assert not AsyncPGInstrumentor().is_instrumented_by_opentelemetry
    assert server_span_middleware not in app.middlewares
    # Today's behaviour: the caller's traceparent, as it came.
    assert await db.fetchval("SELECT traceparent FROM outbox") == CALLER


async def test_tracing_is_undone_when_the_app_stops(settings, spans):
    app = create_app(traced(settings))
    async with TestClient(TestServer(app)):
        assert tracing.tracer() is not None
        assert AsyncPGInstrumentor().is_instrumented_by_opentelemetry
    assert tracing.tracer() is None
    assert not AsyncPGInstrumentor().is_instrumented_by_opentelemetry


# --- the OTLP export ----------------------------------------------------------------------------


async def test_spans_reach_an_otlp_endpoint(settings, headers):
    """The exporter's real requests to a collector on loopback, decoded."""
    async with otlp_collector() as (endpoint, received):
        tracing_settings = TracingSettings(endpoint, "convs-test")
        app = create_app(dataclasses.replace(settings, tracing=tracing_settings))
        async with TestClient(TestServer(app)) as client:
            assert (await client.get("/v1/conversations", headers=headers)).status == 200
        # Stopping the app exported what was batched.
    assert received, "the collector received nothing"
    assert "GET /v1/conversations" in {span.name for span in exported_spans(received)}
    service_names = {
        attribute.value.string_value
        for export in received
        for resource in export.resource_spans
        for attribute in resource.resource.attributes
        if attribute.key == "service.name"
    }
    assert service_names == {"convs-test"}


@contextlib.asynccontextmanager
async def otlp_collector() -> AsyncIterator[tuple[str, list[ExportTraceServiceRequest]]]:
    """A collector of our own on loopback: its endpoint, and the exports it decoded."""
    received: list[ExportTraceServiceRequest] = []

    async def collect(request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        received.append(ExportTraceServiceRequest.FromString(await request.read()))
        return web.Response(status=200, content_type="application/x-protobuf")

    collector = web.Application()
    collector.router.add_post("/v1/traces", collect)
    runner = web.AppRunner(collector)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}/v1/traces", received
    finally:
        await runner.cleanup()


def exported_spans(received: list[ExportTraceServiceRequest]) -> list:
    return [
        span
        for export in received
        for resource in export.resource_spans
        for scope in resource.scope_spans
        for span in scope.spans
    ]


async def test_each_worker_traces_and_exports_its_spans_on_sigterm(settings, headers, tmp_path):
    """WORKERS=2: each worker traces its requests and, on SIGTERM, exports what it has batched
    (the batch delay here is ten minutes: only the shutdown's flush sends anything)."""
    port = free_port()
    async with otlp_collector() as (endpoint, received):
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("OTEL_")},
            "DATABASE_URL": settings.database_url,
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "WORKERS": "2",
            "RELAY_ENABLED": "false",
            "JWT_HS256_SECRETS": settings.auth.hs256_secrets[0],
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint.removesuffix("/v1/traces"),
            "OTEL_BSP_SCHEDULE_DELAY": "600000",  # nothing leaves before the shutdown's flush
        }
        log = tmp_path / "serve.log"
        with log.open("wb") as log_file:
            server = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "service.cli", "serve", env=env, stderr=log_file
            )
        base = f"http://127.0.0.1:{port}"
        try:
            # A new connection per request, so that both workers (SO_REUSEPORT) get some.
            async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True)
            ) as http:

                async def ready() -> bool:
                    try:
                        async with http.get(f"{base}/readyz") as resp:
                            return resp.status == 200
                    except aiohttp.ClientConnectionError:
                        return False

                await wait_until(ready, timeout=30)
                for _ in range(20):
                    async with http.get(f"{base}/v1/conversations", headers=headers) as resp:
                        assert resp.status == 200
            assert received == []
            server.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(server.wait(), 30) == 0, log.read_text()[-3000:]
        finally:
            if server.returncode is None:
                server.kill()
                await server.wait()
    served = [span for span in exported_spans(received) if span.name == "GET /v1/conversations"]
    assert len(served) == 20


async def test_a_collector_that_never_answers_does_not_hold_up_shutdown(
    settings, headers, monkeypatch
):
    """The exporter would retry for OTEL_EXPORTER_OTLP_TIMEOUT (10 s); shutdown waits less."""
    monkeypatch.setattr(tracing, "FLUSH_TIMEOUT_SECONDS", 0.5)
    silent = await asyncio.start_server(lambda reader, writer: None, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}/v1/traces"
    app = create_app(dataclasses.replace(settings, tracing=TracingSettings(endpoint)))
    try:
        async with TestClient(TestServer(app)) as client:
            assert (await client.get("/v1/conversations", headers=headers)).status == 200
            stopping = asyncio.get_running_loop().time()
        assert asyncio.get_running_loop().time() - stopping < 3
    finally:
        silent.close()


# --- logs ---------------------------------------------------------------------------------------


def test_json_log_lines_carry_the_current_span(spans):
    formatter = JsonFormatter()
    record = logging.makeLogRecord({"msg": "hello", "levelname": "INFO", "name": "t"})
    assert "trace_id" not in orjson.loads(formatter.format(record))
    provider = tracing.start(TracingSettings(UNUSED_ENDPOINT), sql=False)
    try:
        with tracing.tracer().start_as_current_span("work") as span:
            line = orjson.loads(formatter.format(record))
    finally:
        tracing.stop(provider)
    assert line["trace_id"] == f"{span.get_span_context().trace_id:032x}"
    assert line["span_id"] == f"{span.get_span_context().span_id:016x}"


def test_the_access_line_carries_the_requests_span(caplog):
    """Written after the request's span ended: the middleware leaves the span on the request."""
    request = make_mocked_request("GET", "/v1/conversations")
    request[SPAN_CONTEXT] = SpanContext(0xABC, 0xDEF, is_remote=False)
    logger = logging.getLogger("tests.access")
    with caplog.at_level(logging.INFO, logger="tests.access"):
        AccessLogger(logger, "").log(request, web.Response(), 0.001)
    line = orjson.loads(JsonFormatter().format(caplog.records[-1]))
    assert line["trace_id"] == f"{0xABC:032x}"
    assert line["span_id"] == f"{0xDEF:016x}"


# --- configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("OTEL_TRACES_SAMPLER", "sometimes"),
        ("OTEL_TRACES_SAMPLER_ARG", "a tenth"),
        ("OTEL_TRACES_SAMPLER_ARG", "1.5"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318"),
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "ftp://collector/v1/traces"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector.example:4318?token=hunter2"),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ("OTEL_SDK_DISABLED", "perhaps"),
    ],
)
def test_a_bad_otel_variable_stops_serve_with_exit_2(variable, value):
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("OTEL_")},
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9",
        variable: value,
    }
    command = Path(sys.executable).with_name("conversations")
    done = subprocess.run(
        [command, "serve"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 2
    assert "invalid configuration" in done.stderr
    assert f"  {variable}: " in done.stderr
    assert value not in done.stderr  # a value may hold a secret: never echoed


@pytest.mark.parametrize(
    ("variables", "endpoint"),
    [
        ({}, None),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"},
            "http://collector:4318/v1/traces",
        ),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "https://c.example/otlp/"},
            "https://c.example/otlp/v1/traces",
        ),
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318",
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://traces:4318/custom",
            },
            "http://traces:4318/custom",
        ),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_SDK_DISABLED": "true"},
            None,
        ),
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318",
                "OTEL_TRACES_EXPORTER": "none",
            },
            None,
        ),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": ""}, None),
    ],
)
def test_tracing_is_off_unless_an_endpoint_is_set(monkeypatch, variables, endpoint):
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("DATABASE_URL", os.environ.get("DATABASE_URL", "postgres://x/y"))
    monkeypatch.setenv("AMQP_URL", os.environ.get("AMQP_URL", "amqp://x/"))
    monkeypatch.setenv("JWT_HS256_SECRETS", "s" * 40)
    settings = load_settings().tracing
    assert settings.endpoint == endpoint
    assert settings.enabled is (endpoint is not None)
