"""Protobuf's wire format, written independently of theria_jax._launch, to build and read back
jaxlib's serialized Triton calls (jaxlib/gpu/triton.proto) in tests without protobuf installed.

A message is a list of ``(field number, value)``: an int is a varint, ``("fixed32", x)`` a float in
4 bytes, ``("fixed64", x)`` a double in 8, bytes or str a length-delimited string, a list a nested
message. :func:`decode` reads the same form back, given which fields are nested messages."""

from __future__ import annotations

import struct


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # a negative int is its 64-bit two's complement
    out = b""
    while True:
        low, value = value & 0x7F, value >> 7
        out += bytes([low | (0x80 if value else 0)])
        if not value:
            return out


def encode(fields: list) -> bytes:
    out = b""
    for number, value in fields:
        if isinstance(value, tuple):
            kind, x = value
            out += _varint(number << 3 | (5 if kind == "fixed32" else 1))
            out += struct.pack("<f" if kind == "fixed32" else "<d", x)
        elif isinstance(value, int):
            out += _varint(number << 3) + _varint(value)
        else:
            payload = encode(value) if isinstance(value, list) else value.encode() if isinstance(value, str) else value
            out += _varint(number << 3 | 2) + _varint(len(payload)) + payload
    return out


def decode(message: bytes, messages: dict | None = None) -> list:
    """``message`` as ``(number, value)`` pairs; ``messages`` maps the field numbers that hold
    nested messages to their own ``messages`` map (other length-delimited fields stay bytes)."""
    messages, fields, at = messages or {}, [], 0

    def varint():
        nonlocal at
        value = shift = 0
        while True:
            byte = message[at]
            at += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value

    while at < len(message):
        tag = varint()
        number, wire_type = tag >> 3, tag & 7
        if wire_type == 0:
            fields.append((number, varint()))
        elif wire_type in (1, 5):
            width = 8 if wire_type == 1 else 4
            fields.append((number, ("fixed64" if width == 8 else "fixed32",
                                    struct.unpack("<d" if width == 8 else "<f", message[at:at + width])[0])))
            at += width
        elif wire_type == 2:
            length = varint()
            payload, at = message[at:at + length], at + length
            fields.append((number, decode(payload, messages[number]) if number in messages else payload))
        else:
            raise ValueError(f"wire type {wire_type}")
    return fields


# jaxlib/gpu/triton.proto: TritonAnyKernelCall.kernel_call (1) -> TritonKernelCall: kernel (1) ->
# TritonKernel: module_image (11); parameters (5) -> Parameter: array (1).
ANY_KERNEL_CALL = {1: {1: {11: {}}, 5: {1: {}}}}


def kernel_call(kernel_name: str, shared: int, grid, parameters, name: str) -> bytes:
    """A ``TritonAnyKernelCall`` as jaxlib's ``TritonKernelCall.to_proto`` serialises it: the kernel
    (PTX and TTIR stood in for by short strings), the grid, one parameter per recorded
    ``("array", bytes_to_zero)`` or ``(kind, value)``, and the call's name."""
    kernel = [(1, kernel_name), (2, 4), (3, shared), (4, "// ptx"), (5, "// ttir"), (6, 90), (10, 1)]
    encoded = []
    for kind, value in parameters:
        if kind == "array":
            encoded.append((5, [(1, [(1, value), (2, 16)])]))
        elif isinstance(value, float):
            encoded.append((5, [(7, ("fixed32", value))] if kind == "fp32" else [(8, ("fixed64", value))]))
        else:
            encoded.append((5, [(3, int(value))]))
    return encode([(1, [(1, kernel), (2, grid[0]), (3, grid[1]), (4, grid[2]), *encoded]), (4, name)])
