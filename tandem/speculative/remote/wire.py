"""Wire format v1: named tensors as one little-endian binary body (docs/design.md, section 3.2).

    u32 magic = 0x4E4D4554
    entries until the end of the body, each:
        u32 key_len, key (UTF-8), u8 flags (bit 0: value is None)
        if not None: u8 dtype_code, u8 ndim, ndim x i64 shape, u64 nbytes, nbytes raw contiguous bytes

Every body that crosses a socket is hostile: ``decode`` checks each length against the bytes really left
before it looks at them, so a lying header costs a ``WireFormatError``, never a crash, a hang or an
allocation. Nothing here unpickles. ``encode`` hands back the tensors' own memory and ``decode`` views
tensors in place, so a round trip over a socket copies the payload only in the kernel.
"""

from __future__ import annotations

import struct
import sys
import threading
from collections.abc import Mapping
from typing import Optional, Union

import torch

MAGIC = 0x4E4D4554
FLAG_NONE = 0x01

# The v1 dtype codes; the numbers are the protocol, never reorder them.
CODE_TO_DTYPE: dict[int, torch.dtype] = {
    0: torch.float32,
    1: torch.float64,
    2: torch.float16,
    3: torch.bfloat16,
    4: torch.int64,
    5: torch.int32,
    6: torch.int16,
    7: torch.int8,
    8: torch.uint8,
    9: torch.bool,
}
DTYPE_TO_CODE: dict[torch.dtype, int] = {dtype: code for code, dtype in CODE_TO_DTYPE.items()}

_U32 = struct.Struct("<I")
_U8 = struct.Struct("<B")
_U64 = struct.Struct("<Q")
_MAGIC = _U32.pack(MAGIC)
_INT64_MAX = 2**63 - 1

Buffer = Union[bytes, bytearray, memoryview]


class WireFormatError(ValueError):
    """A body is not valid wire format v1; the message says what is wrong and at which byte offset."""


def dtype_from_code(code: int) -> torch.dtype:
    """The ``torch.dtype`` of a v1 dtype code; ``WireFormatError`` for an unknown code."""
    try:
        return CODE_TO_DTYPE[code]
    except KeyError:
        raise WireFormatError(f"unknown dtype code {code} (v1 knows 0-9)") from None


def code_from_dtype(dtype: torch.dtype) -> int:
    """The v1 dtype code of ``dtype``; ``TypeError`` for a dtype the format cannot carry."""
    try:
        return DTYPE_TO_CODE[dtype]
    except KeyError:
        raise TypeError(f"wire format v1 cannot carry dtype {dtype}") from None


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A byte view of ``tensor``'s memory: no copy for a contiguous CPU tensor (else one copy to make it so)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    # numpy exports the buffer protocol torch lacks; the view keeps the tensor's storage alive.
    return memoryview(flat.view(torch.uint8).numpy())


def encode(tensors: Mapping[str, Optional[torch.Tensor]]) -> list[Buffer]:
    """Serialize named tensors without copying their data.

    Arguments:
        tensors: key -> tensor of any shape and a v1 dtype, or None. Contiguous CPU tensors are referenced,
            not copied; a tensor on another device or non-contiguous is copied once to a contiguous CPU one.

    Returns:
        The body as a list of buffers (small header ``bytes`` interleaved with ``memoryview``s of tensor
        memory) whose concatenation is the v1 body. The tensors must not be modified until it is sent.
    """
    buffers: list[Buffer] = []
    header = bytearray(_MAGIC)
    for key, tensor in tensors.items():
        if not isinstance(key, str):
            raise TypeError(f"wire keys must be str, got {type(key).__name__}")
        key_bytes = key.encode("utf-8")
        header += _U32.pack(len(key_bytes)) + key_bytes
        if tensor is None:
            header += _U8.pack(FLAG_NONE)
            continue
        code = code_from_dtype(tensor.dtype)
        data = _tensor_bytes(tensor)
        header += struct.pack(f"<BBB{tensor.dim()}q", 0, code, tensor.dim(), *tensor.shape)
        header += _U64.pack(data.nbytes)
        if data.nbytes:
            buffers.append(bytes(header))
            buffers.append(data)
            header = bytearray()
    if header:
        buffers.append(bytes(header))
    return buffers


