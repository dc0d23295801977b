"""The client side of the process-group data plane: one server's group, set up once, given up for good on a failure."""

from __future__ import annotations

import logging
import threading
import uuid
from typing import Optional

import torch

from tandem.speculative.remote import protocol
from tandem.speculative.remote.http_client import RemoteTargetError, RetryPolicy, ServerConnection
from tandem.speculative.remote.transport import PORT_ATTEMPTS, PORT_RETRY_STRIDE, NCCLTransport

logger = logging.getLogger(__name__)


# Another independent job's group may hold our data-plane port on a shared server (see transport.py).
# A refusal of /init_nccl comes back within this; a longer wait means the server is in the rendezvous.
_QUICK_ANSWER_S = 0.5


class ClientDataPlane:
    """One server's process-group data plane, as the client sees it: set up once, given up for good on a failure.

    ``lock`` makes transfers with this server one at a time (request, metadata, receive): the group pairs
    sends and receives in order, so two interleaved transfers would swap tensors.
    """

    def __init__(self, port: int, timeout_s: float, device: torch.device):
        self.port = port
        self.timeout_s = timeout_s
        self.device = device
        self.lock = threading.Lock()
        self.transport: Optional[NCCLTransport] = None
        self.state = "new"  # -> "up" or "off"

    @property
    def active(self) -> bool:
        return self.state != "off"

    def ensure(self, server: "ServerConnection") -> bool:
        """True when the group is up (setting it up on first use). Call with ``lock`` held."""
        if self.state == "new":
            self.state = "up" if self._start(server) else "off"
        return self.state == "up"

    def _start(self, server: "ServerConnection") -> bool:
        """Set the group up on our port; if another client's group holds that port on this server (an
        independent job with the same ranks), on the next ones, ``PORT_RETRY_STRIDE`` apart."""
        status = None
        for attempt in range(PORT_ATTEMPTS):
            port = self.port + attempt * PORT_RETRY_STRIDE
            status, reason = self._start_on(server, port)
            if status == protocol.NCCL_STATUS_OK:
                self.port = port
                return True
            if reason != protocol.NCCL_REASON_PORT_IN_USE or attempt + 1 == PORT_ATTEMPTS:
                break
            logger.info("target server %s: data-plane port %d is held by another client; proposing %d",
                        server.url, port, port + PORT_RETRY_STRIDE)
        logger.info("target server %s: no data plane (server said %s); using HTTP bodies", server.url, status)
        return False

    def _start_on(self, server: "ServerConnection", port: int) -> tuple[Optional[str], Optional[str]]:
        """``/init_nccl`` on ``port`` and our side of the rendezvous; ``(status, reason)`` of the server's answer.

        The request goes first: a refusal (port held, data plane disabled) comes back at once, before our
        store client has connected to whatever listens on that port -- another client's group, whose
        store would keep our client waiting. Only an answer slower than ``_QUICK_ANSWER_S`` means the
        server is waiting for us, and our side starts.
        """
        rendezvous_id = uuid.uuid4().hex
        body = protocol.encode_json({"nccl_port": port, "rendezvous_id": rendezvous_id})
        answer: dict = {}

        def ask() -> None:
            try:
                reply = server.request(protocol.EP_INIT_NCCL, [body], content_type=protocol.JSON_CONTENT_TYPE,
                                       retry=RetryPolicy(max_retries=0))
                answer.update(protocol.decode_json(reply, "init_nccl answer"))
            except (RemoteTargetError, protocol.ProtocolError) as exc:
                answer["status"] = f"error: {exc}"

        asking = threading.Thread(target=ask, name="tandem-init-nccl", daemon=True)
        asking.start()
        asking.join(_QUICK_ANSWER_S)
        if not asking.is_alive():
            return answer.get("status"), answer.get("reason")
        transport = NCCLTransport(port, server.host, is_server=False, device=self.device, rendezvous_id=rendezvous_id)
        outcome: dict[str, bool] = {}
        ours = threading.Thread(
            target=lambda: outcome.update(ok=transport.initialize(self.timeout_s)), name="tandem-rendezvous",
            daemon=True
        )
        ours.start()
        asking.join()  # the server answers once its side of the rendezvous is over
        status = answer.get("status")
        if status == protocol.NCCL_STATUS_OK:
            ours.join(self.timeout_s + 5)  # the server's side is done, so ours ends now too
            if outcome.get("ok"):
                self.transport = transport
                logger.info("target server %s: data plane up (%s group, port %d)", server.url, transport.backend, port)
                return status, None
        # Our rendezvous, if still waiting, notices destroy() within about a second: wait for it, so no
        # thread is left retrying inside torch's store code when the process exits (which can abort the
        # process). One case cannot be waited for: a store client that reached a foreign listener on the
        # port blocks in torch until that listener goes away; the daemon thread is then left behind.
        transport.destroy()
        ours.join(2.0)
        return status, answer.get("reason")

    def lose(self, server_url: str, reason: str) -> None:
        """Tear the group down for good: this server is used over HTTP from now on."""
        self.state = "off"
        transport, self.transport = self.transport, None
        if transport is not None:
            transport.destroy()
        logger.warning("target server %s: data plane lost (%s); using HTTP bodies from now on", server_url, reason)
