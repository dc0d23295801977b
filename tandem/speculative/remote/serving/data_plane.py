"""The server's side of the process-group data plane: ``/init_nccl``, sends after the HTTP flush, teardown.

What a client may make the server do here is bounded: the rendezvous store listens only on the address
the HTTP server is bound to, only on a port within ``port_range`` (never a privileged one), and only until
the group has formed; ``/init_nccl`` answers within the rendezvous budget, a little under the group
timeout, so that a client whose HTTP timeout equals that timeout (the original design's client) hears the
answer before it gives up and starts a second rendezvous.
"""

from __future__ import annotations

import logging
import threading
from typing import NamedTuple, Optional

import torch

from tandem.speculative.remote import protocol
from tandem.speculative.remote.serving.sessions import Session, SessionTable
from tandem.speculative.remote.transport import NCCLTransport, TransportError, open_rendezvous_listener

logger = logging.getLogger(__name__)

# Extension of a "failed" /init_nccl answer (a v1 client reads only "status"): the port is outside what this
# server allows; "allowed" gives the inclusive range.
NCCL_REASON_PORT_NOT_ALLOWED = "port_not_allowed"
NCCL_REASON_TIMEOUT = "rendezvous_timeout"


def rendezvous_budget_s(nccl_timeout_s: float) -> float:
    """How long ``/init_nccl`` may wait for the peer: the group timeout less a margin (10 %, at least 1 s,
    at most half), so the answer reaches a client whose HTTP timeout is the group timeout in time."""
    return nccl_timeout_s - min(max(0.1 * nccl_timeout_s, 1.0), 0.5 * nccl_timeout_s)


class _PendingSend(NamedTuple):
    """Supervision answered with metadata, to be sent over ``transport`` once the answer is flushed."""

    client_id: str
    transport: NCCLTransport
    tensors: dict


