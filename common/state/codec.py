"""Record values: compact protobuf JSON with sorted keys; decoding ignores fields it does not know (newer writers)."""

from __future__ import annotations

import typing

from google.protobuf import json_format

M = typing.TypeVar("M")


def encode(message) -> bytes:
    return json_format.MessageToJson(message, indent=None, sort_keys=True).encode()


def decoder(cls: type[M]) -> typing.Callable[[bytes], M]:
    def decode(data: bytes) -> M:
        return json_format.Parse(data, cls(), ignore_unknown_fields=True)
    return decode
