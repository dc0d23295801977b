"""Wire format v1: hand-built test vectors, zero-copy encode/decode, and every malformed body of DESIGN 3.2.

The vectors are written from the spec with ``struct`` (and one as a literal hex string), never with
``encode``, so the encoder and the decoder are each checked against the spec rather than each other.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tandem.speculative.remote import wire
from tandem.speculative.remote.wire import WireFormatError, decode, encode, encode_to_bytes

MAGIC = struct.pack("<I", 0x4E4D4554)


def entry(key: str | bytes, code: int | None = None, shape=(), data: bytes = b"", nbytes: int | None = None,
          flags=None):
    """One entry exactly as DESIGN 3.2 lays it out; ``code=None`` is a None value."""
    key_bytes = key.encode("utf-8") if isinstance(key, str) else key
    out = struct.pack("<I", len(key_bytes)) + key_bytes
    if code is None:
        return out + struct.pack("<B", 0x01 if flags is None else flags)
    out += struct.pack("<BBB", 0 if flags is None else flags, code, len(shape))
    out += b"".join(struct.pack("<q", d) for d in shape)
    out += struct.pack("<Q", len(data) if nbytes is None else nbytes)
    return out + data


def assert_same(actual: dict, expected: dict) -> None:
    assert list(actual) == list(expected)
    for key, want in expected.items():
        got = actual[key]
        if want is None:
            assert got is None, key
            continue
        assert got.dtype == want.dtype, key
        assert got.shape == want.shape, key
        assert torch.equal(got, want), key


# ---------------------------------------------------------------- test vectors

# {"x": tensor([1.0, -2.0])} written out byte by byte.
VECTOR_F32_HEX = (
    "54454d4e"  # magic 0x4E4D4554, little-endian
    "01000000" "78"  # key_len 1, "x"
    "00" "00" "01"  # flags 0, dtype f32, ndim 1
    "0200000000000000"  # shape [2]
    "0800000000000000"  # nbytes 8
    "0000803f" "000000c0"  # 1.0, -2.0
)


def test_literal_hex_vector_decodes_and_encodes_byte_for_byte():
    body = bytes.fromhex(VECTOR_F32_HEX)
    expected = {"x": torch.tensor([1.0, -2.0])}
    assert_same(decode(bytearray(body)), expected)
    assert encode_to_bytes(expected) == body


def mixed_vector():
    """A body with every kind of entry: None, scalar, empty, bool, bf16, 2-D int64, a non-ASCII key."""
    expected = {
        "none": None,
        "scalar_i32": torch.tensor(-7, dtype=torch.int32),
        "empty_f16": torch.zeros(0, 3, dtype=torch.float16),
        "mask": torch.tensor([[True, False, True]]),
        "bf16": torch.tensor([1.5, -0.25], dtype=torch.bfloat16),
        "ids": torch.tensor([[1, 2], [3, 2**40]], dtype=torch.int64),
        "größe": torch.tensor([255, 0], dtype=torch.uint8),
    }
    body = MAGIC
    body += entry("none")
    body += entry("scalar_i32", 5, (), struct.pack("<i", -7))
    body += entry("empty_f16", 2, (0, 3), b"")
    body += entry("mask", 9, (1, 3), bytes([1, 0, 1]))
    # bf16 is the top half of the f32 bit pattern: 1.5 = 0x3FC00000, -0.25 = 0xBE800000.
    body += entry("bf16", 3, (2,), struct.pack("<HH", 0x3FC0, 0xBE80))
    body += entry("ids", 4, (2, 2), struct.pack("<4q", 1, 2, 3, 2**40))
    body += entry("größe", 8, (2,), bytes([255, 0]))
    return body, expected


def test_mixed_vector_decodes_and_encodes_byte_for_byte():
    body, expected = mixed_vector()
    assert_same(decode(bytearray(body)), expected)
    assert encode_to_bytes(expected) == body


@pytest.mark.parametrize(
    "code,dtype,values,packed",
    [
        (0, torch.float32, [0.5], struct.pack("<f", 0.5)),
        (1, torch.float64, [0.1], struct.pack("<d", 0.1)),
        (2, torch.float16, [2.0], struct.pack("<e", 2.0)),
        (3, torch.bfloat16, [-2.0], struct.pack("<H", 0xC000)),
        (4, torch.int64, [-(2**62)], struct.pack("<q", -(2**62))),
        (5, torch.int32, [-5], struct.pack("<i", -5)),
        (6, torch.int16, [-300], struct.pack("<h", -300)),
        (7, torch.int8, [-3], struct.pack("<b", -3)),
        (8, torch.uint8, [200], struct.pack("<B", 200)),
        (9, torch.bool, [True], b"\x01"),
    ],
)
def test_every_dtype_code_matches_the_spec(code, dtype, values, packed):
    body = MAGIC + entry("t", code, (1,), packed)
    expected = {"t": torch.tensor(values, dtype=dtype)}
    assert_same(decode(bytearray(body)), expected)
    assert encode_to_bytes(expected) == body


def test_empty_dict_is_just_the_magic():
    assert encode_to_bytes({}) == MAGIC
    assert decode(MAGIC) == {}


# ---------------------------------------------------------------- zero copy


def test_encode_references_tensor_memory_without_copying():
    tensor = torch.arange(1024, dtype=torch.float32)
    buffers = encode({"t": tensor})
    data_views = [b for b in buffers if isinstance(b, memoryview)]
    assert len(data_views) == 1
    assert np.asarray(data_views[0]).ctypes.data == tensor.data_ptr()
    tensor[0] = 42.0  # the body sees later writes: proof that it references, not copies
    assert decode(bytearray(b"".join(buffers)))["t"][0].item() == 42.0
    assert wire.body_size(buffers) == len(b"".join(buffers))


def test_decode_views_the_buffer_in_place():
    body, _ = mixed_vector()
    buf = bytearray(body)
    out = decode(buf)
    base = np.frombuffer(buf, dtype=np.uint8).ctypes.data
    ids = out["ids"]
    assert base <= ids.data_ptr() < base + len(buf)
    offset = ids.data_ptr() - base
    buf[offset : offset + 8] = struct.pack("<q", 99)
    assert out["ids"][0, 0].item() == 99


def test_non_contiguous_and_grad_tensors_encode_as_their_values():
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    transposed = base.t()
    needs_grad = torch.ones(2, requires_grad=True)
    out = decode(bytearray(encode_to_bytes({"t": transposed, "g": needs_grad})))
    assert torch.equal(out["t"], transposed)
    assert torch.equal(out["g"], needs_grad.detach())


def test_unsupported_dtype_is_refused_at_encode():
    with pytest.raises(TypeError, match="complex64"):
        encode({"c": torch.zeros(2, dtype=torch.complex64)})


# ---------------------------------------------------------------- malformed bodies (DESIGN 3.2)

GOOD = MAGIC + entry("a", 0, (2,), struct.pack("<2f", 1.0, 2.0))

MALFORMED = {
    "empty body": (b"", "bad magic"),
    "short magic": (MAGIC[:3], "bad magic"),
    "bad magic": (b"NOPE" + GOOD[4:], "bad magic"),
    "unknown dtype": (MAGIC + entry("a", 10, (1,), b"\0"), "unknown dtype code 10"),
    "unknown dtype 255": (MAGIC + entry("a", 255, (1,), b"\0"), "unknown dtype code 255"),
    "negative shape": (MAGIC + entry("a", 0, (-1, 4), b"", nbytes=0), "negative dimension"),
    "overflowing shape": (MAGIC + entry("a", 4, (2**62, 2**62), b"", nbytes=0), "overflows"),
    "nbytes disagrees with shape": (MAGIC + entry("a", 0, (2,), b"\0" * 8, nbytes=4) + b"\0" * 4, "disagrees"),
    "nbytes past the body": (MAGIC + entry("a", 0, (2**40,), b"", nbytes=2**42), "remain"),
    "data truncated": (GOOD[:-1], "remain"),
    "key length past the body": (MAGIC + struct.pack("<I", 2**31) + b"ab", "remain"),
    "duplicate key": (GOOD + entry("a", 0, (2,), struct.pack("<2f", 1.0, 2.0)), "duplicate key 'a'"),
    "invalid utf-8 key": (MAGIC + entry(b"\xff\xfe", 0, (1,), b"\0" * 4), "UTF-8"),
    "trailing garbage": (GOOD + b"\x01\x02\x03", "trailing garbage"),
    "entry cut after the key": (GOOD + struct.pack("<I", 1) + b"b", "flags"),
    "shape cut short": (MAGIC + struct.pack("<I", 1) + b"a" + bytes([0, 0, 200]) + b"\0" * 16, "shape"),
    "unknown flag bits": (MAGIC + entry("a", 0, (1,), b"\0" * 4, flags=0x02), "flag"),
    "bool byte other than 0/1": (MAGIC + entry("m", 9, (2,), b"\x01\x02"), "other than 0 and 1"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_body_raises_wire_format_error_naming_the_problem(name):
    body, message = MALFORMED[name]
    with pytest.raises(WireFormatError, match=message) as info:
        decode(bytearray(body))
    assert isinstance(info.value, ValueError)


def test_wire_format_error_names_the_offset():
    body = MAGIC + entry("a", 0, (2,), b"\0" * 8, nbytes=4) + b"\0" * 4
    with pytest.raises(WireFormatError, match=r"offset \d+"):
        decode(body)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=64), st.integers(min_value=0, max_value=len(GOOD)))
def test_arbitrary_bytes_never_escape_as_anything_but_wire_format_error(garbage, cut):
    for body in (MAGIC + garbage, GOOD[:cut] + garbage, garbage):
        try:
            out = decode(bytearray(body))
        except WireFormatError:
            continue
        # The format is canonical: whatever decodes must re-encode to the very same bytes.
        assert encode_to_bytes(out) == body


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=4, max_value=len(GOOD) - 1), st.integers(min_value=0, max_value=255))
def test_any_single_byte_corruption_is_decoded_or_refused(position, value):
    body = bytearray(GOOD)
    body[position] = value
    try:
        out = decode(body)
    except WireFormatError:
        return
    assert encode_to_bytes(out) == bytes(body)


_DTYPES = list(wire.DTYPE_TO_CODE)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.text(min_size=0, max_size=8),
            st.sampled_from(_DTYPES + [None]),
            st.lists(st.integers(min_value=0, max_value=4), max_size=3),
        ),
        max_size=5,
        unique_by=lambda item: item[0],
    )
)
def test_random_dicts_round_trip_exactly(items):
    tensors = {}
    for key, dtype, shape in items:
        if dtype is None:
            tensors[key] = None
        elif dtype == torch.bool:
            tensors[key] = torch.randint(0, 2, shape).bool()
        elif dtype.is_floating_point:
            tensors[key] = torch.randn(shape).to(dtype)
        else:
            tensors[key] = torch.randint(-100, 100, shape).to(dtype)
    assert_same(decode(bytearray(encode_to_bytes(tensors))), tensors)


def test_decode_stops_at_the_first_entry_past_max_entries_holding_only_a_few_objects():
    """A 16 MiB body of 700,000 scalar entries: without a bound decoding builds every one (about a
    kilobyte each); with the receiver's bound it stops at the fourth, its memory a few KiB."""
    import tracemalloc

    count = 700_000
    entry = struct.pack("<I8sBBBQB", 8, b"", 0, wire.DTYPE_TO_CODE[torch.uint8], 0, 1, 7)
    keys = np.char.mod(b"%08d", np.arange(count)).astype("S8")
    body = bytearray(struct.pack("<I", wire.MAGIC) + b"".join(entry[:4] + key + entry[12:] for key in keys.tolist()))
    tracemalloc.start()
    try:
        with pytest.raises(WireFormatError, match="'00000003' at offset 76 is one more than the 3 expected"):
            decode(body, max_entries=3)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024
    assert len(decode(body[: 4 + 24 * 5])) == 5  # the same entries, unbounded, decode as ever
