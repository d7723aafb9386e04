"""Record values: compact protobuf JSON with sorted keys; decoding ignores fields it does not know (newer writers)."""

from __future__ import annotations

import typing

from google.protobuf import json_format
from google.protobuf.message import Message

M = typing.TypeVar("M", bound=Message)


def encode(record: Message) -> bytes:
    return json_format.MessageToJson(record, indent=None, sort_keys=True).encode()


def decoder(cls: type[M]) -> typing.Callable[[bytes], M]:
    def decode(data: bytes) -> M:
        return json_format.Parse(data, cls(), ignore_unknown_fields=True)
    return decode
