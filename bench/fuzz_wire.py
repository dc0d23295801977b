"""Fuzz the remote target's parsers: ``wire.decode`` and the control-plane JSON (DESIGN 3.2, 3.1).

    .venv/bin/python -m bench.fuzz_wire --seconds 300            # the long run; the suite runs a short one

Every body a server or client receives is hostile. The property checked on each generated input:

- ``wire.decode`` either returns tensors whose bytes *are* the body (re-encoding gives the body back,
  byte for byte, and every tensor views the body's own memory) or raises ``WireFormatError``; never
  another exception, never a hang, never an allocation beyond the body's size;
- ``protocol.decode_json`` / ``decode_nccl_metadata`` either parse or raise ``ProtocolError``.

Inputs: random bytes, mutated valid bodies (byte flips, inserts, deletes), truncated valid bodies and
entries declaring huge, negative or lying shapes, ``ndim`` and ``nbytes`` over a few real bytes. The
long run repeats hypothesis with fresh seeds until ``--seconds`` is spent, inside an address-space limit
(``RLIMIT_AS``) so that any large allocation fails loudly instead of passing unnoticed.

The strategies and checks here are shared with ``tests/speculative/remote/test_fuzz_wire.py`` and
``tests/speculative/remote/test_fuzz_json_endpoints.py``.
"""

from __future__ import annotations

import argparse
import json
import resource
import struct
import sys
import time
import tracemalloc

import torch
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from tandem.speculative.remote import protocol, wire

MAGIC = struct.pack("<I", wire.MAGIC)
# Python-level allocations decode may make beyond the body (the shape list, the error message).
ALLOC_SLACK_BYTES = 64 * 1024
# Dimensions that hit the edge cases of the shape checks.
EDGE_DIMS = [0, 1, 2, 3, 2**31, 2**32, 2**61, 2**62, 2**63 - 1, -1, -(2**63)]

# ---------------------------------------------------------------- inputs


