"""Priority classes, as the protos define them: 1 interactive, 2 standard, 3 batch; lower is served first."""

from __future__ import annotations

import typing

from llmserve.inference.v1 import inference_pb2 as pb

INTERACTIVE, STANDARD, BATCH = pb.PRIORITY_INTERACTIVE, pb.PRIORITY_STANDARD, pb.PRIORITY_BATCH
NUM_CLASSES = 3


def from_pb(value: int) -> int:
    """A Priority enum value as a class 1..3: unset means standard (the proto's rule). Raises ValueError for a
    value the enum does not define."""
    if value not in pb.Priority.values():
        raise ValueError(f"priority={value} is unknown; use PRIORITY_INTERACTIVE, PRIORITY_STANDARD or "
                         "PRIORITY_BATCH")
    return value or STANDARD


def to_pb(value: int) -> pb.Priority.ValueType:
    """A class 1..3 as the enum's value type (the generated stubs type enum fields as their own int type)."""
    return typing.cast(pb.Priority.ValueType, value)


def name(value: int) -> str:
    return pb.Priority.Name(to_pb(value))
