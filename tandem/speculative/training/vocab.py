"""The draft vocabulary: the target tokens the draft may propose, chosen by frequency in the training data.

EAGLE-3 shrinks the draft's ``lm_head`` to ``Vd`` of the target's ``V`` tokens. Order of selection:
special tokens first, then the trained (loss-masked) tokens by descending count (ties: lower id first),
then the lowest unused ids to fill ``Vd``. Two mapping tensors travel with the exported draft:
``d2t[i] = selected[i] - i``, which both SGLang and vLLM read (target id = draft id + ``d2t[draft id]``),
and ``t2d = selected_token_mask``, which both skip (it is written for tools that use it). When the draft
vocabulary is the whole target vocabulary neither is written: vLLM then keeps no mapping and refuses a
``d2t`` it did not expect (see ``export/eagle3.py``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DraftVocab:
    """selected_token_ids ``[Vd]`` long (draft id -> target id); selected_token_mask ``[V]`` bool."""

    selected_token_ids: torch.Tensor
    selected_token_mask: torch.Tensor

    @property
    def d2t(self) -> torch.Tensor:
        """``[Vd]`` long offsets: target id = draft id + ``d2t[draft id]``."""
        return self.selected_token_ids - torch.arange(self.selected_token_ids.numel(), dtype=torch.long)

    @property
    def t2d(self) -> torch.Tensor:
        """``[V]`` bool, True for target ids in the draft vocabulary."""
        return self.selected_token_mask

    @property
    def is_identity(self) -> bool:
        """True when every target token is a draft token in its own place (``Vd == V``, no remapping)."""
        return self.draft_vocab_size == self.target_vocab_size and bool(
            torch.equal(self.selected_token_ids, torch.arange(self.draft_vocab_size)))

    @property
    def draft_vocab_size(self) -> int:
        return int(self.selected_token_ids.numel())

    @property
    def target_vocab_size(self) -> int:
        return int(self.selected_token_mask.numel())


def count_tokens(samples: Iterable[tuple[torch.Tensor, torch.Tensor]], vocab_size: int) -> torch.Tensor:
    """``[V]`` long counts of the tokens under the loss mask, over ``(input_ids [S], loss_mask [S])`` pairs."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for input_ids, loss_mask in samples:
        trained = input_ids[loss_mask.bool()].long()
        counts += torch.bincount(trained, minlength=vocab_size)[:vocab_size]
    return counts


def build_draft_vocab(counts: torch.Tensor, draft_vocab_size: int, special_token_ids: Iterable[int] = ()) -> DraftVocab:
    """Choose ``Vd`` target tokens by the ordering rules above.

    Arguments:
        counts: ``[V]`` long token counts (see ``count_tokens``; all-reduce them first in data parallel).
        draft_vocab_size: ``Vd``; at or above ``V`` the mapping is the identity.
        special_token_ids: ids that are always selected, first.
    """
    vocab_size = counts.numel()
    if draft_vocab_size <= 0:
        raise ValueError(f"draft_vocab_size must be positive, got {draft_vocab_size}")
    if draft_vocab_size >= vocab_size:
        return DraftVocab(torch.arange(vocab_size, dtype=torch.long), torch.ones(vocab_size, dtype=torch.bool))

    chosen: list[int] = []
    taken = torch.zeros(vocab_size, dtype=torch.bool)

    def take(ids: Iterable[int]) -> None:
        for token in ids:
            if len(chosen) == draft_vocab_size:
                return
            if 0 <= token < vocab_size and not taken[token]:
                taken[token] = True
                chosen.append(int(token))

    take(sorted(set(int(t) for t in special_token_ids)))
    # A stable sort on -count keeps equal counts in ascending id order.
    order = torch.sort(-counts, stable=True).indices
    take(int(t) for t in order[counts[order] > 0].tolist())
    take(torch.nonzero(~taken).flatten().tolist())
    selected = torch.tensor(chosen, dtype=torch.long)
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    mask[selected] = True
    return DraftVocab(selected, mask)


def vocab_fingerprint(**facts) -> str:
    """A short hash of what a vocabulary was built from (data file contents, tokenizer, sizes)."""
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def vocab_digest(selected_token_ids: torch.Tensor) -> str:
    """SHA-256 hex naming a draft vocabulary: ``selected_token_ids [Vd]`` as little-endian int64, in order (the
    mask follows from them and the target's vocabulary size).

    The one digest of a vocabulary: the client names it on ``/generate`` (``X-Tandem-Vocab``), the server keys
    a session's mappings by it, checkpoints record it, the supervision cache keys entries by it.
    """
    ids = selected_token_ids.detach().to(device="cpu", dtype=torch.int64).contiguous().numpy().astype("<i8")
    return hashlib.sha256(ids.tobytes()).hexdigest()


def file_digest(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_draft_vocab(vocab: DraftVocab, path: str | Path, counts: torch.Tensor | None = None,
                     fingerprint: str = "") -> None:
    """Write the vocabulary cache atomically: a crash mid-write leaves the old file or none, never half of one."""
    from tandem.speculative.atomic_files import atomic_write

    tensors = {"selected_token_ids": vocab.selected_token_ids, "selected_token_mask": vocab.selected_token_mask}
    if counts is not None:
        tensors["counts"] = counts
    atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata={"fingerprint": fingerprint}))


def load_draft_vocab(path: str | Path, fingerprint: str | None = None) -> DraftVocab | None:
    """The cached vocabulary at ``path``, or None if absent, built from something else, or unreadable (a
    damaged cache is only a cache: it is rebuilt, with a warning)."""
    path = Path(path)
    if not path.is_file():
        return None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            stored = (handle.metadata() or {}).get("fingerprint", "")
        if fingerprint is not None and stored != fingerprint:
            logger.info("draft vocabulary cache %s is stale (built from other data); rebuilding", path)
            return None
        tensors = load_file(str(path))
        vocab = DraftVocab(tensors["selected_token_ids"].long(), tensors["selected_token_mask"].bool())
    except (SafetensorError, OSError, KeyError, ValueError) as exc:
        logger.warning("draft vocabulary cache %s is unreadable (%s); rebuilding it", path, exc)
        return None
    if vocab.selected_token_ids.dim() != 1 or int(vocab.selected_token_mask.sum()) != vocab.draft_vocab_size:
        logger.warning("draft vocabulary cache %s is inconsistent; rebuilding it", path)
        return None
    return vocab
