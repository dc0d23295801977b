"""Speculative decoding against a target server: ``/verify`` behind the ``DecodeSession`` interface.

``RemoteEagle3TargetModel.decode_session()`` returns a :class:`RemoteDecodeSession`, which ``decode.py`` drives
exactly as it drives an in-process ``LocalDecodeSession``. The server keeps the sequence's KV cache between
calls (``decode_caches.py``), so a round sends the new ids only (a few bytes) and receives ``n`` next tokens,
``n`` near-tie flags and ``n`` aux states (``n x 3H`` in the target dtype). The session remembers every token
it sent: when the server has lost the cache (evicted, restarted, another client's sequence took its place),
it answers 409 and the session sends the whole sequence again, so a decode never fails or changes for that.
Nothing the server holds is taken on trust: each call names the digest of the prefix the client believes is
cached (``X-Tandem-Prefix``) and each kept branch the tree it belongs to, the session's name is random (no other
process picks it), and every answer's token ids are checked against the vocabulary.
"""

from __future__ import annotations

import logging
import uuid

import torch

from tandem.speculative.decoding.verification import VerifyStep, check_branch
from tandem.speculative.remote import protocol, wire
from tandem.speculative.remote.answer_checks import AnswerError, TensorSpec, check_tensors, wire_answer_bytes
from tandem.speculative.remote.http_client import RemoteTargetError
from tandem.speculative.target.draft_layers import DFLASH, CaptureSpec

logger = logging.getLogger(__name__)



def verify_specs(batch: int, new: int, hidden: int, hidden_dtypes: frozenset,
                 vocab_size: int | None = None, aux_layers: int = 3) -> dict[str, TensorSpec]:
    """What a ``/verify`` answer for ``[batch, new]`` ids must hold (``protocol.VERIFY_ANSWER_KEYS``), its next
    tokens in ``[0, vocab_size)`` when given (``aux_layers``: the target layers captured, three unless a capture
    header says otherwise)."""
    next_ids, near_ties, aux = protocol.VERIFY_ANSWER_KEYS
    return {next_ids: TensorSpec((batch, new), frozenset({torch.int64}), vocab_size),
            near_ties: TensorSpec((batch, new), frozenset({torch.bool})),
            aux: TensorSpec((batch, new, aux_layers * hidden), hidden_dtypes)}


def request_verify(server, input_ids: torch.Tensor, hidden: int, hidden_dtypes: frozenset, device: torch.device,
                   headers: dict | None = None, tree_parents: list[int] | None = None,
                   vocab_size: int | None = None, layer_ids: list[int] | None = None) -> VerifyStep:
    """One ``/verify`` call with ``input_ids [B, n]`` long (``tree_parents``: a draft tree's, for B = 1); the
    checked answer (next tokens in ``[0, vocab_size)``), copied onto ``device``.

    ``server``: a ``http_client.ServerConnection`` (retries on connection errors and 5xx: with ``X-Tandem-Past`` a
    repeated call does the same as the first). ``RemoteTargetError`` for a refusal or a malformed answer.
    ``layer_ids``: the target layers to capture (sent as ``X-Tandem-Capture``); None: the server's own three."""

    specs = verify_specs(*input_ids.shape, hidden, hidden_dtypes, vocab_size,
                         3 if layer_ids is None else len(layer_ids))
    if layer_ids is not None:
        headers = {**(headers or {}), protocol.CAPTURE_HEADER: CaptureSpec(DFLASH, tuple(layer_ids)).header_value()}
    body = {"input_ids": input_ids.to("cpu", torch.long)}
    if tree_parents is not None:
        body[protocol.VERIFY_TREE_KEY] = torch.tensor(tree_parents, dtype=torch.long)
    raw = server.request(protocol.EP_VERIFY, wire.encode(body), headers=headers,
                         max_answer_bytes=wire_answer_bytes(specs))
    try:
        tensors = wire.decode(raw, max_entries=len(specs))
        check_tensors(tensors, specs)
    except (wire.WireFormatError, AnswerError) as exc:
        raise RemoteTargetError(server.url, protocol.EP_VERIFY, f"refused the answer: {exc}") from None
    # copy: the tensors view the receive buffer, which the next answer may reuse.
    return VerifyStep(*(tensors[k].to(device, copy=True) for k in protocol.VERIFY_ANSWER_KEYS))


