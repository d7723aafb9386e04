"""What a caller reads when a task fails behind the gateway: the mesh's own text (worker ids, addresses, engine
errors) stays in the gateway's log; only messages written for the caller pass on."""

from __future__ import annotations

import grpc
import pytest

from llmserve.dispatch.v1 import task_pb2
from llmserve.gateway.scheduler_client import public_error

TASK = task_pb2.Task(request_id="0123abcd-3", model_version="tiny-v1")
LEAKS = ("worker-a", "10.0.0.7", "50061", "torch", "probability tensor", "ipv4")


@pytest.mark.parametrize("code, detail, dispatched, expected_code, needle", [
    (grpc.StatusCode.UNAVAILABLE, "worker worker-a went away while running the request (UNAVAILABLE: "
     "ipv4:10.0.0.7:50061: Connection reset); retry it", True, grpc.StatusCode.UNAVAILABLE, "went away"),
    (grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses; last error: UNKNOWN: ipv4:10.0.0.7:50061: "
     "Failed to connect to remote host", False, grpc.StatusCode.UNAVAILABLE, "no worker serves model version"),
    (grpc.StatusCode.INTERNAL, "generation failed: probability tensor contains either inf, nan or element < 0 "
     "(torch)", True, grpc.StatusCode.INTERNAL, "report request id 0123abcd"),
    (grpc.StatusCode.UNKNOWN, "Unexpected <class 'RuntimeError'>: worker-a", True, grpc.StatusCode.INTERNAL,
     "failed to run the request"),
    (grpc.StatusCode.UNAUTHENTICATED, "mesh token of worker-a rejected", False, grpc.StatusCode.INTERNAL,
     "failed to run the request"),
    (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded at 10.0.0.7", True, grpc.StatusCode.DEADLINE_EXCEEDED,
     "deadline passed"),
])
def test_mesh_failures_reach_the_caller_without_internals(code, detail, dispatched, expected_code, needle):
    error = public_error(code, detail, TASK, dispatched=dispatched)
    assert error.code == expected_code and needle in error.message
    assert "tiny-v1" in error.message
    for leak in LEAKS:
        assert leak not in error.message


def test_messages_written_for_the_caller_pass_on():
    detail = "prompt is 600 tokens, but model 'tiny-v1' has a context length of 512 tokens: shorten the prompt"
    for code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED):
        error = public_error(code, detail, TASK, dispatched=True)
        assert error.code == code and error.message == detail
