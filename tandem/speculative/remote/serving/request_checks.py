"""What the target server checks in a request before it acts on it; every refusal is a :class:`RequestError`.

These functions see only the decoded request (headers, JSON payloads, wire tensors) and the server's
limits, never a socket, so the request logic and its fuzz tests share them with the HTTP plumbing.
"""

from __future__ import annotations

import re
from typing import NamedTuple, Optional

import torch

from tandem.speculative.remote import protocol, wire


class RequestError(Exception):
    """A request the server refuses: ``status`` is the HTTP status, the message goes to the client.

    ``headers``: extra response headers (``Retry-After`` on a 503).
    """

    def __init__(self, status: int, message: str, headers: Optional[dict] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


class Reply(NamedTuple):
    """A successful answer: the body as a list of buffers (see ``wire.encode``) and extra headers."""

    body: list
    content_type: str
    headers: dict


# A client id reaches logs, summaries and error messages: letters, digits and a few separators only (a
# hostname-pid-suffix id fits), so no id can carry a line break, an escape sequence or a forged log line.
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:@+=-]{1,128}")


def check_client_id(value: Optional[str]) -> str:
    """The session id of a request's ``X-Tandem-Client`` header (absent: the anonymous session); 400 when it
    is longer than 128 characters or holds anything but ``[A-Za-z0-9._:@+=-]``."""
    if value is None:
        return protocol.ANONYMOUS_CLIENT
    if not _CLIENT_ID.fullmatch(value):
        shown = repr(value[:40]) + ("..." if len(value) > 40 else "")
        raise RequestError(400, f"{protocol.CLIENT_ID_HEADER} must be 1-128 characters of [A-Za-z0-9._:@+=-], "
                                f"got {shown}")
    return value


class RequestHeaders(NamedTuple):
    """A request's headers, parsed and checked once; the field names are ``TargetModelServer.handle``'s keywords.

    ``content_length`` and ``authorization`` are for the plumbing (framing, :meth:`TargetModelServer.authorize`);
    the others go to the logic as they are (``handle(endpoint, raw, **headers.for_logic(), place=...)``).
    """

    content_length: int
    authorization: Optional[str]
    client_id: str
    client_wants_nccl: bool
    supervision_encoding: Optional[str]
    vocab_digest: Optional[str]
    decode_session: Optional[str]
    past: Optional[str]
    keep_branch: Optional[str]
    prefix: Optional[str]
    capture: Optional[str]

    @classmethod
    def parse(cls, headers) -> "RequestHeaders":
        """From an ``email.message.Message`` of headers; ``RequestError`` for framing two parsers could read
        differently (folded values, chunked bodies, conflicting or malformed ``Content-Length``) and bad ids."""
        if any("\r" in value or "\n" in value for value in headers.values()):
            raise RequestError(400, "folded (multi-line) header values are not accepted")
        if headers.get_all("Transfer-Encoding"):
            raise RequestError(411, "Transfer-Encoding (chunked) request bodies are not supported: send Content-Length")
        lengths = headers.get_all("Content-Length") or ["0"]
        # Two different lengths let a proxy and this server split the stream differently (request
        # smuggling); isascii: str.isdigit() also takes "\u00b2", which int() then refuses.
        if len(set(lengths)) > 1:
            raise RequestError(400, f"conflicting Content-Length headers {lengths}")
        length = lengths[0].strip()
        if not (length.isascii() and length.isdigit()):
            raise RequestError(400, f"invalid Content-Length {length!r}")
        client_ids = headers.get_all(protocol.CLIENT_ID_HEADER) or []
        if len(client_ids) > 1:
            raise RequestError(400, f"more than one {protocol.CLIENT_ID_HEADER} header")
        return cls(
            content_length=int(length), authorization=headers.get(protocol.AUTH_HEADER),
            client_id=check_client_id(client_ids[0] if client_ids else None),
            client_wants_nccl=headers.get(protocol.NCCL_HEADER) == "1",
            supervision_encoding=headers.get(protocol.SUPERVISION_HEADER),
            vocab_digest=headers.get(protocol.VOCAB_DIGEST_HEADER),
            decode_session=headers.get(protocol.DECODE_SESSION_HEADER), past=headers.get(protocol.PAST_HEADER),
            keep_branch=headers.get(protocol.KEEP_BRANCH_HEADER), prefix=headers.get(protocol.PREFIX_HEADER),
            capture=headers.get(protocol.CAPTURE_HEADER),
        )

    def for_logic(self) -> dict:
        """The keywords ``TargetModelServer.handle`` takes."""
        fields = self._asdict()
        del fields["content_length"], fields["authorization"]
        return fields


