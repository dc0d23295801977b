"""The supervision cache: the frozen target's answer for each sample, computed once and reused (offline training).

The target never changes during a run, so a run that sees each sample E times would pay for E forwards where
one does. The cache keeps that one answer on disk in the compact encoding (``target/compact.py``: aux hidden
states, final hidden state, position mask); the trainer expands it with the draft vocabulary's ``lm_head``
rows. Each sample is answered alone, unpadded, because padding changes a target's floating-point sums: an
entry is then a function of the sample and the target only, whoever computes it, so a run that fills the
cache as it trains equals, bit for bit, one that reads a cache filled ahead (``tandem cache-supervision``).
Layout and atomic writes: :class:`SupervisionCache`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import torch

from tandem.speculative.target import compact
from tandem.speculative.target.supervision import SUPERVISION_KEYS, shift_left
from tandem.speculative.training.vocab import vocab_digest

logger = logging.getLogger(__name__)

# What an entry holds (per sample, unpadded, shifted as the target answers): the compact answer minus
# the token ids and loss mask, which the batch itself gives.
ENTRY_KEYS = ("aux_hidden_states", compact.FINAL_HIDDEN_KEY, "position_mask")


def sample_key(input_ids: torch.Tensor, loss_mask: torch.Tensor) -> str:
    """SHA-256 hex of one unpadded sample: ``input_ids [S]`` and ``loss_mask [S]`` (any integer dtype)."""
    digest = hashlib.sha256()
    digest.update(input_ids.to(torch.int64).contiguous().numpy().tobytes())
    digest.update(loss_mask.to(torch.uint8).contiguous().numpy().tobytes())
    return digest.hexdigest()


def identity_digest(identity: dict) -> str:
    """A short stable digest of a JSON-serialisable identity dict (the cache's directory name)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


class SupervisionCache:
    """Per-sample compact supervision on disk (see the module docstring).

    Layout: ``DIR/<identity digest>/<key[:2]>/<key>.safetensors``. The identity names the directory, so a
    cache made for another target, dtype, vocabulary, draft method or set of captured layers is never read (and
    a directory whose ``identity.json`` says otherwise is refused); the key is the SHA-256 of the sample's
    token ids and loss mask, so a changed data file reuses the entries of its unchanged samples. Entries are
    written atomically (temporary file, then rename): concurrent fillers and a killed run leave only whole
    entries, and an unreadable entry is recomputed and rewritten.

    Arguments:
        root: the cache directory (shared by runs; each identity gets its own subdirectory).
        identity: what the answers depend on besides the sample: the target's ``model_info()`` (with the layers
            the session captures), its dtype, the draft vocabulary's digest and the draft method
            (``cache_identity`` builds it).
    """

    def __init__(self, root: str | Path, identity: dict):
        self.identity = identity
        self.directory = Path(root) / identity_digest(identity)
        self.directory.mkdir(parents=True, exist_ok=True)
        stamp = self.directory / "identity.json"
        if not stamp.is_file():
            _atomic_write_bytes(stamp, json.dumps(identity, indent=2, sort_keys=True).encode())
        else:
            check_cache_identity(json.loads(stamp.read_text()), identity, self.directory)
        self.hits = 0
        self.misses = 0
        self._draft_head: torch.Tensor | None = None

    def path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.safetensors"

    def load(self, key: str) -> dict[str, torch.Tensor] | None:
        """The entry for ``key``, or None when it is absent or unreadable (then it will be recomputed)."""
        from safetensors.torch import load_file

        path = self.path(key)
        if not path.is_file():
            return None
        try:
            entry = load_file(path)
        except Exception as exc:  # a torn or foreign file: recompute rather than train on it
            logger.warning("supervision cache entry %s is unreadable (%s); recomputing it", path, exc)
            return None
        if set(entry) != set(ENTRY_KEYS):
            logger.warning("supervision cache entry %s holds %s, not %s; recomputing it", path, sorted(entry),
                           ENTRY_KEYS)
            return None
        return entry

    def store(self, key: str, entry: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save

        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write_bytes(path, save({k: entry[k].contiguous().cpu() for k in ENTRY_KEYS}))

    def entry(self, target, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """One unpadded sample's entry (``input_ids [S]`` long, ``loss_mask [S]``): from disk, else asked of
        ``target`` (``supervise_compact`` on the sample alone) and stored.

        Returns:
            ``aux_hidden_states [S, 3H]`` and ``final_hidden_states [S, H]`` (target dtype, shifted as the
            target answers), ``position_mask [S]`` bool.
        """
        key = sample_key(input_ids, loss_mask)
        found = self.load(key)
        if found is not None:
            self.hits += 1
            return found
        self.misses += 1
        ids, mask = input_ids.unsqueeze(0), loss_mask.unsqueeze(0)
        answer = target.supervise_compact(ids, torch.ones_like(ids), mask)
        entry = {k: answer[k][0].cpu() for k in ENTRY_KEYS}
        entry["position_mask"] = entry["position_mask"].reshape(-1).bool()
        self.store(key, entry)
        return entry

    def supervise(self, target, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  loss_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """The batch's supervision (``SUPERVISION_KEYS``, as ``Eagle3TargetModel.supervise``) from per-sample entries.

        Arguments:
            target: an ``Eagle3TargetModel`` or ``RemoteEagle3TargetModel`` (``supervise_compact``,
                ``draft_lm_head``), asked only for samples the cache lacks.
            input_ids, attention_mask, loss_mask: ``[B, S]``, right-padded (real tokens first).

        Padded positions get zeros; they are never scored (their loss mask is 0) and never attended.
        """
        assembled = self.supervise_compact(target, input_ids, attention_mask, loss_mask)
        if self._draft_head is None:
            self._draft_head = target.draft_lm_head().cpu()
        full = compact.expand_supervision(assembled, self._draft_head)
        return {key: full[key] for key in SUPERVISION_KEYS}

    def supervise_compact(self, target, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          loss_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """The batch's compact supervision (``compact.COMPACT_SUPERVISION_KEYS``, as the target's
        ``supervise_compact``: what a DFlash run trains on) from per-sample entries; arguments as :meth:`supervise`."""
        batch, seq = input_ids.shape
        lengths = attention_mask.sum(dim=1).tolist()
        rows = [self.entry(target, input_ids[b, :n].cpu(), loss_mask[b, :n].cpu()) for b, n in enumerate(lengths)]
        assembled = {}
        for key in ENTRY_KEYS:
            first = rows[0][key]
            out = torch.zeros((batch, seq, *first.shape[1:]), dtype=first.dtype)
            for b, (row, n) in enumerate(zip(rows, lengths)):
                out[b, :n] = row[key]
            assembled[key] = out
        assembled["position_mask"] = assembled["position_mask"].unsqueeze(-1)
        assembled["input_ids"] = shift_left(input_ids.cpu())
        assembled["loss_mask"] = shift_left(loss_mask.cpu())
        return {key: assembled[key] for key in compact.COMPACT_SUPERVISION_KEYS}

    def summary(self) -> str:
        total = self.hits + self.misses
        share = 100.0 * self.hits / total if total else 0.0
        return f"supervision cache {self.directory}: {self.hits} hits, {self.misses} computed ({share:.0f} % from disk)"


def cache_identity(target, selected_token_ids: torch.Tensor, target_identity: dict | None = None) -> dict:
    """What a cache entry depends on besides its sample: the target (its ``model_info``, its dtype and, when
    known, the identity fields that tell one model's weights and tokenizer from another's of the same
    shape: see ``identity.py``), the layers the session captures (``model_info``'s ``aux_layer_ids``), the draft
    vocabulary and the draft method."""
    info = dict(target.model_info())
    info["dtype"] = str(target.dtype).removeprefix("torch.")
    method = getattr(target, "draft_method", "eagle3")
    if method != "eagle3":  # absent for EAGLE-3, so caches filled before DFlash existed keep their directories
        info["draft_method"] = method
    for field in ("weights_digest", "tokenizer_digest"):
        if (target_identity or {}).get(field) is not None:
            info[field] = target_identity[field]
    return {"target": info, "draft_vocab_sha256": vocab_digest(selected_token_ids.cpu())}


class CacheIdentityError(ValueError):
    """A cache directory holds answers for another target, method, layers or vocabulary than asked for."""


def check_cache_identity(stamped: dict, identity: dict, directory: Path) -> None:
    """``CacheIdentityError`` naming both when the directory's ``identity.json`` is not ``identity`` (a digest
    collision, or a directory copied or edited by hand): its entries would be another run's supervision."""
    if stamped != identity:
        differ = sorted(k for k in set(stamped) | set(identity) if stamped.get(k) != identity.get(k))
        raise CacheIdentityError(f"supervision cache {directory} was filled for {json.dumps(stamped, sort_keys=True)},"
                                 f" not for this run's {json.dumps(identity, sort_keys=True)} (they differ in "
                                 f"{differ}); point --supervision-cache elsewhere or remove that directory")


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either nothing or the whole file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