def encode_to_bytes(tensors: Mapping[str, Optional[torch.Tensor]]) -> bytes:
    """``encode`` joined into one ``bytes`` (one copy of the data), for callers that need a single object."""
    return b"".join(encode(tensors))


def body_size(buffers: list[Buffer]) -> int:
    """Total byte length of a list of buffers (the HTTP ``Content-Length`` of an encoded body)."""
    return sum(memoryview(b).nbytes for b in buffers)


class ReceivePool:
    """Receive buffers reused across answers, so reading a large body costs no page faults.

    A fresh 300 MB buffer costs one page fault per 4 KiB page on first touch, which halves loopback
    throughput; memory that was written before costs none. A buffer is handed out again only once nothing
    references it -- every tensor ``decode`` viewed in it is gone, for a tensor holds a reference to the
    buffer through its memoryview -- which CPython's reference count tells exactly. Answers vary in size
    with the batch's padded length, so a body is read into the head of the smallest free buffer that fits.

    Arguments:
        capacity: buffers kept; at least the answers alive at once (requests in flight + those in use).
        min_bytes: smaller bodies get a plain ``bytearray`` (their page faults do not matter).
    """

    # References to a pooled buffer nobody else holds: the pool's list, the loop variable, getrefcount's argument.
    _UNREFERENCED = 3

    def __init__(self, capacity: int = 4, min_bytes: int = 4 << 20):
        self.capacity = capacity
        self.min_bytes = min_bytes
        self._buffers: list[bytearray] = []
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> Buffer:
        """A writable buffer of exactly ``nbytes`` (a ``memoryview`` into a pooled buffer when large)."""
        if nbytes < self.min_bytes:
            return bytearray(nbytes)
        with self._lock:
            best, free, buffer = None, None, None
            for index in range(len(self._buffers)):
                buffer = self._buffers[index]
                if sys.getrefcount(buffer) > self._UNREFERENCED:
                    continue
                free = index
                if len(buffer) >= nbytes and (best is None or len(buffer) < len(self._buffers[best])):
                    best = index
            del buffer
            if best is None:
                # Headroom, so that a slightly longer batch next time still fits.
                grown = bytearray(nbytes + nbytes // 8)
                if free is not None:
                    self._buffers[free] = grown
                elif len(self._buffers) < self.capacity:
                    self._buffers.append(grown)
                else:
                    return bytearray(nbytes)  # every pooled buffer is in use: a one-off
                return memoryview(grown)[:nbytes]
            return memoryview(self._buffers[best])[:nbytes]


class _Reader:
    """A cursor over the body that refuses to read past its end."""

    def __init__(self, view: memoryview):
        self.view = view
        self.pos = 0

    @property
    def left(self) -> int:
        return len(self.view) - self.pos

    def take(self, n: int, what: str) -> int:
        """Claim the next ``n`` bytes; returns their offset."""
        if n > self.left:
            raise WireFormatError(f"{what} at offset {self.pos} needs {n} bytes but only {self.left} remain")
        start = self.pos
        self.pos += n
        return start

    def unpack(self, fmt: struct.Struct, what: str) -> int:
        return fmt.unpack_from(self.view, self.take(fmt.size, what))[0]


def _read_shape(reader: _Reader, ndim: int, key: str) -> list[int]:
    at = reader.take(8 * ndim, f"shape of {key!r}")
    shape = list(struct.unpack_from(f"<{ndim}q", reader.view, at))
    if any(d < 0 for d in shape):
        raise WireFormatError(f"tensor {key!r} at offset {at} has a negative dimension in shape {shape}")
    return shape


def _read_tensor(reader: _Reader, key: str) -> torch.Tensor:
    """Read dtype, shape, nbytes and data of one non-None entry; the tensor views ``buffer``."""
    code_at = reader.pos
    code = reader.unpack(_U8, f"dtype code of {key!r}")
    if code not in CODE_TO_DTYPE:
        raise WireFormatError(f"tensor {key!r}: unknown dtype code {code} at offset {code_at} (v1 knows 0-9)")
    dtype = CODE_TO_DTYPE[code]
    ndim = reader.unpack(_U8, f"ndim of {key!r}")
    shape = _read_shape(reader, ndim, key)
    numel, bound = 1, 1
    for dim in shape:
        numel *= dim
        bound *= max(dim, 1)
    itemsize = dtype.itemsize
    # Zero dims count as 1 in the bound: torch still computes strides and a storage size from the other
    # dims of an empty tensor, and [0, 2**62, 4] or [2**56, 2**56, 0] overflow there (RuntimeError).
    if bound * itemsize > _INT64_MAX:
        raise WireFormatError(f"tensor {key!r}: shape {shape} overflows int64 bytes (zero dims counted as 1)")
    nbytes_at = reader.pos
    nbytes = reader.unpack(_U64, f"nbytes of {key!r}")
    if nbytes != numel * itemsize:
        raise WireFormatError(
            f"tensor {key!r} at offset {nbytes_at}: nbytes {nbytes} disagrees with shape {shape} x "
            f"itemsize {itemsize} = {numel * itemsize}"
        )
    data_at = reader.take(nbytes, f"data of {key!r}")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    tensor = torch.frombuffer(reader.view, dtype=torch.uint8, count=nbytes, offset=data_at)
    # A bool byte other than 0/1 is undefined behaviour in torch kernels: refuse it here.
    if dtype == torch.bool and bool((tensor > 1).any()):
        raise WireFormatError(f"bool tensor {key!r} at offset {data_at} holds bytes other than 0 and 1")
    return tensor.view(dtype).reshape(shape)


def _read_key(reader: _Reader) -> str:
    if reader.left < _U32.size:
        raise WireFormatError(
            f"trailing garbage: {reader.left} bytes at offset {reader.pos} are too short to start an entry"
        )
    key_len = reader.unpack(_U32, "key length")
    key_at = reader.take(key_len, f"key of length {key_len}")
    try:
        return bytes(reader.view[key_at : key_at + key_len]).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WireFormatError(f"key at offset {key_at} is not valid UTF-8: {exc.reason}") from None


def decode(
    buffer: Buffer, map_location: Union[str, torch.device] = "cpu", *, max_entries: Optional[int] = None
) -> dict[str, Optional[torch.Tensor]]:
    """Parse a v1 body; tensors view ``buffer`` in place (no copy on CPU).

    Arguments:
        buffer: the whole body. A writable buffer (``bytearray``) gives writable tensors; a ``bytes`` body
            gives tensors torch warns about once, and that must not be written to.
        map_location: device for the tensors; anything but CPU copies them there.
        max_entries: refuse a body with more entries than this, at the first one past it. A receiver that
            knows how many tensors it expects should say so: each decoded entry costs about a kilobyte of
            Python and torch objects, so a 64 MiB body of 23-byte scalar entries would otherwise cost
            gigabytes before any key could be checked.

    Returns:
        key -> tensor (shape and dtype as sent) or None, in body order.

    Raises:
        WireFormatError: bad magic, unknown dtype, negative or overflowing shape, ``nbytes`` that disagrees
            with the shape or runs past the body, duplicate or non-UTF-8 keys, unknown flags, trailing bytes,
            more than ``max_entries`` entries.
    """
    view = memoryview(buffer).cast("B")
    reader = _Reader(view)
    if reader.left < _U32.size or reader.unpack(_U32, "magic") != MAGIC:
        raise WireFormatError(f"bad magic: the body does not start with 0x{MAGIC:08X} (wire format v1)")
    device = torch.device(map_location)
    out: dict[str, Optional[torch.Tensor]] = {}
    while reader.left:
        entry_at = reader.pos
        key = _read_key(reader)
        if max_entries is not None and len(out) >= max_entries:
            raise WireFormatError(f"entry {key!r} at offset {entry_at} is one more than the {max_entries} expected")
        if key in out:
            raise WireFormatError(f"duplicate key {key!r} in the entry at offset {entry_at}")
        flags_at = reader.pos
        flags = reader.unpack(_U8, f"flags of {key!r}")
        if flags & ~FLAG_NONE:
            raise WireFormatError(f"entry {key!r}: unknown flag bits 0x{flags:02X} at offset {flags_at}")
        if flags & FLAG_NONE:
            out[key] = None
            continue
        tensor = _read_tensor(reader, key)
        out[key] = tensor if device.type == "cpu" else tensor.to(device)
    return out
