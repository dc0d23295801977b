"""The target server's client sessions: vocabulary mappings, data-plane groups and their ports, eviction.

A session is named by the ``X-Tandem-Client`` header (clients that send none share the anonymous session).
It holds the draft vocabularies the client sent, by digest (a tandem client names the digest on each
``/generate``, so an answer is never computed with a vocabulary that client did not send), and its data-plane
group and port, if ``/init_nccl`` set one up. Sessions are bounded: one without connections is evicted once
idle past ``idle_timeout_s``, and at ``max_sessions`` the least recently seen one without connections makes
room (503 if every one has a connection). An evicted client is told 409 and sends its vocabulary again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional

import torch

from tandem.speculative.remote import protocol
from tandem.speculative.remote.serving.request_checks import RequestError
from tandem.speculative.remote.transport import NCCLTransport

logger = logging.getLogger(__name__)

DEFAULT_MAX_SESSIONS = 1024
DEFAULT_SESSION_IDLE_TIMEOUT_S = 1800.0
# Vocabularies kept per session, newest last: two clients sharing an id each keep theirs.
MAPPINGS_PER_SESSION = 4


class VocabMapping(NamedTuple):
    """One draft vocabulary: ``ids [Vd]`` long, ``mask [V]`` bool, and its ``digest``."""

    ids: torch.Tensor
    mask: torch.Tensor
    digest: str


@dataclass
class Session:
    """One training client's state on the server."""

    mappings: "OrderedDict[str, VocabMapping]" = field(default_factory=OrderedDict)
    last_seen: float = field(default_factory=time.monotonic)
    # Its data-plane group, if /init_nccl set one up; None means the wire format.
    transport: Optional[NCCLTransport] = None
    # One transfer at a time on the group: two interleaved sends would pair with the wrong receives.
    transfer_lock: threading.Lock = field(default_factory=threading.Lock)

    def add_mapping(self, mapping: VocabMapping) -> None:
        self.mappings.pop(mapping.digest, None)
        self.mappings[mapping.digest] = mapping
        while len(self.mappings) > MAPPINGS_PER_SESSION:
            self.mappings.popitem(last=False)

    def mapping(self, digest: Optional[str]) -> Optional[VocabMapping]:
        """The mapping with ``digest``, or the newest when ``digest`` is None; None if there is none."""
        if digest is None:
            return next(reversed(self.mappings.values()), None)
        return self.mappings.get(digest)


