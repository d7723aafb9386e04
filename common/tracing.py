"""OpenTelemetry traces across every hop: one trace per request, gateway -> scheduler -> worker.

The context travels in gRPC metadata from the gateway to the scheduler, and in Task.trace_context from the
scheduler to the worker (that hop is one multiplexed stream, so call metadata cannot carry it per task).
Without a configured collector no provider is installed and every span is the API's no-op: tracing costs nothing.
"""

from __future__ import annotations

import typing

from opentelemetry import propagate, trace


def configure(service: str, otlp_endpoint: str) -> bool:
    """Installs the SDK with an OTLP/gRPC exporter when an endpoint is configured. Returns whether it did."""
    if not otlp_endpoint:
        return False
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": f"llmserve-{service}"}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint, insecure=True)))
    trace.set_tracer_provider(provider)
    return True


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


def inject(span: trace.Span | None = None) -> dict[str, str]:
    """The context of `span` (default: the current span) as W3C headers."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span) if span is not None else None)
    return carrier


def extract(carrier: typing.Mapping[str, str]):
    return propagate.extract(dict(carrier))