class DataPlaneHost:
    """Each client's group on the server side.

    Arguments:
        sessions: the server's session table (it holds each session's group and the ports in use).
        host: the HTTP server's bind address; rendezvous stores listen there alone.
        port_range: inclusive ``(low, high)`` ports a client may propose.
        device: where the target's outputs live (NCCL when CUDA and the peer agrees, else gloo).
        timeout_s: the group timeout: each transfer's limit; the rendezvous answers a little sooner.
        fault_injection: testing only: :meth:`arm_teardown_fault` works.
    """

    def __init__(self, sessions: SessionTable, host: str, port_range: tuple[int, int], device: torch.device,
                 timeout_s: float, fault_injection: bool = False):
        self.sessions = sessions
        self.host = host
        self.port_range = port_range
        self.device = device
        self.timeout_s = float(timeout_s)
        self.fault_injection = fault_injection
        self._teardown_armed = threading.Event()
        # The send queued by generate for flush, per handler thread (each serves one connection).
        self.pending = threading.local()

    def init(self, client_id: str, session: Session, port: int, rendezvous_id: str) -> dict:
        """Set up ``client_id``'s group on ``port``; the JSON answer of ``/init_nccl``. Blocks for at most
        :func:`rendezvous_budget_s` of the group timeout."""
        low, high = self.port_range
        if not low <= port <= high:
            logger.warning("client %s proposed data-plane port %d, outside the allowed %d-%d",
                           client_id, port, low, high)
            return {"status": protocol.NCCL_STATUS_FAILED, "reason": NCCL_REASON_PORT_NOT_ALLOWED,
                    "allowed": [low, high]}
        live = session.transport
        if live is not None and live.is_initialized:
            # Another port for a session with a group: a second client sharing this session's id (every
            # client of the original design is "anonymous"); the group is not its, so it gets the wire format.
            return {"status": protocol.NCCL_STATUS_ALREADY if live.nccl_port == port else protocol.NCCL_STATUS_FAILED}
        if not self.sessions.claim_port(port, client_id, session):
            return {"status": protocol.NCCL_STATUS_FAILED, "reason": protocol.NCCL_REASON_PORT_IN_USE}
        try:
            listener = open_rendezvous_listener(self.host, port)
        except OSError as exc:  # another process listens there: this client goes on over HTTP
            self._release_port(port)
            logger.warning("client %s: data-plane port %d cannot be used; data plane not established: %s",
                           client_id, port, exc)
            return {"status": protocol.NCCL_STATUS_FAILED}
        transport = NCCLTransport(port, self.host, is_server=True, device=self.device, rendezvous_id=rendezvous_id,
                                  listener=listener)
        ok = self._rendezvous(transport)
        if ok is True and self.sessions.attach_transport(client_id, session, transport):
            logger.info("client %s: data plane up (%s group on port %d)", client_id, transport.backend, port)
            return {"status": protocol.NCCL_STATUS_OK}
        self._release_port(port)
        transport.destroy()
        return {"status": protocol.NCCL_STATUS_FAILED, **({"reason": NCCL_REASON_TIMEOUT} if ok is None else {})}

    def _rendezvous(self, transport: NCCLTransport) -> Optional[bool]:
        """Run ``initialize`` in a thread and wait at most the budget: True, False, or None (timed out; the
        rendezvous is destroyed and notices within a moment)."""
        budget = rendezvous_budget_s(self.timeout_s)
        outcome: dict[str, bool] = {}
        worker = threading.Thread(
            target=lambda: outcome.update(ok=transport.initialize(budget, transfer_timeout_seconds=self.timeout_s)),
            name="tandem-rendezvous", daemon=True)
        worker.start()
        worker.join(budget + 0.5)
        if worker.is_alive():
            logger.warning("data-plane rendezvous on port %d did not finish within %.1f s", transport.nccl_port, budget)
            transport.destroy()
            return None
        return outcome.get("ok", False)

    def _release_port(self, port: int) -> None:
        with self.sessions.lock:
            self.sessions.ports.pop(port, None)

    def drop(self, client_id: str, reason: str, level: int = logging.WARNING) -> None:
        """Tear down ``client_id``'s group (if any) and free its port; its session stays."""
        transport = self.sessions.take_transport(client_id)
        if transport is None:
            return
        transport.destroy()
        logger.log(level, "client %s: data plane torn down (%s); the wire format from now on", client_id, reason)

    def queue_send(self, client_id: str, supervision: dict) -> bool:
        """Queue ``supervision`` for ``flush`` if ``client_id`` has a live group; False (send it in the body)
        if not."""
        transport = self.sessions.live_transport(client_id)
        if transport is None:
            return False
        self.pending.send = _PendingSend(client_id, transport, supervision)
        return True

    def flush(self) -> None:
        """Send the pending supervision over the data plane after the HTTP flush (no-op if none is pending).

        A failed or timed-out send tears the client's group down -- the client's receive then fails at once
        (gloo: the sockets close) or by its timeout (NCCL) -- and the client asks for the batch again over
        the wire format. The server goes on serving everyone.
        """
        pending = getattr(self.pending, "send", None)
        self.pending.send = None
        if pending is None:
            return
        session = self.sessions.peek(pending.client_id)
        lock = session.transfer_lock if session is not None else threading.Lock()
        try:
            with lock:
                if self._teardown_armed.is_set():
                    self._teardown_armed.clear()
                    logger.warning("fault injection: tearing down client %s's data plane mid-transfer",
                                   pending.client_id)
                    pending.transport.inject_teardown_fault()
                pending.transport.send_tensors(pending.tensors, list(pending.tensors))  # the metadata's order
        except TransportError as exc:
            self.drop(pending.client_id, f"send failed: {exc}")

    def discard(self) -> None:
        """Forget the pending send: the metadata never reached the client, so nobody will receive."""
        self.pending.send = None

    def arm_teardown_fault(self) -> None:
        """Testing only: the next data-plane send (any client's) tears its group down mid-transfer. The
        client must fall back to HTTP and ask for that batch again. Refused unless ``fault_injection``."""
        if not self.fault_injection:
            raise RuntimeError("fault injection is off (start the server with --enable-fault-injection)")
        self._teardown_armed.set()
        logger.warning("fault injection: armed; the next data-plane send tears its group down mid-transfer")