class RemoteDecodeSession:
    """A ``verification.DecodeSession`` whose KV cache lives on a target server (see the module docstring).

    Arguments:
        server: the ``http_client.ServerConnection`` every call of this sequence goes to (its cache lives there).
        hidden: the target's hidden size ``H``; hidden_dtypes: the dtypes its aux states may have.
        device: where the answers' tensors are put (the draft's device).
        vocab_size: the target's vocabulary ``V``: every next token answered must lie in ``[0, V)``.
        layer_ids: the target layers each step captures (a DFlash draft's); None: the server's own three.
    """

    def __init__(self, server, hidden: int, hidden_dtypes: frozenset, device: torch.device,
                 vocab_size: int | None = None, layer_ids: list[int] | None = None):
        self.server = server
        self.layer_ids = layer_ids
        self.hidden = hidden
        self.hidden_dtypes = hidden_dtypes
        self.device = torch.device(device)
        self.vocab_size = vocab_size
        # Random: two processes sharing a client id (or none) once both named their first session "decode-0".
        self.name = f"decode-{uuid.uuid4().hex[:16]}"
        self.length = 0
        self.resent = 0
        """Times the server had lost the cache and the whole sequence went again."""
        self._tokens: list[int] = []  # the ids of the cached positions, to send again if the server lost them
        # A tree's kept branch (base, indices, the tree's digest), for the server at the next call.
        self._branch: tuple[int, list[int], str | None] | None = None
        self._tree: str | None = None  # the digest of the tree the last call verified in place

    def _call(self, input_ids: torch.Tensor, past: int, tree_parents: list[int] | None,
              branch: tuple[int, list[int], str | None] | None) -> VerifyStep:
        headers = {protocol.DECODE_SESSION_HEADER: self.name, protocol.PAST_HEADER: str(past)}
        if past:
            headers[protocol.PREFIX_HEADER] = protocol.prefix_digest(self._tokens[:past])
        if branch is not None:
            base, indices, tree = branch
            named = ",".join(map(str, indices)) + (f"/{tree}" if tree else "")
            headers[protocol.KEEP_BRANCH_HEADER] = f"{base}:{named}"
        return request_verify(self.server, input_ids, self.hidden, self.hidden_dtypes, self.device, headers,
                              tree_parents, self.vocab_size, self.layer_ids)

    def extend(self, input_ids: torch.Tensor, tree_parents: list[int] | None = None) -> VerifyStep:
        """The target on ``input_ids [1, n]`` long after the ``length`` cached positions (see ``DecodeSession``)."""

        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError("a decode session extends one sequence: input_ids must be [1, n], "
                             f"got {list(input_ids.shape)}")
        new_ids = input_ids[0].tolist()
        tree = None if tree_parents is None else protocol.tree_digest(self.length, new_ids, tree_parents)
        try:
            step = self._call(input_ids, self.length, tree_parents, self._branch)
        except RemoteTargetError as exc:
            if exc.status != 409 or self.length == 0:
                raise
            logger.info("target server %s lost decode cache %s (%s); sending its %d positions again",
                        self.server.url, self.name, exc.message, self.length)
            self.resent += 1
            whole = torch.tensor([self._tokens[: self.length] + new_ids])
            # Sent whole, the cached positions are a chain and the tree's root hangs from the last of them.
            whole_parents = None if tree_parents is None else (
                list(range(-1, self.length - 1)) + [self.length + p for p in tree_parents])
            step = VerifyStep(*(t[:, -len(new_ids):] for t in self._call(whole, 0, whole_parents, None)))
            tree = None  # sent whole, the server knows no tree at this base: a keep of it will be sent whole too
        self._branch, self._tree = None, tree
        self._tokens[self.length:] = new_ids
        self.length += len(new_ids)
        return step

    def crop(self, keep_length: int) -> None:
        """Keep the first ``keep_length`` positions (the server crops its cache at the next call)."""
        if not 0 <= keep_length <= self.length:
            raise ValueError(f"cannot keep {keep_length} of {self.length} cached positions")
        if self._branch is not None and keep_length <= self._branch[0]:
            self._branch = None  # the branch's positions are cropped away: nothing of it to keep
        self.length = keep_length
        del self._tokens[keep_length:]

    def keep_branch(self, past_length: int, branch: list[int]) -> None:
        """Keep the first ``past_length`` positions and positions ``past_length + i`` for i in ``branch`` of the tree
        verified after them (see ``DecodeSession``); the server is told at the next call."""
        check_branch(past_length, branch, self.length)
        self._tokens = self._tokens[:past_length] + [self._tokens[past_length + i] for i in branch]
        self._branch = (past_length, list(branch), self._tree)
        self.length = past_length + len(branch)

    def close(self) -> None:
        """Nothing to send: the server frees the cache when this client starts another sequence, at
        ``/disconnect``, or when the cache budget needs the room."""
        self.length = 0
        self._tokens = []
