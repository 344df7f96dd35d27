"""The relay's PRODUCER span of each published event, in the trace of the request that wrote it.

The outbox row keeps the trace context of the writing request (its SERVER span, as a W3C
traceparent) and the event's AMQP headers carry that same context: the event was created by
the request, so a subscriber's CONSUMER span lands in the request's trace (the messaging
semantic conventions' "creation context"). The publish span is a child of it too, a sibling of
the subscribers' spans. It starts when its batch is handed to the channel and ends when the
broker has confirmed the event (or the batch failed): its length is the publish-to-confirm
latency. The relay starts no trace of its own: an event whose stored context is absent or not
sampled gets no span, and with tracing off nothing here runs past the first check.
"""

from collections.abc import Sequence

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, StatusCode, TraceFlags

from service import tracing
from service.events.broker import Outgoing

# One span per event, or None for an event that is not traced.
PublishSpans = list[trace.Span | None]


def _parent(traceparent: object) -> Context | None:
    """The stored context as a span's parent, if present and sampled; None otherwise."""
    # A well-formed traceparent (the handlers store no other): version-trace_id-span_id-flags.
    if not isinstance(traceparent, str) or not int(traceparent[53:55], 16) & TraceFlags.SAMPLED:
        return None
    stored = SpanContext(
        trace_id=int(traceparent[3:35], 16),
        span_id=int(traceparent[36:52], 16),
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
    )
    return trace.set_span_in_context(NonRecordingSpan(stored)) if stored.is_valid else None


def start_publish_spans(exchange: str, messages: Sequence[Outgoing]) -> PublishSpans | None:
    """A PRODUCER span per message whose stored context is sampled; None with tracing off."""
    tracer = tracing.tracer()
    if tracer is None:
        return None
    spans: PublishSpans = []
    for message in messages:
        properties = message.properties
        parent = _parent(properties.headers.get("traceparent") if properties.headers else None)
        if parent is None:
            spans.append(None)
            continue
        spans.append(
            tracer.start_span(
                f"publish {exchange}",
                context=parent,
                kind=SpanKind.PRODUCER,
                attributes={
                    "messaging.system": "rabbitmq",
                    "messaging.operation.type": "send",
                    "messaging.operation.name": "publish",
                    "messaging.destination.name": exchange,
                    "messaging.rabbitmq.destination.routing_key": message.routing_key,
                    "messaging.message.id": properties.message_id or "",
                    "messaging.message.body.size": len(message.body),
                },
            )
        )
    return spans


def end_publish_spans(
    spans: PublishSpans | None, confirmed: int, failure: BaseException | None
) -> None:
    """End the spans of a batch whose first `confirmed` messages the broker confirmed; the rest
    failed with `failure` (they stay pending and are published again, in spans of their own)."""
    if spans is None:
        return
    for index, span in enumerate(spans):
        if span is None:
            continue
        if index >= confirmed:
            span.set_attribute(
                "error.type", type(failure).__qualname__ if failure else "unconfirmed"
            )
            span.set_status(StatusCode.ERROR)
        span.end()