def _tensor_for(dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.randint(0, 2, shape).bool()
    if dtype.is_floating_point:
        return torch.randn(shape).to(dtype)
    return torch.randint(-100, 100, shape).to(dtype)


valid_dicts = st.lists(
    st.tuples(
        st.text(max_size=6),
        st.sampled_from([*wire.DTYPE_TO_CODE, None]),
        st.lists(st.integers(min_value=0, max_value=4), max_size=3),
    ),
    max_size=4,
    unique_by=lambda item: item[0],
).map(lambda items: {key: None if dtype is None else _tensor_for(dtype, shape) for key, dtype, shape in items})
valid_bodies = valid_dicts.map(wire.encode_to_bytes)


@st.composite
def mutated_bodies(draw) -> bytes:
    """A valid body with a few byte flips, inserts and deletes at random places."""
    body = bytearray(draw(valid_bodies))
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        kind = draw(st.sampled_from(["set", "insert", "delete"]))
        at = draw(st.integers(min_value=0, max_value=len(body)))
        if kind == "set" and at < len(body):
            body[at] = draw(st.integers(min_value=0, max_value=255))
        elif kind == "insert":
            body[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            del body[at : at + draw(st.integers(min_value=1, max_value=16))]
    return bytes(body)


@st.composite
def truncated_bodies(draw) -> bytes:
    body = draw(valid_bodies)
    return body[: draw(st.integers(min_value=0, max_value=len(body)))]


@st.composite
def huge_shape_bodies(draw) -> bytes:
    """One entry whose header declares any dtype code, ndim, shape and nbytes over a few real bytes."""
    key = draw(st.binary(max_size=4))
    dims = draw(st.lists(st.one_of(st.sampled_from(EDGE_DIMS), st.integers(-(2**63), 2**63 - 1)), max_size=8))
    ndim = draw(st.one_of(st.just(len(dims)), st.integers(min_value=0, max_value=255)))
    code = draw(st.one_of(st.integers(min_value=0, max_value=9), st.integers(min_value=0, max_value=255)))
    numel = 1
    for dim in dims:
        numel *= dim
    itemsize = wire.CODE_TO_DTYPE[code].itemsize if code in wire.CODE_TO_DTYPE else 1
    consistent = numel * itemsize
    nbytes = draw(st.one_of(st.just(consistent), st.integers(min_value=0, max_value=2**64 - 1)))
    nbytes = nbytes if 0 <= nbytes < 2**64 else 0
    head = struct.pack("<I", len(key)) + key + struct.pack("<BBB", 0, code, ndim)
    head += b"".join(struct.pack("<q", d) for d in dims) + struct.pack("<Q", nbytes)
    return MAGIC + head + draw(st.binary(max_size=32))


hostile_bodies = st.one_of(
    st.binary(max_size=256),
    st.binary(max_size=256).map(lambda b: MAGIC + b),
    mutated_bodies(),
    truncated_bodies(),
    huge_shape_bodies(),
)

# JSON: any value, the fields the endpoints read with wrong types, numbers past every limit.
json_scalars = st.one_of(
    st.none(), st.booleans(), st.text(max_size=8),
    st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([0, -1, 65535, 65536, 2**31, 2**63, 10**40]),
)
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)
json_objects = st.one_of(
    json_values,
    st.fixed_dictionaries({"nccl_port": json_values}),
    st.fixed_dictionaries({"keys_order": json_values, "metadata": json_values}),
    st.fixed_dictionaries({"keys_order": st.just(["a"]), "metadata": st.fixed_dictionaries(
        {"a": st.one_of(json_values, st.fixed_dictionaries({"dtype_code": json_values, "shape": json_values}))})}),
)
json_bodies = st.one_of(
    json_objects.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=64),
    # Past Python's limits: a 5000-digit integer (int_max_str_digits) and nesting deeper than the stack.
    st.integers(min_value=4301, max_value=20_000).map(lambda n: b'{"nccl_port": 1' + b"0" * n + b"}"),
    st.integers(min_value=1, max_value=200_000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(min_value=1, max_value=200_000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
)

# ---------------------------------------------------------------- the properties


def _address(buffer: bytearray) -> int:
    return torch.frombuffer(buffer, dtype=torch.uint8).data_ptr()


def check_wire_body(body: bytes) -> bool:
    """Decode ``body``; True if it decoded (and the result is the body, in place), False if refused.

    Raises AssertionError on a violation, and lets any exception other than ``WireFormatError`` escape.
    """
    buffer = bytearray(body)
    started_tracing = not tracemalloc.is_tracing()
    if started_tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        out = wire.decode(buffer)
    except wire.WireFormatError:
        return False
    finally:
        _, peak = tracemalloc.get_traced_memory()
        if started_tracing:
            tracemalloc.stop()
        # Python-level allocations stay within the body plus a little bookkeeping.
        assert peak <= len(body) + ALLOC_SLACK_BYTES, f"decode allocated {peak} bytes for a {len(body)}-byte body"
    # Tensors are views of the body: re-encoding gives the body back, and their memory lies inside it.
    assert wire.encode_to_bytes(out) == body
    start, end = _address(buffer), _address(buffer) + len(buffer)
    for key, tensor in out.items():
        if tensor is None:
            continue
        assert tensor.untyped_storage().nbytes() <= len(body), key
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes:
            assert start <= tensor.data_ptr() and tensor.data_ptr() + nbytes <= end, \
                f"{key!r} is not a view of the body"
    return True


def check_json_body(raw: bytes) -> None:
    """The control-plane JSON parsers either parse ``raw`` or raise ``ProtocolError``, nothing else."""
    try:
        protocol.decode_json(raw)
    except protocol.ProtocolError:
        pass
    try:
        keys_order, metadata = protocol.decode_nccl_metadata(raw)
    except protocol.ProtocolError:
        return
    for key in keys_order:  # what parsed is safe to allocate from: known dtype, int shape within int64
        entry = metadata[key]
        if entry is not None:
            protocol.dtype_from_code(entry["dtype_code"])
            numel = 1
            for dim in entry["shape"]:
                numel *= dim
            assert numel * protocol.dtype_from_code(entry["dtype_code"]).itemsize <= 2**63 - 1


# ---------------------------------------------------------------- the long run


def _run_rounds(seconds: float, examples_per_round: int) -> dict:
    counts = {"wire_decoded": 0, "wire_refused": 0, "json": 0, "rounds": 0}
    fuzz_settings = settings(max_examples=examples_per_round, deadline=2000, database=None,
                             suppress_health_check=list(HealthCheck))

    @fuzz_settings
    @given(hostile_bodies)
    def fuzz_wire(body):
        counts["wire_decoded" if check_wire_body(body) else "wire_refused"] += 1

    @fuzz_settings
    @given(json_bodies)
    def fuzz_json(raw):
        check_json_body(raw)
        counts["json"] += 1

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        round_seed = counts["rounds"]
        seed(round_seed)(fuzz_wire)()
        seed(round_seed)(fuzz_json)()
        counts["rounds"] += 1
    return counts


def _limit_address_space(extra_mb: int) -> None:
    """Cap virtual memory at what the process holds now plus ``extra_mb``: a big allocation then fails."""
    with open("/proc/self/statm") as statm:
        current = int(statm.read().split()[0]) * resource.getpagesize()
    limit = current + extra_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="time budget (default: 60)")
    parser.add_argument("--examples-per-round", type=int, default=2000, help="hypothesis examples per seed")
    parser.add_argument("--rlimit-mb", type=int, default=512, help="address space allowed beyond startup (0: no limit)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    check_wire_body(wire.encode_to_bytes({"warm": torch.ones(2)}))  # first-call imports are not decode's cost
    if args.rlimit_mb:
        _limit_address_space(args.rlimit_mb)
    started = time.monotonic()
    counts = _run_rounds(args.seconds, args.examples_per_round)
    elapsed = time.monotonic() - started
    total = counts["wire_decoded"] + counts["wire_refused"]
    print(f"fuzz_wire: {total} wire bodies ({counts['wire_decoded']} decoded, {counts['wire_refused']} refused) and "
          f"{counts['json']} JSON bodies in {elapsed:.0f} s over {counts['rounds']} rounds: no violation")
    return 0


if __name__ == "__main__":
    sys.exit(main())
