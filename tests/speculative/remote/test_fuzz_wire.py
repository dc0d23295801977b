"""Property-based fuzzing of ``wire.decode`` on hostile bodies, with a fixed budget (DESIGN 3.2).

Every input -- random bytes, mutated or truncated valid bodies, entries declaring huge or lying shapes --
either decodes to tensors whose bytes are the body's own (re-encoding gives the body back; the tensors
view its memory) or raises ``WireFormatError``: no other exception, no hang (deadline + timeout), no
allocation beyond the body. ``bench/fuzz_wire.py --seconds N`` runs the same properties for longer.
"""

from __future__ import annotations

import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.fuzz_wire import (
    MAGIC,
    check_wire_body,
    huge_shape_bodies,
    mutated_bodies,
    truncated_bodies,
    valid_bodies,
)
from tandem.speculative.remote import wire

pytestmark = pytest.mark.timeout(120)

# A fixed budget: the same number of examples on every run, and a per-example deadline that no honest
# decode of a <1 KiB body comes near (a hang fails it, or the pytest timeout).
FUZZ = settings(max_examples=250, deadline=2000, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@FUZZ
@given(st.binary(max_size=256))
def test_random_bytes_decode_in_place_or_raise_wire_format_error(garbage):
    check_wire_body(garbage)
    check_wire_body(MAGIC + garbage)


@FUZZ
@given(mutated_bodies())
def test_mutated_valid_bodies_decode_in_place_or_raise_wire_format_error(body):
    check_wire_body(body)


@FUZZ
@given(truncated_bodies())
def test_truncated_bodies_decode_in_place_or_raise_wire_format_error(body):
    check_wire_body(body)


@FUZZ
@given(huge_shape_bodies())
def test_huge_or_lying_shapes_never_allocate_and_raise_wire_format_error(body):
    # A few real bytes can never back a huge shape: anything that decodes holds at most the body.
    if check_wire_body(body):
        tensors = wire.decode(bytearray(body)).values()
        assert sum(t.numel() * t.element_size() for t in tensors if t is not None) <= len(body)


@FUZZ
@given(valid_bodies)
def test_valid_bodies_always_decode(body):
    assert check_wire_body(body)


@pytest.mark.parametrize("shape",
                         [(0, 2**62, 4), (0, 2**61, 4), (2**56, 2**56, 0), (2**62, 0, 2**62), (1, 0, 2**63 - 1, 2)])
def test_empty_tensor_whose_other_dims_overflow_is_a_wire_format_error(shape):
    """Found by the fuzzer: numel is 0, yet torch.empty raised RuntimeError computing strides or storage
    size from the other dims ("Stride calculation overflowed", "Storage size calculation overflowed")."""
    body = MAGIC + struct.pack("<I", 1) + b"a" + struct.pack("<BBB", 0, 0, len(shape))
    body += b"".join(struct.pack("<q", d) for d in shape) + struct.pack("<Q", 0)
    with pytest.raises(wire.WireFormatError, match="overflows int64 bytes"):
        wire.decode(bytearray(body))


def test_empty_tensor_with_large_but_representable_dims_round_trips():
    tensor = torch.empty(2**20, 0, 2**30)
    body = wire.encode_to_bytes({"e": tensor})
    assert check_wire_body(body)
    assert wire.decode(bytearray(body))["e"].shape == tensor.shape


def test_the_checker_itself_catches_a_decoder_that_copies(monkeypatch):
    """The in-place check can fail: a decoder that returns copies is caught."""
    original = wire.decode
    monkeypatch.setattr(wire, "decode",
                        lambda buffer: {k: None if v is None else v.clone() for k, v in original(buffer).items()})
    with pytest.raises(AssertionError, match="not a view of the body"):
        check_wire_body(wire.encode_to_bytes({"x": torch.arange(4)}))
