"""The supervision cache: the frozen target's answer for each sample, computed once and reused (offline training).

The target never changes during a run, so a run that sees each sample E times would pay for E forwards where
one does. The cache keeps that one answer on disk in the compact encoding (``target/compact.py``: aux hidden
states, final hidden state, position mask); the trainer expands it with the draft vocabulary's ``lm_head``
rows. Each sample is answered alone, unpadded, because padding changes a target's floating-point sums: an
entry is then a function of the sample and the target only, whoever computes it, so a run that fills the
cache as it trains equals, bit for bit, one that reads a cache filled ahead (``tandem cache-supervision``).
Names can lie (a directory copied under another identity's name, two entries' files swapped), so an entry
carries in its own bytes the digests of the sample and of the identity it answers, and every read checks
them and each tensor's shape and dtype (``entry_problem``): a mismatch is a miss, recomputed and counted.
Layout and atomic writes: :class:`SupervisionCache`. A sample with images (a vision-language target) is keyed
by its images too: by the digest of the patches its image processor made of them (``image_patches.patches_digest``),
which is what the target reads, so a file renamed, re-encoded to the same pixels or processed alike is reused,
and a changed image or processor setting is a new key.
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
from tandem.speculative.training.image_patches import Patches, image_context, patches_digest
from tandem.speculative.training.vocab import vocab_digest

logger = logging.getLogger(__name__)

# What an entry holds (per sample, unpadded, shifted as the target answers): the compact answer minus
# the token ids and loss mask, which the batch itself gives.
ENTRY_KEYS = ("aux_hidden_states", compact.FINAL_HIDDEN_KEY, "position_mask")
# An entry's own record of what it answers: one safetensors metadata field (one, so that the header's bytes
# do not depend on the order a map iterates in), JSON of the sample's and the identity's SHA-256.
ENTRY_METADATA_KEY = "tandem_entry"
# Bumped when what an entry holds or records changes: older entries then live under another identity.
ENTRY_FORMAT = 2
# Refusals logged one by one before the rest are only counted (a whole foreign directory is one story).
_LOGGED_REFUSALS = 5


def sample_key(input_ids: torch.Tensor, loss_mask: torch.Tensor, patches: Patches | None = None) -> str:
    """SHA-256 hex of one unpadded sample: ``input_ids [S]`` and ``loss_mask [S]`` (any integer dtype), and the
    digest of its images' ``patches`` when it has some (a text sample's key is what it was before images)."""
    digest = hashlib.sha256()
    digest.update(input_ids.to(torch.int64).contiguous().numpy().tobytes())
    digest.update(loss_mask.to(torch.uint8).contiguous().numpy().tobytes())
    if patches is not None:
        digest.update(b"images:" + patches_digest(patches).encode())
    return digest.hexdigest()


def identity_digest(identity: dict, full: bool = False) -> str:
    """A stable digest of a JSON-serialisable identity dict: 16 hex digits (the cache's directory name), or the
    whole SHA-256 (``full``: what every entry records)."""
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return digest if full else digest[:16]


def entry_layout(identity: dict) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """What each tensor of an entry for an ``S``-token sample must be, by key: ``(shape after S, dtype)``.

    From the identity alone (``cache_identity``'s fields): ``aux_hidden_states [S, A*H]`` for the ``A`` aux
    layers and ``final_hidden_states [S, H]`` in the target dtype, ``position_mask [S]`` bool."""
    target = identity["target"]
    hidden, dtype = int(target["hidden_size"]), getattr(torch, target["dtype"])
    return {"aux_hidden_states": ((len(target["aux_layer_ids"]) * hidden,), dtype),
            compact.FINAL_HIDDEN_KEY: ((hidden,), dtype),
            "position_mask": ((), torch.bool)}


def entry_record(key: str, identity_sha256: str) -> str:
    """The ``ENTRY_METADATA_KEY`` value of the entry for sample ``key`` under the identity ``identity_sha256``."""
    return json.dumps({"identity": identity_sha256, "sample": key}, sort_keys=True)


def entry_problem(entry: dict[str, torch.Tensor], metadata: dict, key: str, identity_sha256: str,
                  layout: dict[str, tuple[tuple[int, ...], torch.dtype]], seq: int) -> str | None:
    """Why a stored entry does not answer sample ``key`` (``seq`` tokens) for the identity whose full digest is
    ``identity_sha256``, or None when it does. Generic over ``layout``'s tensors."""
    try:
        claims = json.loads(metadata.get(ENTRY_METADATA_KEY) or "{}")
    except ValueError:
        claims = None
    if not isinstance(claims, dict):
        return f"its {ENTRY_METADATA_KEY} record is not a JSON object"
    if claims.get("sample") != key:
        return f"it answers another sample ({str(claims.get('sample'))[:16]}...)"
    if claims.get("identity") != identity_sha256:
        return f"it was computed for another identity ({str(claims.get('identity'))[:16]}...)"
    if set(entry) != set(layout):
        return f"it holds {sorted(entry)}, not {sorted(layout)}"
    for name, (tail, dtype) in layout.items():
        tensor = entry[name]
        if tuple(tensor.shape) != (seq, *tail) or tensor.dtype != dtype:
            return (f"{name} is {str(tensor.dtype).removeprefix('torch.')} {list(tensor.shape)}, expected "
                    f"{str(dtype).removeprefix('torch.')} {[seq, *tail]}")
    return None


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
            (``cache_identity`` builds it; a dict that may grow fields).
        layout: what an entry's tensors must be (``entry_layout``'s form); default ``entry_layout(identity)``.
    """

    def __init__(self, root: str | Path, identity: dict,
                 layout: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None):
        self.identity = identity
        self.identity_sha256 = identity_digest(identity, full=True)
        self.layout = layout if layout is not None else entry_layout(identity)
        self.directory = Path(root) / identity_digest(identity)
        self.directory.mkdir(parents=True, exist_ok=True)
        stamp = self.directory / "identity.json"
        if not stamp.is_file():
            _atomic_write_bytes(stamp, json.dumps(identity, indent=2, sort_keys=True).encode())
        elif (stamped := _read_stamp(stamp)) != identity:
            if _method_and_layers(stamped) != _method_and_layers(identity):
                check_cache_identity(stamped, identity, self.directory)  # another method's or layers': refused
            # Another identity's directory under this name (copied, renamed): its entries will not verify.
            logger.warning("supervision cache %s: its identity.json is not this run's identity; entries that do "
                           "not verify will be recomputed", self.directory)
        self.hits = 0
        self.misses = 0
        self.refused = 0
        """Entries found on disk but not used (foreign, swapped, damaged): recomputed, also counted in ``misses``."""
        self._draft_head: torch.Tensor | None = None

    def path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.safetensors"

    def load(self, key: str, seq: int) -> dict[str, torch.Tensor] | None:
        """The entry for sample ``key`` of ``seq`` tokens, or None when it is absent or does not verify (its
        recorded sample and identity, its tensors' shapes and dtypes): then it is recomputed."""
        from safetensors import safe_open

        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), "pt") as handle:
                metadata = handle.metadata() or {}
                entry = {name: handle.get_tensor(name) for name in handle.keys()}
        except Exception as exc:  # a torn or foreign file: recompute rather than train on it
            problem = f"it is unreadable ({type(exc).__name__}: {str(exc)[:200]})"
        else:
            problem = entry_problem(entry, metadata, key, self.identity_sha256, self.layout, seq)
            if problem is None:
                return entry
        self.refused += 1
        log = logger.warning if self.refused <= _LOGGED_REFUSALS else logger.debug
        log("supervision cache entry %s not used: %s; recomputing it", path, problem)
        if self.refused == _LOGGED_REFUSALS:
            logger.warning("supervision cache %s: further refused entries are only counted", self.directory)
        return None

    def store(self, key: str, entry: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save

        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {ENTRY_METADATA_KEY: entry_record(key, self.identity_sha256)}
        _atomic_write_bytes(path, save({k: entry[k].contiguous().cpu() for k in self.layout}, metadata=metadata))

    def entry(self, target, input_ids: torch.Tensor, loss_mask: torch.Tensor,
              patches: Patches | None = None) -> dict[str, torch.Tensor]:
        """One unpadded sample's entry (``input_ids [S]`` long, ``loss_mask [S]``, its images' ``patches`` or None):
        from disk, else asked of ``target`` (``supervise_compact`` on the sample alone) and stored.

        Returns:
            ``aux_hidden_states [S, 3H]`` and ``final_hidden_states [S, H]`` (target dtype, shifted as the
            target answers), ``position_mask [S]`` bool.
        """
        key = sample_key(input_ids, loss_mask, patches)
        found = self.load(key, int(input_ids.shape[0]))
        if found is not None:
            self.hits += 1
            return found
        self.misses += 1
        ids, mask = input_ids.unsqueeze(0), loss_mask.unsqueeze(0)
        with image_context(target, patches):
            answer = target.supervise_compact(ids, torch.ones_like(ids), mask)
        entry = {k: answer[k][0].cpu() for k in ENTRY_KEYS}
        entry["position_mask"] = entry["position_mask"].reshape(-1).bool()
        self.store(key, entry)
        return entry

    def supervise(self, target, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  loss_mask: torch.Tensor, images: list[Patches | None] | None = None) -> dict[str, torch.Tensor]:
        """The batch's supervision (``SUPERVISION_KEYS``, as ``Eagle3TargetModel.supervise``) from per-sample entries.

        Arguments:
            target: an ``Eagle3TargetModel`` or ``RemoteEagle3TargetModel`` (``supervise_compact``,
                ``draft_lm_head``), asked only for samples the cache lacks.
            input_ids, attention_mask, loss_mask: ``[B, S]``, right-padded (real tokens first).
            images: each row's images' patches or None (``image_patches.row_images``); None: no row has any.

        Padded positions get zeros; they are never scored (their loss mask is 0) and never attended.
        """
        assembled = self.supervise_compact(target, input_ids, attention_mask, loss_mask, images)
        if self._draft_head is None:
            self._draft_head = target.draft_lm_head().cpu()
        full = compact.expand_supervision(assembled, self._draft_head)
        return {key: full[key] for key in SUPERVISION_KEYS}

    def supervise_compact(self, target, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          loss_mask: torch.Tensor,
                          images: list[Patches | None] | None = None) -> dict[str, torch.Tensor]:
        """The batch's compact supervision (``compact.COMPACT_SUPERVISION_KEYS``, as the target's
        ``supervise_compact``: what a DFlash run trains on) from per-sample entries; arguments as :meth:`supervise`."""
        batch, seq = input_ids.shape
        lengths = attention_mask.sum(dim=1).tolist()
        images = images or [None] * batch
        rows = [self.entry(target, input_ids[b, :n].cpu(), loss_mask[b, :n].cpu(), images[b])
                for b, n in enumerate(lengths)]
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
        refused = f", {self.refused} of them in place of entries that did not verify" if self.refused else ""
        return (f"supervision cache {self.directory}: {self.hits} hits, {self.misses} computed{refused} "
                f"({share:.0f} % from disk)")


def cache_identity(target, selected_token_ids: torch.Tensor, target_identity: dict | None = None) -> dict:
    """What a cache entry depends on besides its sample: the target (its ``model_info``, its dtype and, when
    known, the identity fields that tell one model's weights and tokenizer from another's of the same
    shape: see ``identity.py``), the layers the session captures (``model_info``'s ``aux_layer_ids``), the draft
    vocabulary, the draft method, the encoding and the entry format. A dict that may grow fields: every one of
    them changes the directory and the digest each entry records."""
    info = dict(target.model_info())
    info["dtype"] = str(target.dtype).removeprefix("torch.")
    method = getattr(target, "draft_method", "eagle3")
    if method != "eagle3":  # absent for EAGLE-3, so caches filled before DFlash existed keep their directories
        info["draft_method"] = method
    for field in ("weights_digest", "tokenizer_digest"):
        if (target_identity or {}).get(field) is not None:
            info[field] = target_identity[field]
    return {"target": info, "draft_vocab_sha256": vocab_digest(selected_token_ids.cpu()),
            "encoding": "compact", "entry_format": ENTRY_FORMAT}


def _read_stamp(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class CacheIdentityError(ValueError):
    """A cache directory holds answers for another target, method, layers or vocabulary than asked for."""


def _method_and_layers(identity) -> tuple:
    """The draft method and the captured layers an identity names (a stamp written before DFlash: EAGLE-3's)."""
    target = identity.get("target") if isinstance(identity, dict) else None
    target = target if isinstance(target, dict) else {}
    return target.get("draft_method", "eagle3"), target.get("aux_layer_ids")


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
