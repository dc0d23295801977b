"""The tensor data plane: a dedicated 2-rank process group between target server and training client.

HTTP stays the control plane (input ids up, tensor metadata down); this group carries the supervision
tensors: NCCL between GPUs, gloo between CPUs, so the same code path runs, and is tested, without a GPU.
The group is built from its own ``TCPStore`` with torch's process-group classes, never through
``init_process_group``, and kept out of torch's registries, so the trainer's ``destroy_process_group()``
never waits on the server. Any failure tears the group down and raises :class:`TransportError`; the caller
goes on over the wire format. Environment: ``TANDEM_ENABLE_NCCL`` (``0`` forces the wire format) and
``TANDEM_NCCL_PORT`` (base rendezvous port; default HTTP port + 100). The rendezvous and the group's sockets
are not authenticated: use the data plane on a trusted network (docs/security.md).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import sys
import threading
import time
from datetime import timedelta
from typing import Mapping, Optional, Sequence

import torch
import torch.distributed as dist

from tandem.speculative.remote.wire import CODE_TO_DTYPE

logger = logging.getLogger(__name__)

__all__ = ["NCCLTransport", "ReceiveBufferPool", "TransportError", "nccl_enabled", "nccl_port_for",
           "open_rendezvous_listener", "default_port_range", "parse_port_range", "PORT_RETRY_STRIDE", "PORT_ATTEMPTS"]

# Dtypes NCCL has no type for (torch maps bool to uint8 itself, but says so nowhere): sent as uint8 views.
_NCCL_UNSUPPORTED_DTYPES = frozenset({torch.int16, torch.int8, torch.bool})
# gloo's send/recv move raw bytes: every wire dtype goes as it is.
_UNSUPPORTED_DTYPES = {"nccl": _NCCL_UNSUPPORTED_DTYPES, "gloo": frozenset()}
_ELEMENT_SIZE = {torch.int16: 2, torch.int8: 1, torch.bool: 1}
_BACKENDS = ("nccl", "gloo")
# The first message over a fresh group: proves both ranks reach each other with data, not just the store.
_HANDSHAKE = 0x7A4E4D31
_ENABLE_ENV = ("TANDEM_ENABLE_NCCL", "NEMO_EAGLE_ENABLE_NCCL")
# How long the server retries a rendezvous port that is in use (see _rendezvous).
_REBIND_GRACE_S = 1.0
# Longest single blocking step of a rendezvous: destroy() is noticed within about twice this.
_ATTEMPT_S = 0.5
_PORT_ENV = ("TANDEM_NCCL_PORT", "NEMO_EAGLE_NCCL_PORT")
# Offset alignment of the tensors carved from one pooled receive buffer (a cache line: every dtype's alignment).
_CARVE_ALIGN = 64


class TransportError(RuntimeError):
    """A data-plane operation failed or timed out; the group has been torn down."""


def _first_env(names: Sequence[str], environ: Mapping[str, str]) -> Optional[str]:
    for name in names:
        value = environ.get(name)
        if value not in (None, ""):
            return value
    return None


def nccl_enabled(environ: Optional[Mapping[str, str]] = None) -> bool:
    """False when ``TANDEM_ENABLE_NCCL`` (else ``NEMO_EAGLE_ENABLE_NCCL``) is ``0``/``false``/``no``/``off``."""
    value = _first_env(_ENABLE_ENV, os.environ if environ is None else environ)
    return value is None or value.strip().lower() not in ("0", "false", "no", "off")


def nccl_port_for(
    http_port: int, server_index: int = 0, num_servers: int = 1, rank: int = 0,
    environ: Optional[Mapping[str, str]] = None
) -> int:
    """The rendezvous port a client proposes to server ``server_index`` (of ``num_servers``).

    ``base + server_index + rank * num_servers``, where ``base`` is ``TANDEM_NCCL_PORT`` (else
    ``NEMO_EAGLE_NCCL_PORT``, else the server's HTTP port + 100) and ``rank`` the client's data-parallel
    rank: the ranks of one trainer sharing a server propose distinct ports. A port the server cannot use
    (taken, or held by another client) makes it answer ``failed`` and that client uses the wire format.
    """
    value = _first_env(_PORT_ENV, os.environ if environ is None else environ)
    try:
        base = int(value) if value is not None else http_port + 100
    except ValueError:
        raise ValueError(f"{_PORT_ENV[0]} must be an integer port, got {value!r}") from None
    port = base + server_index + rank * num_servers
    if not 0 < port < 65536:
        raise ValueError(f"data-plane port {port} (base {base}, server {server_index}, rank {rank}) is not a TCP port")
    return port


# Another independent job's group may hold a client's data-plane port on a shared server: the client then
# proposes the port this far above, up to this many ports in all, before settling for the wire format.
PORT_RETRY_STRIDE = 1000
PORT_ATTEMPTS = 3
# Below this, ports are privileged (and well-known services live): never a rendezvous port.
_LOWEST_PORT = 1024


def default_port_range(base: int) -> tuple[int, int]:
    """The ports the port rule makes clients propose from ``base`` (inclusive bounds): ``base`` up to the
    last retry's block, ``PORT_ATTEMPTS x PORT_RETRY_STRIDE`` ports, never below 1024 or above 65535.

    Ranks x servers past ``PORT_RETRY_STRIDE`` overlap the retry blocks; such jobs set ``--nccl-port-range``.
    """
    low = max(base, _LOWEST_PORT)
    high = min(base + PORT_ATTEMPTS * PORT_RETRY_STRIDE - 1, 65535)
    if low > high:
        raise ValueError(f"no usable data-plane port from base {base}: the range [{low}, {high}] is empty")
    return low, high


def parse_port_range(text: str) -> tuple[int, int]:
    """``"LOW-HIGH"`` -> ``(LOW, HIGH)``; ``ValueError`` unless ``1024 <= LOW <= HIGH <= 65535``."""
    low, sep, high = text.partition("-")
    try:
        bounds = (int(low), int(high if sep else low))
    except ValueError:
        raise ValueError(f"a port range is LOW-HIGH, got {text!r}") from None
    if not _LOWEST_PORT <= bounds[0] <= bounds[1] <= 65535:
        raise ValueError(f"a data-plane port range must lie within {_LOWEST_PORT}-65535 with LOW <= HIGH, got {text!r}")
    return bounds


def open_rendezvous_listener(host: str, port: int) -> socket.socket:
    """A socket listening on ``(host, port)`` alone, for the server's rendezvous store; ``OSError`` with
    ``EADDRINUSE`` when something else listens there. ``0.0.0.0`` / ``::`` listen on every interface,
    as the HTTP server does on such an address."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        # SO_REUSEADDR: a port whose last group just closed (its connections in TIME_WAIT) binds at once.
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(16)
    except BaseException:
        listener.close()
        raise
    return listener


def _connect_address(host: str) -> str:
    """Where the server reaches its own store: the bound address, or loopback for a wildcard bind."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def _agree_backend(mine: str, theirs: str) -> str:
    """Both ranks run this on the same two ``"name:fixed"`` strings, so both reach the same verdict.

    A fixed (explicitly given) backend must be used as is; a derived one ("nccl" when this side's
    tensors are on CUDA) gives way: NCCL only if both sides can, else gloo.
    """
    (a, a_fixed), (b, b_fixed) = [(s.split(":")[0], s.endswith(":1")) for s in sorted((mine, theirs))]
    if a_fixed and b_fixed and a != b:
        raise TransportError(f"backend mismatch: one side requires {a}, the other {b}")
    if a_fixed or b_fixed:
        return a if a_fixed else b
    return "nccl" if a == b == "nccl" else "gloo"


class ReceiveBufferPool:
    """Flat ``uint8`` receive buffers reused across transfers, so a large receive costs no page faults.

    A fresh 300 MB CPU tensor costs one page fault per 4 KiB page on first touch, which more than halves
    gloo's loopback throughput; memory written before costs none. (The CUDA caching allocator already
    recycles device memory, so the transport pools CPU receives only.) :meth:`take` hands out a buffer
    again only once nothing references it: every tensor carved from it shares its storage, and the
    storage's use count -- which counts every tensor, view, slice, NumPy array or DLPack capsule of it --
    together with the refcount of its Python storage object tells exactly when all are gone. Answers vary
    in size with the batch's padded length, so a transfer takes the smallest free buffer that fits.

    Hazard: the memory of a received tensor is reused by a later transfer as soon as no Python-visible
    object holds it. A raw address (``data_ptr()`` handed to C code, ``ctypes``) does not count: copy the
    tensor (``.clone()``) before keeping only its address. Do not ``resize_``/``set_`` a received tensor.

    Arguments:
        capacity: buffers kept; at least the answers alive at once (transfers in flight + those in use).
            When every pooled buffer is in use a transfer gets a one-off buffer.
        min_bytes: smaller transfers get a one-off buffer (their page faults do not matter).
    """

    def __init__(self, capacity: int = 4, min_bytes: int = 4 << 20):
        self.capacity = capacity
        self.min_bytes = min_bytes
        self._buffers: list[tuple[torch.Tensor, tuple[int, int]]] = []  # (buffer, its unreferenced counts)
        self._lock = threading.Lock()

    @staticmethod
    def _counts(buffer: torch.Tensor) -> tuple[int, int]:
        """``(storage use count, refcount of its Python storage object)``, both measured the same way."""
        storage = buffer.untyped_storage()
        return torch._C._storage_Use_Count(storage._cdata), sys.getrefcount(storage)

    def take(self, nbytes: int) -> torch.Tensor:
        """``[nbytes]`` uint8 CPU tensor: the head of a free pooled buffer when large, else a new one.

        Not zeroed: the receiver overwrites every byte it hands out.
        """
        if nbytes < self.min_bytes:
            return torch.empty(nbytes, dtype=torch.uint8)
        with self._lock:
            best, free = None, None
            for index, (buffer, unreferenced) in enumerate(self._buffers):
                if self._counts(buffer) != unreferenced:
                    continue  # a tensor carved from it (or the storage itself) is still alive somewhere
                free = index
                if buffer.numel() >= nbytes and (best is None or buffer.numel() < self._buffers[best][0].numel()):
                    best = index
            if best is not None:
                return self._buffers[best][0][:nbytes]
            # Headroom, so that a slightly longer batch next time still fits.
            grown = torch.empty(nbytes + nbytes // 8, dtype=torch.uint8)
            entry = (grown, self._counts(grown))
            if free is not None:
                self._buffers[free] = entry  # the free one was too small: replace it
            elif len(self._buffers) < self.capacity:
                self._buffers.append(entry)
            else:
                return torch.empty(nbytes, dtype=torch.uint8)  # every pooled buffer is in use: a one-off
            return grown[:nbytes]

    def __len__(self) -> int:
        return len(self._buffers)


class NCCLTransport:
    """A dedicated 2-rank group between server (rank 0) and client (rank 1).

    Arguments:
        nccl_port: TCP port of the rendezvous ``TCPStore`` (the server hosts it).
        host: the server's hostname or IP (the rendezvous master).
        is_server: True on the server (rank 0, sends), False on the client (rank 1, receives).
        backend: ``"nccl"`` or ``"gloo"``; None derives it from ``device`` (CUDA -> nccl, else gloo) and
            lets it give way to the peer's (NCCL only if both sides are on CUDA).
        device: where this side's tensors live; received tensors are allocated there on NCCL, on the CPU
            on gloo (default: the current CUDA device if ``backend="nccl"``, else the CPU).
        rendezvous_id: namespaces the store keys, so a client that lands on another client's port finds
            nothing there instead of joining its group.
        receive_pool: where :meth:`recv_tensors` carves CPU tensors from: True (default) a
            :class:`ReceiveBufferPool` of this transport's own, or a given pool, or None/False for fresh
            tensors each time. See the pool's hazard: a received tensor's memory is reused once nothing
            references it any more.
        listener: server only: a socket already listening on ``(host, nccl_port)``
            (:func:`open_rendezvous_listener`) for the rendezvous store; default: bound at ``initialize``.
    """

    def __init__(
        self,
        nccl_port: int,
        host: str,
        is_server: bool,
        backend: Optional[str] = None,
        *,
        device: Optional[torch.device | str] = None,
        rendezvous_id: str = "",
        receive_pool: ReceiveBufferPool | bool | None = True,
        listener: Optional[socket.socket] = None,
    ):
        if backend not in (None, *_BACKENDS):
            raise ValueError(f"backend must be one of {_BACKENDS} or None, got {backend!r}")
        self.nccl_port = int(nccl_port)
        self.host = host
        self.is_server = is_server
        self._rank = 0 if is_server else 1
        self._peer = 1 - self._rank
        self._group_name = f"nemo_eagle_target_transfer_{nccl_port}"
        self._rendezvous_id = rendezvous_id
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        self._home = torch.device(device)
        self._requested = backend
        self.backend: Optional[str] = None  # the agreed one, once initialized
        self.device = torch.device("cpu")  # where the group moves data; set by initialize
        self._timeout = timedelta(seconds=120)
        # _init_lock serialises initialize(); _state_lock only guards the swap of _pg/_store, so
        # destroy() never waits for a rendezvous in progress.
        self._init_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._pg: Optional[dist.ProcessGroup] = None
        self._store: Optional[dist.Store] = None
        # Server only: the listening socket the rendezvous store serves on (given, or bound in _serve_store),
        # then (master store, listener) while the rendezvous runs.
        self._listener: Optional[socket.socket] = listener
        self._rendezvous_server: Optional[tuple] = None
        self._destroyed = False
        # ``is`` tests: an empty pool has len() 0 and must not count as "no pool".
        # Fault injection (tests and the soak only): the next send tears the group down mid-transfer.
        self._teardown_next_send = False
        self._receive_pool = (ReceiveBufferPool() if receive_pool is True
                              else None if receive_pool is False else receive_pool)

    @property
    def is_initialized(self) -> bool:
        return self._pg is not None

    # ------------------------------------------------------------ set-up

    def initialize(self, timeout_seconds: int = 120, *, transfer_timeout_seconds: Optional[float] = None) -> bool:
        """Rendezvous with the peer, agree on the backend, build the group and exchange one handshake.

        Returns within ``timeout_seconds`` (every step -- store, group, handshake -- gets what is left of
        that one deadline) with True once both peers are connected, or False on any failure (the caller
        falls back to the wire format); never raises for a network problem. Every later send and receive
        is bounded by ``transfer_timeout_seconds`` (default: ``timeout_seconds``).

        On the server the rendezvous store listens only on ``host`` and only until the group has formed:
        the group's own connections carry everything after, so nobody can reach the store once it is up.
        """
        with self._init_lock:
            if self._pg is not None:
                return True
            if self._destroyed:
                return False
            transfer = float(timeout_seconds if transfer_timeout_seconds is None else transfer_timeout_seconds)
            self._timeout = timedelta(seconds=transfer)
            deadline = time.monotonic() + float(timeout_seconds)
            try:
                store, prefix = self._rendezvous(deadline)
                # The agreed backend's group gets what is left of the time (at least a second).
                store.set_timeout(timedelta(seconds=max(deadline - time.monotonic(), 1.0)))
                pg = self._make_process_group(prefix, deadline)
                try:
                    self._handshake(pg, deadline)
                except BaseException:
                    _abort(pg)
                    raise
            except Exception as exc:  # noqa: BLE001 - every failure means "use the wire format"
                logger.warning("data plane on port %d (rank %d) not established: %s", self.nccl_port, self._rank, exc)
                return False
            finally:
                self._close_rendezvous()  # formed or failed, nobody needs the store's listener any more
            with self._state_lock:
                if self._destroyed:  # destroy() ran while we were connecting: do not resurrect
                    _abort(pg)
                    return False
                self._pg, self._store = pg, store
            logger.info("data plane: %s group on port %d, rank %d", self.backend, self.nccl_port, self._rank)
            return True

    def _rendezvous(self, deadline: float) -> tuple[dist.Store, dist.Store]:
        """Connect to the store and agree on the backend; ``(store, prefixed store)``. Retried while safe.

        The client tries again while time is left: the port may still be held by a store the server is
        just closing (a dead client's), whose connection then drops. The server gives a port it may itself
        have just released a short grace to come free; a port really taken fails after it. Nothing of the
        group is written to the store before this succeeds, so a retry starts clean.
        """
        started = time.monotonic()
        while True:
            left = deadline - time.monotonic()
            # Short attempts on the client (a store's connect retries internally and may take twice its
            # timeout): it notices destroy() between them, so its thread never outlives the caller for long.
            timeout = timedelta(seconds=max(left if self.is_server else min(left / 3, _ATTEMPT_S), 0.1))
            try:
                if self.is_server:
                    store = self._serve_store(timeout)
                else:
                    store = dist.TCPStore(self.host, self.nccl_port, world_size=2, is_master=False, timeout=timeout,
                                          wait_for_workers=True)
                prefix = dist.PrefixStore(f"{self._group_name}/{self._rendezvous_id}", store)
                self._agree(prefix, deadline)
                return store, prefix
            except TransportError:
                raise
            except Exception as exc:  # noqa: BLE001 - retried or re-raised below
                in_use = isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE
                if self.is_server:
                    retry = in_use and time.monotonic() - started < _REBIND_GRACE_S
                else:
                    retry = deadline - time.monotonic() > 0.5
                if not retry or self._destroyed:
                    raise
            time.sleep(0.2)

    def _serve_store(self, timeout: timedelta) -> dist.Store:
        """Server side: host the rendezvous store on a socket bound to ``host`` alone, and connect to it.

        torch's master store binds every interface; handed a listening socket (``master_listen_fd``) it
        serves on that one. The group is built over a separate client connection, so that dropping the
        master (:meth:`_close_rendezvous`) closes the listener while the group lives on.
        """
        listener = self._listener if self._listener is not None else open_rendezvous_listener(self.host, self.nccl_port)
        self._listener = None
        try:
            master = dist.TCPStore(self.host, self.nccl_port, world_size=None, is_master=True, timeout=timeout,
                                   wait_for_workers=False, master_listen_fd=os.dup(listener.fileno()))
        except BaseException:
            listener.close()
            raise
        self._rendezvous_server = (master, listener)
        return dist.TCPStore(_connect_address(self.host), self.nccl_port, is_master=False, timeout=timeout,
                             wait_for_workers=False)

    def _close_rendezvous(self) -> None:
        """Stop the server's rendezvous store and close its listening socket (no-op on the client)."""
        served, self._rendezvous_server = self._rendezvous_server, None
        if self._listener is not None:  # handed over but never used
            served, self._listener = (None, self._listener), None
        if served is not None:
            master, listener = served
            del master  # torch closes its copy of the listening socket with the store
            listener.close()

    def _agree(self, store: dist.Store, deadline: float) -> None:
        """Publish this side's backend, read the peer's, settle ``self.backend`` and ``self.device``."""
        derived = "nccl" if self._home.type == "cuda" and dist.is_nccl_available() else "gloo"
        mine = f"{self._requested or derived}:{int(self._requested is not None)}"
        store.set(f"backend/{self._rank}", mine)
        key = f"backend/{self._peer}"
        while True:  # in short waits, for the same reason as the short connects
            try:
                store.wait([key], timedelta(seconds=max(min(deadline - time.monotonic(), _ATTEMPT_S), 0.1)))
                break
            except dist.DistStoreError as exc:
                if self._destroyed or time.monotonic() >= deadline or "timeout" not in str(exc):
                    raise
        theirs = store.get(key).decode()
        self.backend = _agree_backend(mine, theirs)
        if self.backend == "nccl" and (self._home.type != "cuda" or not dist.is_nccl_available()):
            raise TransportError(f"the peer requires nccl but this side's device is {self._home}")
        self.device = self._home if self.backend == "nccl" else torch.device("cpu")

    def _make_process_group(self, store: dist.Store, deadline: float) -> dist.ProcessGroup:
        """A 2-rank ``ProcessGroup`` with one backend for ``self.device``'s type (what ``init_process_group``
        builds inside, minus the registration)."""
        pg = dist.ProcessGroup(store, self._rank, 2)
        if self.backend == "gloo":
            options = dist.ProcessGroupGloo._Options()
            # gloo connects its pairs in the constructor, bounded by this; transfers pass their own timeout.
            options._timeout = timedelta(seconds=max(deadline - time.monotonic(), 1.0))
            options._devices = [dist.ProcessGroupGloo.create_device(hostname=self.host)]
            backend = dist.ProcessGroupGloo(store, self._rank, 2, options)
            backend_type = dist.ProcessGroup.BackendType.GLOO
        else:
            # The NCCL watchdog's default on a timeout (3) ends the whole process: a long-lived server
            # must only lose this group (2 = abort the communicator). Read once, at construction.
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = self._timeout
            backend = dist.ProcessGroupNCCL(store, self._rank, 2, options)
            backend_type = dist.ProcessGroup.BackendType.NCCL
        pg._set_default_backend(backend_type)
        backend._set_sequence_number_for_group()
        pg._register_backend(self.device, backend_type, backend)
        pg._set_group_name(self._group_name)
        return pg

    def _handshake(self, pg: dist.ProcessGroup, deadline: float) -> None:
        """The server sends a token, the client sends it back: both sides know the group carries data."""
        token = torch.tensor([_HANDSHAKE if self.is_server else 0], dtype=torch.int64, device=self.device)
        steps = ("send", "recv") if self.is_server else ("recv", "send")
        for step in steps:
            work = pg.send([token], self._peer, 0) if step == "send" else pg.recv([token], self._peer, 0)
            self._wait(work, f"handshake {step}", timedelta(seconds=max(deadline - time.monotonic(), 0.1)))
            if step == "recv" and int(token.item()) != _HANDSHAKE:
                raise TransportError(f"handshake received {int(token.item()):#x}, expected {_HANDSHAKE:#x}")

    # ------------------------------------------------------------ transfer

    def _require(self) -> dist.ProcessGroup:
        pg = self._pg
        if pg is None:
            raise TransportError(f"data plane on port {self.nccl_port} is not initialized (or was destroyed)")
        return pg

    def _wait(self, work, what: str, timeout: Optional[timedelta] = None) -> None:
        # wait(timeout) blocks the CPU on both backends (NCCL included) and raises on a failure.
        timeout = timeout or self._timeout
        if work.wait(timeout) is False:
            raise TransportError(f"{what} timed out after {timeout.total_seconds():.0f} s")
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def _wire_view(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` flattened on the group's device, as uint8 if the backend lacks its dtype (a view)."""
        flat = tensor.detach().to(self.device).contiguous().reshape(-1)
        return flat.view(torch.uint8) if flat.dtype in _UNSUPPORTED_DTYPES[self.backend] else flat

    def send_tensors(self, tensor_dict: Mapping[str, Optional[torch.Tensor]], keys_order: Sequence[str]) -> None:
        """Send the tensors (server side) in ``keys_order``; None entries and empty tensors are skipped.

        Arguments:
            tensor_dict: key -> tensor of any shape and wire v1 dtype, on any device (moved to the
                group's device if needed), or None. Must match the metadata the client was given.
            keys_order: the send order (``SUPERVISION_KEYS``); message ``i`` carries ``keys_order[i]``.

        Raises ``TransportError`` (after tearing the group down) on a failure or a timeout.
        """
        pg = self._require()
        pending = []
        try:
            for tag, key in enumerate(keys_order):
                tensor = tensor_dict.get(key)
                if tensor is None or tensor.numel() == 0:
                    continue
                payload = self._wire_view(tensor)
                pending.append((key, payload, pg.send([payload], self._peer, tag)))  # payload kept alive
                if self._teardown_next_send:  # an injected fault: one tensor out, then the group goes
                    self._teardown_next_send = False
                    self._wait(pending[-1][2], f"send of {key!r}")
                    raise TransportError(f"fault injected: group torn down after sending {key!r}")
            for key, _payload, work in pending:
                self._wait(work, f"send of {key!r}")
        except Exception as exc:  # noqa: BLE001 - re-raised below as TransportError
            failure = f"{type(exc).__name__}: {exc}"
        else:
            return
        # Outside the except block, with our references dropped: the traceback must not keep the dead
        # group (and its store's port) alive.
        pg = pending = None
        self.destroy()
        raise TransportError(f"data plane on port {self.nccl_port}: send failed: {failure}")

    def inject_teardown_fault(self) -> None:
        """Testing only: make the next :meth:`send_tensors` tear the group down mid-transfer -- after its
        first tensor is out, before the rest -- exactly as a failed send does (the peer's receive fails,
        and this side raises ``TransportError``). Nothing calls it unless a server was started with
        ``--enable-fault-injection``."""
        self._teardown_next_send = True

    def recv_tensors(
        self, metadata: Mapping[str, Optional[dict]], keys_order: Sequence[str]
    ) -> dict[str, Optional[torch.Tensor]]:
        """Receive the tensors (client side) described by ``metadata``, in ``keys_order``.

        Arguments:
            metadata: key -> ``{"dtype_code": int, "shape": [int, ...]}`` or None (as checked by
                ``protocol.decode_nccl_metadata``).
            keys_order: the order the server sends in.

        Returns:
            dict key -> tensor of that dtype and shape on ``self.device`` (None where the metadata says
            None), in ``keys_order``. Raises ``TransportError`` (after tearing the group down) on a
            failure or a timeout.
        """
        pg = self._require()
        out: dict[str, Optional[torch.Tensor]] = {}
        pending = []
        try:
            out = self._allocate(metadata, keys_order)
            for tag, key in enumerate(keys_order):
                tensor = out[key]
                if tensor is not None and tensor.numel():
                    pending.append((key, pg.recv([self._wire_view(tensor)], self._peer, tag)))
            for key, work in pending:
                self._wait(work, f"receive of {key!r}")
        except Exception as exc:  # noqa: BLE001 - re-raised below as TransportError
            failure = f"{type(exc).__name__}: {exc}"
        else:
            return out
        pg = pending = out = None  # as in send_tensors
        self.destroy()
        raise TransportError(f"data plane on port {self.nccl_port}: receive failed: {failure}")

    def _allocate(
        self, metadata: Mapping[str, Optional[dict]], keys: Sequence[str]
    ) -> dict[str, Optional[torch.Tensor]]:
        """Uninitialized tensors for ``metadata`` (key -> tensor, None where it says None), in ``keys``' order.

        On the CPU they are carved, at ``_CARVE_ALIGN``-aligned offsets, from one buffer of the receive
        pool (no page faults once it has been used); on CUDA (and without a pool) each is a fresh
        ``torch.empty`` (the caching allocator already recycles device memory).
        """
        shapes = {}
        for key in keys:
            entry = metadata.get(key)
            if entry is not None:
                shapes[key] = ([int(d) for d in entry["shape"]], CODE_TO_DTYPE[entry["dtype_code"]])
        out: dict[str, Optional[torch.Tensor]] = dict.fromkeys(keys)
        if self._receive_pool is None or self.device.type != "cpu":
            out.update({k: torch.empty(shape, dtype=dtype, device=self.device) for k, (shape, dtype) in shapes.items()})
            return out
        offsets, end = {}, 0
        for key, (shape, dtype) in shapes.items():
            offsets[key] = end
            nbytes = dtype.itemsize * _numel(shape)
            end += -(-nbytes // _CARVE_ALIGN) * _CARVE_ALIGN
        buffer = self._receive_pool.take(end)
        for key, (shape, dtype) in shapes.items():
            nbytes = dtype.itemsize * _numel(shape)
            out[key] = buffer[offsets[key] : offsets[key] + nbytes].view(dtype).view(shape)
        return out

    # ------------------------------------------------------------ teardown

    def destroy(self) -> None:
        """Abort the local communicator and drop the group and the store; idempotent.

        The group is asymmetric: the client may leave long before the long-lived server, so a collective
        shutdown (``destroy_process_group``) would hang. ``abort()`` never waits for the peer; dropping the
        gloo backend closes its sockets, so a peer blocked in a transfer fails at once. Nothing was put in
        torch's registries, so nothing is left there. An operation still running in another thread fails
        by its timeout at the latest.
        """
        with self._state_lock:
            self._destroyed = True
            pg, store, self._pg, self._store = self._pg, self._store, None, None
        if pg is not None:
            _abort(pg)
            logger.info("data plane on port %d (rank %d) torn down", self.nccl_port, self._rank)
        del pg, store  # the master store's listening socket closes with it: the port is free again

    def __repr__(self) -> str:
        state = f"{self.backend} on {self.device}" if self.is_initialized else "not initialized"
        return f"NCCLTransport(port={self.nccl_port}, host={self.host!r}, rank={self._rank}, {state})"


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _abort(pg: dist.ProcessGroup) -> None:
    try:
        pg.abort()
    except Exception as exc:  # noqa: BLE001 - teardown must go on; the group is dropped either way
        logger.debug("abort of the data-plane group failed: %s", exc)
