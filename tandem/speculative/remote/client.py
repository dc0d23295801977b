"""Training-side client of the remote target: a drop-in for ``Eagle3TargetModel``.

:class:`RemoteEagle3TargetModel` exposes ``supervise`` / ``generate_batch``, ``generate_batch_async``,
``get_input_embeddings``, ``set_vocab_mapping`` and ``model_info`` like the in-process target, so the
training loop does not know which one it holds. Behind them: round-robin over servers on keep-alive
connections (``http_client.py``), at most ``prefetch_depth`` requests in flight so target inference overlaps
training, and the supervision over a process group when both sides set one up (``client_data_plane.py``),
else in the HTTP body; a group that fails mid-transfer falls back to HTTP and loses no batch.

    tandem train --target-url http://127.0.0.1:8001 --prefetch-depth 2
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import http.client
import itertools
import logging
import os
import socket
import threading
import uuid
from typing import Optional, Sequence, Union

import torch

from tandem.speculative.remote import protocol, wire
from tandem.speculative.remote.answer_checks import (
    JSON_ANSWER_BYTES,
    AnswerError,
    check_metadata,
    check_tensors,
    supervision_specs,
    target_dtypes,
    weight_spec,
    wire_answer_bytes,
)
from tandem.speculative.remote.client_data_plane import ClientDataPlane
from tandem.speculative.remote.decode_session import RemoteDecodeSession, request_verify
from tandem.speculative.remote.http_client import (
    RemoteTargetError,
    RetryPolicy,
    ServerConnection,
    error_message,
)
from tandem.speculative.remote.transport import TransportError, nccl_enabled, nccl_port_for
from tandem.speculative.target import compact, identity
from tandem.speculative.target.draft_layers import DFLASH, DRAFT_METHODS, EAGLE3, CaptureSpec
from tandem.speculative.training.vocab import vocab_digest

logger = logging.getLogger(__name__)

# The version-1 fields of a /model_info answer; the others are tandem's identity extras.
MODEL_INFO_V1_FIELDS = ("num_hidden_layers", "hidden_size", "vocab_size", "aux_layer_ids")


def _batch_shape(input_ids: torch.Tensor) -> tuple[int, int]:
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, S], got {list(input_ids.shape)}")
    return int(input_ids.shape[0]), int(input_ids.shape[1])


# What a server's /model_info may claim: bounds that keep the answers sized from it finite (a hidden size
# of 2**40 would let a hostile server announce petabytes).
_MODEL_INFO_LIMITS = {"hidden_size": 1 << 17, "vocab_size": 1 << 24, "num_hidden_layers": 1 << 12}


def _check_model_info(url: str, info: dict) -> None:
    for key, limit in _MODEL_INFO_LIMITS.items():
        value = info.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= limit:
            raise RemoteTargetError(url, protocol.EP_MODEL_INFO, f"{key} must be an integer in [1, {limit}], got "
                                                                 f"{value!r}")
    aux = info.get("aux_layer_ids")
    if not isinstance(aux, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in aux):
        raise RemoteTargetError(url, protocol.EP_MODEL_INFO, f"aux_layer_ids must be a list of integers, got {aux!r}")


class RemoteEagle3TargetModel:
    """The frozen target on one or more remote servers, with ``Eagle3TargetModel``'s surface.

    Arguments:
        urls: one server URL (``http://host:port``) or several, used round-robin.
        device: where returned tensors are placed.
        timeout_s: the deadline of one request, from connecting to the answer's last byte, retries included (a
            long first forward on a big target, a queue of other clients' batches need slack): a server that
            sends nothing or drips its answer is given up then, the error saying what it did.
        prefetch_depth: the most ``generate_batch_async`` requests in flight at once (>= 1).
        token: bearer token; default ``$TANDEM_TOKEN``.
        client_id: this client's session id on the servers (default: host, pid and a random suffix).
        retry: retry/backoff policy for connection errors and 5xx.
        enable_nccl: set up the process-group data plane with each server (default: ``TANDEM_ENABLE_NCCL``,
            on unless 0; when off, ``/init_nccl`` is never sent).
        nccl_timeout_s: limit of the data-plane rendezvous and of one transfer; a transfer past it is
            given up and the batch asked for again over HTTP.
        nccl_rank: this trainer's data-parallel rank, which picks its data-plane port (default: ``$RANK``
            or 0; see ``transport.nccl_port_for``).
        supervision_encoding: ``"full"`` (v1: fp32 ``target_probs`` on the wire) or ``"compact"`` (the target's
            final hidden state; this client computes ``target_probs`` from the draft vocabulary's ``lm_head``
            rows, fetched once; far fewer bytes a token, see docs/remote-target.md). A server that cannot answer
            compactly answers in full; either way ``generate_batch`` returns the same dict.
        draft_method: ``eagle3`` (default) or ``dflash``: the session declares it and its target layers to every
            server (``X-Tandem-Capture``), which captures exactly those. A DFlash session is answered compactly and
            its supervision is the compact dict (``compact.COMPACT_SUPERVISION_KEYS``): its draft holds the head.
        aux_layer_ids: the target layers the session reads; default: the method's (EAGLE-3: the server's own,
            and no header is sent, as by a client of the original design; DFlash: ``num_draft_layers`` by the
            reference formula, ``draft_layers.default_dflash_layer_ids``).
        num_draft_layers: DFlash: the draft's layer count (picks the default layers).
    """

    def __init__(
        self,
        urls: Union[str, Sequence[str]],
        *,
        device: Union[str, torch.device] = "cpu",
        timeout_s: float = 300.0,
        prefetch_depth: int = 2,
        token: Optional[str] = None,
        client_id: Optional[str] = None,
        retry: Optional[RetryPolicy] = None,
        enable_nccl: Optional[bool] = None,
        nccl_timeout_s: float = 120.0,
        nccl_rank: Optional[int] = None,
        supervision_encoding: str = protocol.ENCODING_FULL,
        draft_method: str = EAGLE3,
        aux_layer_ids: Optional[Sequence[int]] = None,
        num_draft_layers: Optional[int] = None,
    ):
        if supervision_encoding not in protocol.SUPERVISION_ENCODINGS:
            raise ValueError(f"supervision_encoding must be one of {protocol.SUPERVISION_ENCODINGS}, got "
                             f"{supervision_encoding!r}")
        if draft_method not in DRAFT_METHODS:
            raise ValueError(f"draft_method must be one of {list(DRAFT_METHODS)}, got {draft_method!r}")
        self.draft_method = draft_method
        # The session's layers (resolved against /model_info at the first call); None: the server's own.
        self._capture_request = (None if draft_method == EAGLE3 and aux_layer_ids is None
                                 else (list(aux_layer_ids) if aux_layer_ids is not None else None, num_draft_layers))
        self.capture: Optional[CaptureSpec] = None
        self._capture_headers: dict[str, str] = {}
        if draft_method == DFLASH:
            supervision_encoding = protocol.ENCODING_COMPACT
        self.supervision_encoding = supervision_encoding
        # The draft vocabulary's lm_head rows [Vd, H], fetched at the first compact answer.
        self._draft_head: Optional[torch.Tensor] = None
        self._draft_head_lock = threading.Lock()
        urls = [urls] if isinstance(urls, str) else list(urls)
        if not urls:
            raise ValueError("RemoteEagle3TargetModel needs at least one server URL")
        if prefetch_depth < 1:
            raise ValueError(f"prefetch_depth must be >= 1, got {prefetch_depth}")
        self.client_id = client_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        token = token if token is not None else os.environ.get(protocol.TOKEN_ENV)
        self.retry = retry or RetryPolicy()
        self._servers = [
            ServerConnection(u, timeout_s=timeout_s, token=token, client_id=self.client_id,
                             retry=self.retry) for u in urls
        ]
        # Answers alive at once: those in flight, the one being trained on and one the caller still holds.
        receive_pool = wire.ReceivePool(capacity=prefetch_depth + 2)
        for server in self._servers:
            server.receive_pool = receive_pool
        self._device = torch.device(device)
        self.prefetch_depth = prefetch_depth
        self._round_robin = itertools.cycle(self._servers)
        self._round_robin_lock = threading.Lock()
        # Taken when a request is submitted, given back when it completes: caps the requests in flight.
        self._slots = threading.BoundedSemaphore(prefetch_depth)
        self._executor: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._vocab_body: Optional[bytes] = None
        self._draft_vocab_size: Optional[int] = None
        # Named on each /generate (X-Tandem-Vocab): the server answers with exactly this vocabulary or 409.
        self._vocab_headers: dict[str, str] = {}
        self._info: Optional[dict] = None
        self._images: dict[str, torch.Tensor] = {}  # with_images
        self._embeddings: Optional[torch.Tensor] = None
        self._closed = False
        self._transfers = {"group": 0, "http": 0, "group_failures": 0}
        self._transfers_lock = threading.Lock()
        if nccl_enabled() if enable_nccl is None else enable_nccl:
            rank = int(os.environ.get("RANK", "0")) if nccl_rank is None else nccl_rank
            for index, server in enumerate(self._servers):
                port = nccl_port_for(server.port, index, len(self._servers), rank)
                server.data_plane = ClientDataPlane(port, nccl_timeout_s, self._device)

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self._servers]

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        """The target's parameter dtype as the server reports it (float32 for servers that do not say)."""
        name = self._model_info().get("dtype", "float32")
        dtype = getattr(torch, str(name), None)
        return dtype if isinstance(dtype, torch.dtype) else torch.float32

    def _model_info(self) -> dict:
        """The servers' ``/model_info``, fetched once; every server must serve the same target (``identity``),
        and from then on each new connection to a server is checked to still reach it."""
        if self._info is None:
            infos = [protocol.decode_json(s.request(protocol.EP_MODEL_INFO),
                                          f"{s.url} /model_info") for s in self._servers]
            for server, info in zip(self._servers, infos):
                _check_model_info(server.url, info)
            first = identity.reported_identity(infos[0])
            for server, info in zip(self._servers[1:], infos[1:]):
                identity.check_same_target(first, identity.reported_identity(info), fields=identity.SAME_SERVING_FIELDS,
                                           what=f"target server {server.url} and {self._servers[0].url} in one run")
                if any(info[k] != infos[0][k] for k in MODEL_INFO_V1_FIELDS):
                    message = f"serves a different model: {info} vs {infos[0]} at {self._servers[0].url}"
                    raise RemoteTargetError(server.url, protocol.EP_MODEL_INFO, message)
            self._resolve_capture(infos[0])
            self._info = infos[0]
            for server in self._servers:
                server.on_new_connection = self._verify_connection
        return self._info

    def _resolve_capture(self, info: dict) -> None:
        """Fix the session's ``CaptureSpec`` against the target's depth; a server that cannot capture other layers
        (the original design's, an older tandem) is refused here, naming the method, rather than answering three."""
        if self._capture_request is None:
            return
        layer_ids, num_draft_layers = self._capture_request
        spec = CaptureSpec.resolve(self.draft_method, layer_ids, info["num_hidden_layers"], num_draft_layers)
        offered = info.get(protocol.DRAFT_METHODS_FIELD) or []
        if spec.method not in offered:
            raise RemoteTargetError(self._servers[0].url, protocol.EP_MODEL_INFO,
                                    f"this server cannot capture the layers a {spec.method} session declares "
                                    f"({list(spec.layer_ids)}): it offers {offered or 'only its own aux layers'}")
        self.capture = spec
        self._capture_headers = {protocol.CAPTURE_HEADER: spec.header_value()}

    @property
    def aux_layer_ids(self) -> list[int]:
        """The target layers this session's supervision carries."""
        info = self._model_info()
        return list(self.capture.layer_ids) if self.capture is not None else list(info["aux_layer_ids"])

    def _verify_connection(self, server: ServerConnection, conn: http.client.HTTPConnection) -> None:
        """A new connection to ``server`` (after the first: a reconnect, or a restarted server) must reach the
        target this run started with; otherwise the run stops here, naming both, instead of training on."""
        status, payload, _ = server._exchange(conn, "POST", protocol.EP_MODEL_INFO, (),
                                              {"Content-Type": protocol.JSON_CONTENT_TYPE}, JSON_ANSWER_BYTES,
                                              pool=False)
        if status >= 500:  # not up yet: an I/O-like failure, retried with backoff like any other
            raise ConnectionError(f"/model_info answered HTTP {status} on a new connection")
        if status != 200:
            raise RemoteTargetError(server.url, protocol.EP_MODEL_INFO, error_message(payload), status)
        info = protocol.decode_json(payload, f"{server.url} /model_info")
        identity.check_same_target(identity.reported_identity(self._info), identity.reported_identity(info),
                                   fields=identity.SAME_SERVING_FIELDS,
                                   what=f"target server {server.url} changed during the run (checked on reconnect)")

    @property
    def tree_refusal(self) -> str | None:
        """Why the served target cannot verify a draft tree (its ``/model_info`` says ``verifies_trees: false``: its
        layers keep a recurrent state), or None."""
        if self._model_info().get("verifies_trees", True) is not False:
            return None
        return (f"the target served at {self.urls[0]} keeps a recurrent state in its linear-attention layers: a draft "
                f"tree cannot be verified on them (a tree is not a sequence); decode a chain (drop --tree)")

    def identity(self) -> dict:
        """The target's identity as the servers report it (``identity.IDENTITY_FIELDS``; None where a server of
        the original design does not say), with this session's layers as ``aux_layer_ids``."""
        return {**identity.reported_identity(self._model_info()), "aux_layer_ids": self.aux_layer_ids}

    def model_info(self) -> dict:
        """``{num_hidden_layers, hidden_size, vocab_size, aux_layer_ids}`` (this session's layers); every server
        must agree."""
        info = self._model_info()
        return {**{k: info[k] for k in MODEL_INFO_V1_FIELDS}, "aux_layer_ids": self.aux_layer_ids}

    def get_input_embeddings(self) -> torch.Tensor:
        """``[V, H]`` (target dtype) the target's token embedding, fetched once and cached."""
        if self._embeddings is None:
            info = self._model_info()
            specs = weight_spec(info["vocab_size"], info["hidden_size"], target_dtypes(info))
            self._embeddings = self._fetch_weight(self._servers[0], protocol.EP_INPUT_EMBEDDINGS,
                                                  specs).to(self._device)
        return self._embeddings

    def _fetch_weight(self, server: ServerConnection, endpoint: str, specs: dict, headers: Optional[dict] = None):
        """The ``weight`` tensor of a one-tensor wire answer of exactly ``specs`` (``AnswerError`` -> named error)."""
        raw = server.request(endpoint, headers=headers, max_answer_bytes=wire_answer_bytes(specs))
        try:
            tensors = wire.decode(raw, max_entries=len(specs))
            check_tensors(tensors, specs)
        except (wire.WireFormatError, AnswerError) as exc:
            raise RemoteTargetError(server.url, endpoint, f"refused the answer: {exc}") from None
        return tensors[protocol.EMBEDDINGS_KEY]

    def set_vocab_mapping(self, selected_token_ids: torch.Tensor, selected_token_mask: torch.Tensor) -> None:
        """Fix the draft vocabulary on every server.

        Arguments:
            selected_token_ids: ``[Vd]`` long, draft id -> target id.
            selected_token_mask: ``[V]`` bool, True for target ids in the draft vocabulary.
        """
        body = wire.encode_to_bytes(
            {"selected_token_ids": selected_token_ids.to(torch.long),
             "selected_token_mask": selected_token_mask.to(torch.bool)}
        )
        for server in self._servers:
            server.request(protocol.EP_SET_VOCAB_MAPPING, [body])
        # Kept to send again to a server that restarted and forgot it (it answers /generate with 409).
        self._vocab_body = body
        self._vocab_headers = {protocol.VOCAB_DIGEST_HEADER: vocab_digest(selected_token_ids)}
        self._draft_vocab_size = int(selected_token_ids.numel())
        self._draft_head = None  # rows of the previous vocabulary

    # ------------------------------------------------------------ supervision

    def _next_server(self) -> ServerConnection:
        with self._round_robin_lock:
            return next(self._round_robin)

    @property
    def transfer_counts(self) -> dict[str, int]:
        """Batches received over a data-plane ``group`` and in ``http`` bodies, and ``group_failures``."""
        with self._transfers_lock:
            return dict(self._transfers)

    def _count(self, kind: str) -> None:
        with self._transfers_lock:
            self._transfers[kind] += 1

    def _answer_specs(self, batch_shape: tuple[int, int], encoding: Optional[str] = None) -> dict[bool, dict]:
        """What a ``/generate`` answer for ``[B, S]`` may hold: ``{compact?: {key: TensorSpec}}``; a compact
        request (``encoding``, default this client's) may be answered in full (a target whose logits are not a
        plain projection)."""
        info = self._model_info()
        draft_vocab = self._draft_vocab_size or info["vocab_size"]
        compact_asked = (encoding or self.supervision_encoding) == protocol.ENCODING_COMPACT
        encodings = (False, True) if compact_asked else (False,)
        layers = len(self.aux_layer_ids)
        return {c: supervision_specs(*batch_shape, info["hidden_size"], draft_vocab, target_dtypes(info), c,
                                     info["vocab_size"], layers)
                for c in encodings}

    def _request_generate(self, server: ServerConnection, body: Sequence, headers: dict,
                          specs: dict[bool, dict], encoding: Optional[str] = None) -> tuple[bytearray, bool]:
        """``/generate`` with retries; a 409 (a restarted server, or our vocabulary replaced by another client
        sharing our id) is answered with the vocabulary and retried. The answer is bounded by ``specs``;
        ``encoding`` overrides this client's ``supervision_encoding``."""
        headers = {**headers, **self._vocab_headers, **self._capture_headers}
        encoding = encoding or self.supervision_encoding
        if encoding != protocol.ENCODING_FULL:
            headers = {**headers, protocol.SUPERVISION_HEADER: encoding}
        bound = max(JSON_ANSWER_BYTES, wire_answer_bytes(*specs.values()))
        try:
            return server.request(protocol.EP_GENERATE, body, headers=headers, with_nccl_flag=True,
                                  max_answer_bytes=bound)
        except RemoteTargetError as exc:
            if exc.status != 409 or self._vocab_body is None:
                raise
            logger.warning("target server %s forgot the draft vocabulary (restarted?); sending it again", server.url)
            server.request(protocol.EP_SET_VOCAB_MAPPING, [self._vocab_body])
            return server.request(protocol.EP_GENERATE, body, headers=headers, with_nccl_flag=True,
                                  max_answer_bytes=bound)

    def _generate_on(self, server: ServerConnection, body: Sequence,
                     batch_shape: tuple[int, int]) -> dict[str, torch.Tensor]:
        specs = self._answer_specs(batch_shape)
        plane = server.data_plane
        if plane is not None and plane.active:
            with plane.lock:
                if plane.ensure(server):
                    got = self._generate_over_group(server, plane, body, specs)
                    if got is not None:
                        return got
                    self._count("group_failures")  # the batch did not arrive: ask for it again over HTTP
        raw, _ = self._request_generate(server, body, {}, specs)
        return self._decode_supervision(server, raw, specs)

    def _generate_over_group(
        self, server: ServerConnection, plane: ClientDataPlane, body: Sequence, specs: dict[bool, dict]
    ) -> Optional[dict[str, torch.Tensor]]:
        """One batch over the group; None (the group torn down) if it did not arrive."""
        raw, used_group = self._request_generate(server, body, {protocol.NCCL_HEADER: "1"}, specs)
        if not used_group:
            # The server has no group for us any more (it restarted, or gave up on a failed send).
            plane.lose(server.url, "the server answered in the HTTP body")
            return self._decode_supervision(server, raw, specs)
        try:
            keys_order, metadata = protocol.decode_nccl_metadata(raw)
            compact_answer = compact.FINAL_HIDDEN_KEY in keys_order and True in specs
            check_metadata(keys_order, metadata, specs[compact_answer])  # before a byte is allocated for the transfer
        except (protocol.ProtocolError, AnswerError) as exc:
            plane.lose(server.url, f"refused the data-plane metadata: {exc}")
            raise RemoteTargetError(server.url, protocol.EP_GENERATE,
                                    f"refused the data-plane metadata: {exc}") from None
        try:
            tensors = plane.transport.recv_tensors(metadata, keys_order)
        except TransportError as exc:
            # Destroying our side closes the group's sockets: a server still sending fails at once.
            plane.lose(server.url, str(exc))
            return None
        supervision = self._supervision_from(server, tensors, specs)
        self._count("group")
        return supervision

    def _decode_supervision(self, server: ServerConnection, raw: bytearray,
                            specs: dict[bool, dict]) -> dict[str, torch.Tensor]:
        try:
            tensors = wire.decode(raw, max_entries=len(protocol.SUPERVISION_KEYS))
        except wire.WireFormatError as exc:
            raise RemoteTargetError(server.url, protocol.EP_GENERATE, f"malformed answer: {exc}") from None
        supervision = self._supervision_from(server, tensors, specs)
        self._count("http")
        return supervision

    def _supervision_from(self, server: ServerConnection, tensors: dict,
                          specs: dict[bool, dict]) -> dict[str, torch.Tensor]:
        """The ``SUPERVISION_KEYS`` dict on ``device`` from a full answer, or from a compact one (its keys say
        which) by projecting the final hidden state onto the draft vocabulary here; every tensor's shape and
        dtype checked against what was asked for."""
        compact_answer = compact.FINAL_HIDDEN_KEY in tensors and True in specs
        try:
            check_tensors(tensors, specs[compact_answer])
        except AnswerError as exc:
            raise RemoteTargetError(server.url, protocol.EP_GENERATE, f"refused the answer: {exc}") from None
        keys = compact.COMPACT_SUPERVISION_KEYS if compact_answer else protocol.SUPERVISION_KEYS
        if self.draft_method == DFLASH:  # the compact answer as it came (copied: it may sit in a pooled buffer)
            if not compact_answer:
                raise RemoteTargetError(server.url, protocol.EP_GENERATE, "DFlash training needs the compact answer; "
                                        "this target's logits are not a linear map of its final hidden state")
            return {k: tensors[k].to(self._device, copy=True) for k in keys}
        out = {k: tensors[k].to(self._device) for k in keys}
        return compact.expand_supervision(out, self._draft_lm_head(server)) if compact_answer else out

    def _draft_lm_head(self, server: ServerConnection) -> torch.Tensor:
        """``[Vd, H]`` the target's ``lm_head`` rows for the draft vocabulary, fetched once (every server
        serves the same model, as ``model_info`` checked) and kept on ``device``."""
        with self._draft_head_lock:
            if self._draft_head is None:
                info = self._model_info()
                specs = weight_spec(self._draft_vocab_size or info["vocab_size"], info["hidden_size"],
                                    target_dtypes(info))
                try:
                    weight = self._fetch_weight(server, protocol.EP_DRAFT_LM_HEAD, specs, self._vocab_headers)
                except RemoteTargetError as exc:
                    if exc.status != 409 or self._vocab_body is None:
                        raise
                    server.request(protocol.EP_SET_VOCAB_MAPPING, [self._vocab_body])  # a restarted server
                    weight = self._fetch_weight(server, protocol.EP_DRAFT_LM_HEAD, specs, self._vocab_headers)
                # clone: the answer may sit in a pooled receive buffer, which must go back to the pool.
                self._draft_head = weight.to(self._device, copy=True)
            return self._draft_head

    def generate_batch(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Run the target remotely on one batch and return its supervision.

        Arguments:
            input_ids: ``[B, S]`` long token ids.
            attention_mask: ``[B, S]`` 1 on real tokens, 0 on padding.
            loss_mask: ``[B, S]`` 1 where the draft is trained.

        Returns:
            dict keyed by ``SUPERVISION_KEYS`` on ``device``, exactly what ``Eagle3TargetModel.supervise``
            returns for the same batch: ``aux_hidden_states [B, S, 3H]`` target dtype, ``target_probs
            [B, S, Vd]`` fp32, ``position_mask [B, S, 1]`` bool, ``input_ids [B, S]`` long and
            ``loss_mask [B, S]`` (both shifted).
        """
        tensors = {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}
        body = wire.encode({**tensors, **self._images})
        return self._generate_on(self._next_server(), body, _batch_shape(input_ids))

    supervise = generate_batch

    @contextlib.contextmanager
    def with_images(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor):
        """``generate_batch``, ``supervise_async`` and ``supervise_compact`` calls inside send these images with their
        ids (a vision-language target; as ``Eagle3TargetModel.with_images``): ``pixel_values [P, C*T*p*p]`` float,
        the image processor's patches, and ``image_grid_thw [I, 3]`` long (docs/design.md, section 8: why patches
        travel, not pictures)."""
        self._images = {"pixel_values": pixel_values, "image_grid_thw": image_grid_thw.long()}
        try:
            yield self
        finally:
            self._images = {}

    def supervise_compact(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """One batch in the compact encoding, as the server sent it: ``compact.COMPACT_SUPERVISION_KEYS``
        on ``device`` (``final_hidden_states [B, S, H]`` in place of ``target_probs``), over HTTP whatever
        this client's ``supervision_encoding``; arguments as ``generate_batch``. The supervision cache
        stores these. A target that cannot answer compactly is an error."""
        server = self._next_server()
        body = wire.encode({"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask,
                            **self._images})
        specs = self._answer_specs(_batch_shape(input_ids), protocol.ENCODING_COMPACT)
        raw, _ = self._request_generate(server, body, {}, specs, encoding=protocol.ENCODING_COMPACT)
        try:
            tensors = wire.decode(raw, max_entries=len(compact.COMPACT_SUPERVISION_KEYS))
        except wire.WireFormatError as exc:
            raise RemoteTargetError(server.url, protocol.EP_GENERATE, f"malformed answer: {exc}") from None
        if compact.FINAL_HIDDEN_KEY not in tensors:
            raise RemoteTargetError(server.url, protocol.EP_GENERATE, "the target cannot answer in the compact "
                                    "encoding (its logits are not a bias-free linear map of its final hidden state)")
        try:
            check_tensors(tensors, specs[True])
        except AnswerError as exc:
            raise RemoteTargetError(server.url, protocol.EP_GENERATE, f"refused the answer: {exc}") from None
        self._count("http")
        # copy: the answer may sit in a pooled receive buffer, which must go back to the pool.
        return {k: tensors[k].to(self._device, copy=True) for k in compact.COMPACT_SUPERVISION_KEYS}

    def draft_lm_head(self) -> torch.Tensor:
        """``[Vd, H]`` (target dtype) the target's ``lm_head`` rows of the draft vocabulary, fetched once."""
        return self._draft_lm_head(self._servers[0])

    def generate_batch_async(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor
    ) -> concurrent.futures.Future:
        """``generate_batch`` in the background; a ``Future`` of its dict (arguments as there).

        The inputs are copied at submission (with the images of an enclosing ``with_images``), so the caller
        may reuse them at once. When ``prefetch_depth`` requests are already in flight this call blocks until one
        completes.
        """
        if self._closed:
            raise RuntimeError("RemoteEagle3TargetModel is closed")
        body = [wire.encode_to_bytes({"input_ids": input_ids, "attention_mask": attention_mask,
                                      "loss_mask": loss_mask, **self._images})]
        self._slots.acquire()
        try:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(self.prefetch_depth,
                                                                       thread_name_prefix="tandem-target")
            future = self._executor.submit(self._generate_on, self._next_server(), body, _batch_shape(input_ids))
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(lambda _done: self._slots.release())
        return future

    supervise_async = generate_batch_async

    def prefetch(self, batches):
        """Yield the supervision of each ``(input_ids, attention_mask, loss_mask)`` in order, keeping up
        to ``prefetch_depth`` requests in flight ahead of the consumer."""
        pending: list[concurrent.futures.Future] = []
        for batch in batches:
            if len(pending) == self.prefetch_depth:
                yield pending.pop(0).result()
            pending.append(self.generate_batch_async(*batch))
        while pending:
            yield pending.pop(0).result()

    # ------------------------------------------------------------ speculative decoding (/verify)

    def _verify_server(self) -> ServerConnection:
        """The first server, once it has said it serves ``/verify`` (a server of the original design does not)."""
        info = self._model_info()
        if protocol.EP_VERIFY not in (info.get(protocol.EXTENSIONS_FIELD) or ()):
            raise RemoteTargetError(self._servers[0].url, protocol.EP_VERIFY, "this server does not offer /verify (not "
                                    "a tandem server, an older one, or a target without a KV cache): speculative "
                                    "decoding needs a target it can verify with")
        return self._servers[0]

    def decode_session(self, layer_ids: Optional[list[int]] = None):
        """A ``decode_session.RemoteDecodeSession``: one sequence decoded through the first server's ``/verify``,
        its KV cache kept there (``decode.py`` runs on it as on an in-process target); its steps capture
        ``layer_ids`` (a DFlash draft's; None: the server's own)."""

        info = self._model_info()
        return RemoteDecodeSession(self._verify_server(), info["hidden_size"], target_dtypes(info), self._device,
                                   info["vocab_size"], layer_ids)

    def verify(self, input_ids: torch.Tensor):
        """Stateless ``/verify`` of whole sequences ``input_ids [B, n]`` long (equal lengths): a
        ``verification.VerifyStep`` with ``next_token_ids [B, n]``, ``near_ties [B, n]``, ``aux_hidden_states
        [B, n, 3H]`` on ``device``."""

        info = self._model_info()
        return request_verify(self._verify_server(), input_ids, info["hidden_size"], target_dtypes(info), self._device,
                              vocab_size=info["vocab_size"])

    # ------------------------------------------------------------ session

    def heartbeat(self) -> None:
        for server in self._servers:
            server.request(protocol.EP_HEARTBEAT, [b"{}"], content_type=protocol.JSON_CONTENT_TYPE)

    def close(self) -> None:
        """End this client's session on every server (the servers keep running) and drop connections."""
        if self._closed:
            return
        self._closed = True
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
        for server in self._servers:
            server.on_new_connection = None  # ending a session needs no identity check, even on another target
            try:
                server.request(
                    protocol.EP_DISCONNECT, [b"{}"], content_type=protocol.JSON_CONTENT_TYPE,
                    retry=RetryPolicy(max_retries=0)
                )
            except RemoteTargetError as exc:
                logger.debug("disconnect from %s failed: %s", server.url, exc)
            if server.data_plane is not None and server.data_plane.transport is not None:
                server.data_plane.transport.destroy()
            server.close()

    def __enter__(self) -> "RemoteEagle3TargetModel":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
