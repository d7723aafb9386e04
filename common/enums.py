"""Enum values no enum defines. Proto3 enums are open: any int32 decodes into an enum field, so a request can carry
`state: 68`. A handler that stores it, or names it (`ModelState.Name(68)` raises ValueError, an INTERNAL error),
breaks; the server refuses such requests when it decodes them (common/server.py), with a message naming the field
and the values it takes."""

from __future__ import annotations

import functools

from google.protobuf import descriptor as d
from google.protobuf.message import Message


@functools.cache
def _fields_to_check(descriptor: d.Descriptor) -> tuple[d.FieldDescriptor, ...]:
    """The fields of `descriptor` that are enums or lead to one (checked per message type once)."""
    return tuple(f for f in descriptor.fields if f.enum_type is not None or
                 (f.message_type is not None and _has_enum(f.message_type, frozenset())))


def _has_enum(descriptor: d.Descriptor, seen: frozenset[str]) -> bool:
    if descriptor.full_name in seen:
        return False
    seen = seen | {descriptor.full_name}
    return any(f.enum_type is not None or (f.message_type is not None and _has_enum(f.message_type, seen))
               for f in descriptor.fields)


def _refusal(path: str, value: int, enum: d.EnumDescriptor) -> str:
    names = [v.name for v in enum.values if v.number != 0] or [v.name for v in enum.values]
    return f"{path}={value} is not a value of {enum.name}: use one of {', '.join(names)}"


def undefined_enum(message: Message, prefix: str = "") -> str | None:
    """A message naming the first enum field (at any depth) whose value its enum does not define, or None."""
    for field in _fields_to_check(message.DESCRIPTOR):
        path = prefix + field.name
        value = getattr(message, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            items = [(f"{path}[{k!r}]", v) for k, v in value.items()]
            field = value_field
        elif field.is_repeated:
            items = [(f"{path}[{i}]", v) for i, v in enumerate(value)]
        elif field.message_type is not None and not message.HasField(field.name):
            continue
        else:
            items = [(path, value)]
        for item_path, item in items:
            if field.enum_type is not None:
                if item not in field.enum_type.values_by_number:
                    return _refusal(item_path, item, field.enum_type)
            elif (found := undefined_enum(item, item_path + ".")) is not None:
                return found
    return None