def decode_tensors(raw: bytes, expected: tuple[str, ...], what: str,
                   optional: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Decode a wire body that must hold exactly the tensors ``expected`` (and may hold ``optional`` ones); 400 for
    anything else.

    The decoder stops at the first entry past ``len(expected)``: a body of millions of tiny entries costs
    a few objects, not millions (each decoded tensor is about a kilobyte of Python and torch state).
    """
    try:
        tensors = wire.decode(raw, max_entries=len(expected) + len(optional))
    except wire.WireFormatError as exc:
        raise RequestError(400, f"{what}: malformed wire body: {exc}") from None
    missing = [k for k in expected if tensors.get(k) is None]
    unexpected = sorted(set(tensors) - set(expected) - set(optional))
    if missing or unexpected:
        raise RequestError(400, f"{what}: expected tensors {list(expected)}; "
                                f"missing {missing}, unexpected {unexpected}")
    return tensors


def _check_ids(name: str, ids: torch.Tensor, vocab_size: int, what: str) -> None:
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise RequestError(400, f"{what}: {name} must be an integer tensor, got {ids.dtype}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise RequestError(400, f"{what}: {name} must lie in [0, {vocab_size}), "
                                f"got [{int(ids.min())}, {int(ids.max())}]")


def check_generate_inputs(tensors: dict[str, torch.Tensor], vocab_size: int) -> None:
    """400 unless ``input_ids``, ``attention_mask``, ``loss_mask`` are integer/bool ``[B, S]`` with B, S >= 1."""
    what = "generate"
    input_ids = tensors["input_ids"]
    if input_ids.dim() != 2 or input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
        raise RequestError(400, f"{what}: input_ids must be [B, S] with B, S >= 1, got {list(input_ids.shape)}")
    for name in ("attention_mask", "loss_mask"):
        tensor = tensors[name]
        if tensor.shape != input_ids.shape:
            raise RequestError(400, f"{what}: {name} shape {list(tensor.shape)} "
                                    f"!= input_ids shape {list(input_ids.shape)}")
        if tensor.dtype.is_floating_point:
            raise RequestError(400, f"{what}: {name} must be an integer or bool tensor, got {tensor.dtype}")
    _check_ids("input_ids", input_ids, vocab_size, what)


def check_verify_inputs(tensors: dict[str, torch.Tensor], vocab_size: int) -> torch.Tensor:
    """``input_ids [B, n]`` long of a ``/verify`` body; 400 unless integer ``[B, n]`` with B, n >= 1 in the
    vocabulary."""
    input_ids = tensors["input_ids"]
    if input_ids.dim() != 2 or input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
        raise RequestError(400, f"verify: input_ids must be [B, n] with B, n >= 1, got {list(input_ids.shape)}")
    _check_ids("input_ids", input_ids, vocab_size, "verify")
    return input_ids.long()


def check_tree_parents(parents: torch.Tensor | None, input_ids: torch.Tensor) -> list[int] | None:
    """The ``tree_parents [n]`` of a ``/verify`` body as a list (None when absent); 400 unless an integer tensor
    of ``input_ids``'s length for one sequence, -1 first and every other entry an earlier position."""
    if parents is None:
        return None
    n = input_ids.shape[1]
    if input_ids.shape[0] != 1:
        raise RequestError(400, "verify: a draft tree is verified for one sequence, "
                                f"got a batch of {input_ids.shape[0]}")
    if parents.dtype.is_floating_point or parents.dtype == torch.bool or parents.shape != (n,):
        raise RequestError(400, f"verify: tree_parents must be an integer [{n}] tensor, got {parents.dtype} "
                                f"{list(parents.shape)}")
    values = parents.tolist()
    if values[0] != -1 or any(not 0 <= parent < i for i, parent in enumerate(values) if i):
        raise RequestError(400, "verify: tree_parents must be -1 for the first position and an earlier position "
                                "for every other")
    return values


_BRANCH = re.compile(r"(\d{1,9}):(\d{1,9}(?:,\d{1,9}){0,4095})(?:/([0-9a-f]{32}))?")
_DIGEST = re.compile(r"[0-9a-f]{32}")


class KeptBranch(NamedTuple):
    """An ``X-Tandem-Keep-Branch``: keep ``base`` positions, then ``indices`` of the tree named ``tree`` (its
    ``protocol.tree_digest``; None from a client that does not name it)."""

    base: int
    indices: list[int]
    tree: Optional[str]


def keep_branch_header(value: str | None, name: str | None) -> KeptBranch | None:
    """The :class:`KeptBranch` of an ``X-Tandem-Keep-Branch: BASE:i,j,...[/TREE]`` header (None when absent); 400
    unless well formed, increasing, and sent with a decode session."""
    if value is None:
        return None
    match = _BRANCH.fullmatch(value.strip())
    if match is None:
        raise RequestError(400, f"{protocol.KEEP_BRANCH_HEADER} must be BASE:i,j,... (integers; then /TREE, 32 hex "
                                f"digits, optionally), got {value[:40]!r}")
    if name is None:
        raise RequestError(400, f"verify: {protocol.KEEP_BRANCH_HEADER} without {protocol.DECODE_SESSION_HEADER}: "
                                "only a kept cache has a branch to keep")
    base, branch = int(match.group(1)), [int(i) for i in match.group(2).split(",")]
    if any(b <= a for a, b in zip(branch, branch[1:])):
        raise RequestError(400, f"{protocol.KEEP_BRANCH_HEADER}: the branch's positions must increase, "
                                f"got {branch[:8]}")
    return KeptBranch(base, branch, match.group(3))


def prefix_header(value: str | None, name: str | None, past: int) -> str | None:
    """The ``X-Tandem-Prefix`` digest (None when absent); 400 unless 32 hex digits, sent with a decode session
    continuing after some positions."""
    if value is None:
        return None
    if not _DIGEST.fullmatch(value.strip()):
        raise RequestError(400, f"{protocol.PREFIX_HEADER} must be 32 hex digits, got {value[:40]!r}")
    if name is None or past == 0:
        raise RequestError(400, f"verify: {protocol.PREFIX_HEADER} names the cached positions a decode session "
                                f"continues after: it needs {protocol.DECODE_SESSION_HEADER} and a past above 0")
    return value.strip()


# A decode session's name reaches log lines: the client id's alphabet, at most 64 characters.
_DECODE_SESSION = re.compile(r"[A-Za-z0-9._:@+=-]{1,64}")


def decode_session_headers(name: Optional[str], past: Optional[str], batch: int) -> tuple[Optional[str], int]:
    """``(session name or None, past positions)`` of a ``/verify``'s ``X-Tandem-Decode-Session`` and ``X-Tandem-Past``
    headers; 400 for a malformed name, a past that is not a non-negative decimal, a past without a session, or a
    session for more than one sequence (a cache holds one)."""
    if name is not None and not _DECODE_SESSION.fullmatch(name):
        raise RequestError(400, f"{protocol.DECODE_SESSION_HEADER} must be 1-64 characters of [A-Za-z0-9._:@+=-]")
    value = (past or "0").strip()
    if not (value.isascii() and value.isdigit() and len(value) <= 12):
        raise RequestError(400, f"{protocol.PAST_HEADER} must be a non-negative integer, got {value[:20]!r}")
    past_length = int(value)
    if name is None and past_length:
        raise RequestError(400, f"verify: {protocol.PAST_HEADER} {past_length} without "
                                f"{protocol.DECODE_SESSION_HEADER}: "
                                f"a stateless call sends the whole sequence")
    if name is not None and batch != 1:
        raise RequestError(400, f"verify: a decode session caches one sequence, got a batch of {batch}; send several "
                                f"sequences without {protocol.DECODE_SESSION_HEADER}")
    return name, past_length


def check_vocab_mapping(ids: torch.Tensor, mask: torch.Tensor, vocab_size: int) -> None:
    """400 unless ``selected_token_ids [Vd]`` (distinct ids) and ``selected_token_mask [V]`` bool agree."""
    what = "set_vocab_mapping"
    if mask.dtype != torch.bool or mask.shape != (vocab_size,):
        raise RequestError(400, f"{what}: selected_token_mask must be bool [{vocab_size}], "
                                f"got {mask.dtype} {list(mask.shape)}")
    if ids.dim() != 1 or ids.numel() == 0:
        raise RequestError(400, f"{what}: selected_token_ids must be a non-empty 1-D tensor, got {list(ids.shape)}")
    _check_ids("selected_token_ids", ids, vocab_size, what)
    distinct = int(torch.unique(ids).numel())
    if distinct != ids.numel() or int(mask.sum()) != distinct or not bool(mask[ids.long()].all()):
        raise RequestError(400, f"{what}: selected_token_mask is not the indicator of the "
                                f"{ids.numel()} selected_token_ids")


def init_nccl_request(payload: dict, default_port: int) -> tuple[int, str]:
    """``(port, rendezvous_id)`` of an ``/init_nccl`` body; ``RequestError`` 400 for bad values."""
    port = payload.get("nccl_port", default_port)
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise RequestError(400, f"init_nccl: nccl_port must be a TCP port (1-65535), got {port!r}")
    rendezvous_id = payload.get("rendezvous_id", "")
    if not isinstance(rendezvous_id, str) or len(rendezvous_id) > 128 or not rendezvous_id.isprintable():
        raise RequestError(400, "init_nccl: rendezvous_id must be a printable string of at most 128 characters")
    return port, rendezvous_id


def check_image_inputs(tensors: dict[str, torch.Tensor], input_ids: torch.Tensor, image_token_id: int | None,
                       merge_size: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(pixel_values [P, D] float, image_grid_thw [I, 3] long)`` of a ``/generate`` body that carries images,
    None for one that does not; 400 unless both are there, well-formed, and the images' positions (``t h w /
    merge_size**2`` each) are the image tokens of ``input_ids``."""
    pixels, grid = tensors.get("pixel_values"), tensors.get("image_grid_thw")
    if pixels is None and grid is None:
        return None
    if image_token_id is None:
        raise RequestError(400, "generate: this target is not a vision-language model: it takes no images")
    if pixels is None or grid is None:
        raise RequestError(400, "generate: images need both pixel_values and image_grid_thw")
    if not pixels.dtype.is_floating_point or pixels.dim() != 2:
        raise RequestError(400, f"generate: pixel_values must be a 2-D float tensor, got {pixels.dtype} "
                                f"{list(pixels.shape)}")
    if grid.dtype.is_floating_point or grid.dtype == torch.bool or grid.dim() != 2 or grid.shape[1] != 3 \
            or (grid.numel() and int(grid.min()) < 1):
        raise RequestError(400, f"generate: image_grid_thw must be positive integers [I, 3], got {grid.dtype} "
                                f"{list(grid.shape)}")
    patches = int(grid.long().prod(-1).sum())
    if patches != pixels.shape[0]:
        raise RequestError(400, f"generate: image_grid_thw holds {patches} patches, pixel_values {pixels.shape[0]}")
    tokens = int((input_ids == image_token_id).sum())
    if tokens * merge_size**2 != patches:
        raise RequestError(400, f"generate: {tokens} image tokens in input_ids for images of {patches} patches "
                                f"({patches // merge_size**2} positions)")
    return pixels, grid.long()
