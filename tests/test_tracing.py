"""One trace per request across the gateway, the scheduler and the worker (real services, real gRPC)."""

from __future__ import annotations

import pytest
from google.protobuf import wrappers_pb2 as w
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from llmserve.common import tracing
from llmserve.inference.v1 import inference_pb2 as pb
from tests.helpers.mesh import generate_version, start_mesh


@pytest.fixture(scope="module")
def spans():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)  # once per process; the services' tracers are proxies that follow it
    return exporter


@pytest.fixture(scope="module")
async def mesh(spans, make_config, tiny_llama_dir):
    folder = tiny_llama_dir
    mesh = await start_mesh(make_config(), versions=[generate_version("t-v1", f"file:{folder}")],
                            aliases={"t": [("t-v1", 1)]}, worker_models=[["t-v1"]])
    yield mesh
    await mesh.stop()


async def test_a_request_is_one_trace_across_every_hop(mesh, spans):
    spans.clear()
    await mesh.stub.CreateCompletion(pb.CreateCompletionRequest(
        model="t", prompt="Hello", max_tokens=w.Int32Value(value=3), skip_cache=True), metadata=mesh.auth)
    by_name = {s.name: s for s in spans.get_finished_spans()}
    gateway = by_name["InferenceService/CreateCompletion"]
    scheduler = by_name["SchedulerService/Submit"]
    worker = by_name["WorkerService/task"]
    assert gateway.context.trace_id == scheduler.context.trace_id == worker.context.trace_id
    assert scheduler.parent.span_id == gateway.context.span_id
    assert worker.parent.span_id == scheduler.context.span_id
    assert gateway.attributes["llmserve.model_version"] == "t-v1" and gateway.attributes["rpc.grpc.status"] == "OK"
    assert worker.attributes["llmserve.completion_tokens"] == 3
    assert any(e.name == "dispatched" for e in scheduler.events)
    # Prompts never become span attributes.
    assert all("Hello" not in str(v) for s in (gateway, scheduler, worker) for v in s.attributes.values())


def test_no_endpoint_installs_nothing():
    assert tracing.configure("gateway", "") is False