class SessionTable:
    """Sessions, open connections per client id, and data-plane ports, under one lock.

    Arguments:
        max_sessions: sessions held at once.
        idle_timeout_s: a session with no open connection and no request for this long is evicted.
        on_evict: called with the client id of each evicted session (the server frees what it keeps beside it);
            with the table's lock held, so it must not call back into the table.
    """

    def __init__(self, max_sessions: int = DEFAULT_MAX_SESSIONS, idle_timeout_s: float = DEFAULT_SESSION_IDLE_TIMEOUT_S,
                 on_evict: Optional[Callable[[str], object]] = None):
        self.on_evict = on_evict
        self.max_sessions = max_sessions
        self.idle_timeout_s = idle_timeout_s
        self.lock = threading.Lock()
        self._sessions: dict[str, Session] = {}
        # Open HTTP connections per client id. A client with none left may be dead: its port goes to the
        # next client that asks for it, and its session may be evicted.
        self._connections: dict[str, int] = {}
        # Data-plane port -> the client holding it (or setting it up).
        self.ports: dict[int, str] = {}
        self._next_sweep = 0.0

    # ------------------------------------------------------------ sessions

    def get(self, client_id: str) -> Session:
        """``client_id``'s session, created if needed (evicting idle ones); 503 when the table is full."""
        with self.lock:
            now = time.monotonic()
            if now >= self._next_sweep:
                self._next_sweep = now + min(self.idle_timeout_s / 4, 10.0)
                self._evict(lambda _id, s: now - s.last_seen > self.idle_timeout_s, "idle")
            session = self._sessions.get(client_id)
            if session is None:
                if len(self._sessions) >= self.max_sessions:
                    self._make_room()
                session = self._sessions[client_id] = Session()
                logger.info("client %s connected (%d sessions)", client_id, len(self._sessions))
            session.last_seen = now
            return session

    def peek(self, client_id: str) -> Optional[Session]:
        with self.lock:
            return self._sessions.get(client_id)

    def pop(self, client_id: str) -> tuple[Optional[Session], bool]:
        """Remove ``client_id``'s session; ``(session, True when no named session is left)``."""
        with self.lock:
            session = self._sessions.pop(client_id, None)
            return session, not any(cid != protocol.ANONYMOUS_CLIENT for cid in self._sessions)

    @property
    def ids(self) -> list[str]:
        with self.lock:
            return list(self._sessions)

    def _make_room(self) -> None:
        """Evict the least recently seen session without open connections; 503 if there is none. Lock held."""
        idle = [(s.last_seen, cid) for cid, s in self._sessions.items() if not self._connections.get(cid)]
        if not idle:
            raise RequestError(503, f"the target server holds its limit of {self.max_sessions} client sessions, "
                                    f"each with an open connection; retry later", {"Retry-After": "5"})
        oldest = min(idle)[1]
        self._evict(lambda cid, _s: cid == oldest, f"the session limit {self.max_sessions} was reached")

    def _evict(self, should, why: str) -> None:
        """Drop every session ``should(id, session)`` selects among those without connections. Lock held."""
        for client_id in [cid for cid, s in self._sessions.items()
                          if not self._connections.get(cid) and should(cid, s)]:
            session = self._sessions.pop(client_id)
            if session.transport is not None:
                self.ports.pop(session.transport.nccl_port, None)
                session.transport.destroy()  # never blocks: it only aborts and drops the local group
            if self.on_evict is not None:
                self.on_evict(client_id)
            logger.info("client %s: session evicted (%s)", client_id, why)

    # ------------------------------------------------------------ connections

    def connection_opened(self, client_id: str) -> None:
        with self.lock:
            self._connections[client_id] = self._connections.get(client_id, 0) + 1

    def connection_closed(self, client_id: str) -> None:
        with self.lock:
            left = self._connections.get(client_id, 1) - 1
            if left > 0:
                self._connections[client_id] = left
            else:
                self._connections.pop(client_id, None)
            session = self._sessions.get(client_id)
            if session is not None:
                session.last_seen = time.monotonic()  # idle from now, not from its last request

    def open_connections(self, client_id: str) -> int:
        with self.lock:
            return self._connections.get(client_id, 0)

    # ------------------------------------------------------------ data-plane ports

    def claim_port(self, port: int, client_id: str, session: Session) -> bool:
        """Reserve ``port`` for ``client_id``; False if it already has a live group or the port is in use.

        A port held by a client with no open connection is taken back (that client is dead or gone; if it
        comes back, its next request gets the wire format).
        """
        with self.lock:
            if session.transport is not None and session.transport.is_initialized:
                return False
            holder = self.ports.get(port)
            if holder is not None and holder != client_id and self._connections.get(holder, 0) == 0:
                stale = self._sessions.get(holder)
                if stale is not None and stale.transport is not None:
                    self.ports[port] = client_id
                    transport, stale.transport = stale.transport, None
                    logger.warning("client %s left without a word; its data-plane port %d goes to %s", holder, port,
                                   client_id)
                    transport.destroy()  # never blocks: it only aborts and drops the local group
                    holder = None
            if holder is not None:
                logger.warning("client %s proposed data-plane port %d, which client %s holds", client_id, port, holder)
                return False
            self.ports[port] = client_id
            return True

    def attach_transport(self, client_id: str, session: Session, transport: NCCLTransport) -> bool:
        """Give ``session`` its new group; False if the session ended (disconnect, eviction) meanwhile."""
        with self.lock:
            if self._sessions.get(client_id) is not session:
                return False
            session.transport = transport
            return True

    def live_transport(self, client_id: str) -> Optional[NCCLTransport]:
        with self.lock:
            session = self._sessions.get(client_id)
            transport = session.transport if session is not None else None
        return transport if transport is not None and transport.is_initialized else None

    def take_transport(self, client_id: str) -> Optional[NCCLTransport]:
        """Detach ``client_id``'s group (if any) from its session and free its port; the caller destroys it."""
        with self.lock:
            session = self._sessions.get(client_id)
            transport = session.transport if session is not None else None
            if transport is None:
                return None
            session.transport = None
            self.ports.pop(transport.nccl_port, None)
            return transport
