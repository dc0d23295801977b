"""The KV caches the target server keeps between ``/verify`` calls, bounded in count and in tokens.

A speculative-decoding client names the sequence it decodes (``X-Tandem-Decode-Session``) and says how many
cached positions its new ids follow (``X-Tandem-Past``). With a cache kept, a decode round costs the target
one short forward over the new positions instead of the whole sequence. Each client keeps at most one cache
(a client decodes one sequence at a time; naming another, or ``past 0``, starts afresh), and all caches
together hold at most ``max_tokens`` positions: the least recently used ones make room. A cache is freed on
``/disconnect``, when its client's session is evicted, and when a forward on it fails. A client whose cache
is gone is told 409 and sends the whole sequence again (``RemoteDecodeSession`` does so by itself).

A cache remembers the ids it holds, so that a call naming the digest of the prefix it expects
(``X-Tandem-Prefix``) is told 409 rather than answered on another client's sequence cached under the same
names, and the digest of the tree it verified last, so that a kept branch is a retry only when it names that
very tree (the same indices of another tree at the same base are not).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from tandem.speculative.decoding.verification import crop_cache, select_cache_positions
from tandem.speculative.remote import protocol
from tandem.speculative.remote.serving.request_checks import KeptBranch, RequestError

logger = logging.getLogger(__name__)


@dataclass
class DecodeCache:
    """One client's cached sequence: its name, a transformers ``DynamicCache`` and the positions it holds."""

    name: str
    cache: Any
    length: int = 0
    ids: list[int] = field(default_factory=list)
    """The token ids of the ``length`` cached positions."""
    tree_past: Optional[int] = None
    """When the last forward verified a draft tree: the positions cached before it (its branch is kept next)."""
    tree: Optional[str] = None
    """That tree's ``protocol.tree_digest``."""
    kept: Optional[KeptBranch] = None
    """The last branch kept, while its positions are cached: a retried call naming it again finds it done."""

    def keep_branch(self, branch: KeptBranch) -> None:
        """Keep the first ``branch.base`` positions and the branch's positions of the tree verified after them;
        nothing when the call is a retry of one that did (the same branch of the same named tree); 409 when no
        such tree is cached."""
        if branch.tree is not None and branch == self.kept:
            return
        base, indices = branch.base, branch.indices
        if self.tree_past != base or base + indices[-1] >= self.length or branch.tree not in (None, self.tree):
            raise RequestError(409, f"verify: cannot keep branch {base}:{indices[:8]} of {self.name!r}: no draft "
                                    f"tree verified after {base} positions is cached (or not the one it names); "
                                    f"send the whole sequence with {protocol.PAST_HEADER}: 0")
        select_cache_positions(self.cache, base, torch.tensor([base + i for i in indices]))
        self.ids = self.ids[:base] + [self.ids[base + i] for i in indices]
        self.length, self.kept, self.tree_past, self.tree = base + len(indices), branch, None, None

    def crop(self, past: int, prefix: Optional[str]) -> None:
        """Keep the first ``past`` positions; 409 when fewer are cached, or when ``prefix`` (the caller's
        ``protocol.prefix_digest`` of them) says they are not the caller's."""
        if past > self.length:
            raise RequestError(409, f"verify: cannot continue {self.name!r} after {past} positions: only "
                                    f"{self.length} are cached; send the whole sequence with {protocol.PAST_HEADER}: 0")
        crop_cache(self.cache, past)
        self.ids, self.length = self.ids[:past], past
        if self.kept is not None and past < self.kept.base + len(self.kept.indices):
            self.kept = None  # its positions are gone: a keep naming it again is no retry
        if prefix is not None and protocol.prefix_digest(self.ids) != prefix:
            raise RequestError(409, f"verify: the {past} positions cached as {self.name!r} are not the ids this "
                                    f"client sent (another sequence under the same names?); send the whole "
                                    f"sequence with {protocol.PAST_HEADER}: 0")

    def extended(self, ids: list[int], tree: Optional[str]) -> None:
        """Record the forward that appended ``ids`` (a draft tree named ``tree``, or a chain: None)."""
        self.tree_past, self.tree = (self.length, tree) if tree is not None else (None, None)
        self.ids += ids
        self.length += len(ids)


class DecodeCacheTable:
    """Client id -> :class:`DecodeCache`, least recently used first, at most ``max_tokens`` positions in all.

    A cache is *checked out* for the forward that extends it (nobody else sees it meanwhile: a second request
    for the same sequence gets 409) and *checked in* afterwards with its new length.

    Arguments:
        max_tokens: positions held across every cache (a KV cache costs far less a token than a forward:
            the server's default is its ``--max-batch-tokens``, so all caches together take at most what one
            largest ``/generate`` does).
    """

    def __init__(self, max_tokens: int):
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self.max_tokens = int(max_tokens)
        self._lock = threading.Lock()
        self._caches: "OrderedDict[str, DecodeCache]" = OrderedDict()
        self._tokens = 0

    @property
    def tokens(self) -> int:
        """Positions held now, across every cache."""
        with self._lock:
            return self._tokens

    def __len__(self) -> int:
        with self._lock:
            return len(self._caches)

    def check_out(self, client_id: str, name: str, past: int, new_tokens: int, make_cache) -> DecodeCache:
        """The cache to extend by ``new_tokens`` after its first ``past`` positions, taken out of the table.

        ``past == 0`` starts a new cache (``make_cache()``), dropping the client's old one. Otherwise the client's
        cache must be named ``name`` and hold at least ``past`` positions (the caller crops it), else 409.
        413 when ``past + new_tokens`` alone exceeds ``max_tokens``.
        """
        total = past + new_tokens
        if total > self.max_tokens:
            raise RequestError(413, f"verify: {past} cached + {new_tokens} new positions exceed this server's decode "
                                    f"cache budget of {self.max_tokens} tokens (--max-decode-tokens)")
        with self._lock:
            entry = self._caches.pop(client_id, None)
            if entry is not None:
                self._tokens -= entry.length
            if past == 0:
                return DecodeCache(name, make_cache())
            if entry is None or entry.name != name or entry.length < past:
                why = ("no cached sequence" if entry is None else f"the cached sequence is {entry.name!r}"
                       if entry.name != name else f"only {entry.length} positions are cached")
                raise RequestError(409, f"verify: cannot continue {name!r} after {past} positions: {why} (evicted, "
                                        f"ended, or the server restarted); send the whole sequence with "
                                        f"{protocol.PAST_HEADER}: 0")
            return entry

    def check_in(self, client_id: str, entry: DecodeCache) -> None:
        """Put ``entry`` back as the client's most recent cache, evicting least recently used ones past the budget."""
        with self._lock:
            old = self._caches.pop(client_id, None)
            if old is not None:
                self._tokens -= old.length
            self._caches[client_id] = entry
            self._tokens += entry.length
            while self._tokens > self.max_tokens and len(self._caches) > 1:
                evicted_id, evicted = self._caches.popitem(last=False)
                self._tokens -= evicted.length
                logger.info("client %s: decode cache %r of %d positions evicted (the decode cache budget of %d "
                            "tokens is full)", evicted_id, evicted.name, evicted.length, self.max_tokens)

    def drop(self, client_id: str) -> Optional[DecodeCache]:
        """Forget ``client_id``'s cache (disconnect, eviction); the one removed, if any."""
        with self._lock:
            entry = self._caches.pop(client_id, None)
            if entry is not None:
                self._tokens -= entry.length
            return entry
