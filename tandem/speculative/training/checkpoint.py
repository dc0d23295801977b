"""A training run's state on disk: resumable checkpoints, their rotation, ``metrics.jsonl``, resume checks.

What a user (or a crash) leaves in an output directory is tolerated, and only what tandem wrote is deleted:
checkpoints are ``checkpoints/step_<N>.pt`` exactly (``step_best.pt`` or notes there are never rotated away),
a checkpoint that does not load is skipped with a warning for the newest intact one, and a torn last line of
``metrics.jsonl`` is dropped on resume. A checkpoint also records what its run was trained on
(:func:`run_identity`: data digest, draft vocabulary digest, target identity, run-changing config fields);
resuming with any of them different is refused, naming the field, unless ``--allow-resume-mismatch``.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Optional

import torch

from tandem.speculative.atomic_files import atomic_write

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"

# TrainConfig fields whose change makes a resumed run a different run than the one checkpointed (the
# data and the vocabulary are compared by digest, the target by identity). The batch size is not here:
# a resume at another world size or batch size is supported and explained (``trainer.Trainer``).
RUN_CHANGING_FIELDS = (
    "max_seq_len", "grad_accum_steps", "group_by_length", "total_steps", "learning_rate", "min_lr_ratio",
    "warmup_steps", "weight_decay", "max_grad_norm", "ttt_steps", "ttt_decay", "draft_vocab_size", "seed",
    "aux_layer_ids", "method", "block_size", "draft_layers", "num_anchors", "dflash_loss", "dflash_gamma",
    "mask_token_id",
)


class ResumeMismatchError(ValueError):
    """``--resume`` would continue a run on other data, vocabulary, target or settings than it began with."""


# ------------------------------------------------------------------ checkpoints


def save_training_state(state: dict, path: str | Path) -> None:
    """Atomically write a trainer ``state_dict()`` (local disk only)."""
    atomic_write(Path(path), lambda tmp: torch.save(state, tmp))


def load_training_state(path: str | Path) -> dict:
    """Read a state written by ``save_training_state``; refuses anything but tensors and plain containers."""
    return torch.load(path, map_location="cpu", weights_only=True)


# Only names tandem writes: a user's step_best.pt or step_60_backup.pt is not one of them.
_CHECKPOINT_NAME = re.compile(r"step_(0|[1-9][0-9]*)\.pt")


def checkpoint_step(path: str | Path) -> int | None:
    """N for a file tandem names ``step_N.pt``; None for anything else."""
    match = _CHECKPOINT_NAME.fullmatch(Path(path).name)
    return int(match.group(1)) if match else None


def latest_checkpoint(checkpoint_dir: str | Path) -> Path | None:
    """The newest ``step_N.pt`` under ``checkpoint_dir`` (by N), or None; other files are not checkpoints."""
    directory = Path(checkpoint_dir)
    if not directory.is_dir():
        return None
    found = [(step, p) for p in directory.iterdir() if (step := checkpoint_step(p)) is not None and p.is_file()]
    return max(found)[1] if found else None


def checkpoint_path(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINT_DIR / f"step_{step}.pt"


def tandem_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every checkpoint tandem wrote under ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in directory.iterdir() if p.is_file()]
    return sorted((step, p) for step, p in found if step is not None)


def rotate(directory: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` (at least one) of tandem's checkpoints; returns those deleted."""
    doomed = [path for _step, path in tandem_checkpoints(directory)[: -max(keep, 1)]]
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed


def checkpoint_due(step: int, save_every: int, end: int) -> bool:
    """Whether to checkpoint after ``step``: every ``save_every`` steps, and always at ``end``;
    ``save_every <= 0`` means only at the end."""
    return step == end or (save_every > 0 and step % save_every == 0)


# A checkpoint that does not load raises one of these (a truncated zip, an empty file, a pickle cut short).
_UNREADABLE = (RuntimeError, EOFError, OSError, ValueError, KeyError, zipfile.BadZipFile, pickle.UnpicklingError)


def load_newest_intact(directory: Path, set_aside: bool = False) -> tuple[Optional[int], Optional[dict]]:
    """``(step, state)`` of the newest checkpoint under ``directory`` that loads, ``(None, None)`` if none does.

    Each newer one that does not load is named in a warning; with ``set_aside`` it is renamed
    ``step_N.pt.unreadable`` (kept for a look, no longer taken for a checkpoint by resume or rotation).
    """
    for step, path in reversed(tandem_checkpoints(directory)):
        try:
            state = load_training_state(path)
            problem = (None if isinstance(state, dict) and "step" in state and "draft" in state
                       else "not a training checkpoint")
        except _UNREADABLE as exc:
            problem = f"{type(exc).__name__}: {str(exc)[:200]}"
        if problem is None:
            return step, state
        aside = path.with_name(path.name + ".unreadable")
        if set_aside:
            path.replace(aside)
        logger.warning("--resume: checkpoint %s does not load (%s)%s; trying the one before it", path, problem,
                       f"; renamed {aside.name}" if set_aside else "")
    return None, None


# ------------------------------------------------------------------ metrics.jsonl


def read_metric_rows(path: Path) -> list[dict]:
    """The rows of ``metrics.jsonl``; a line that is not a JSON object with a ``step`` (a write cut short by a
    kill, a user's note) is skipped with a warning."""
    rows = []
    if not Path(path).is_file():
        return rows
    for number, line in enumerate(Path(path).read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            logger.warning("%s:%d is not a metrics row (a write cut short?); dropped", path, number)
            continue
        rows.append(row)
    return rows


def trim_metrics(path: Path, step: int) -> None:
    """Keep the rows of steps up to ``step`` (those after it are redone after a resume: each step should
    appear once in ``metrics.jsonl``); rewrites the file atomically."""
    path = Path(path)
    if not path.is_file():
        return
    kept = [json.dumps(row) for row in read_metric_rows(path) if row["step"] <= step]
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in kept)))


# ------------------------------------------------------------------ what a run is


def target_record(model_info: dict) -> dict:
    """What names the target in a checkpoint, compared on resume: the target's ``identity`` record (name,
    weights digest, dtype, tokenizer digest) when ``model_info`` carries one, else the architecture facts
    every target reports, and its dtype."""
    identity = model_info.get("identity")
    if isinstance(identity, dict):
        return dict(identity)
    facts = ("num_hidden_layers", "hidden_size", "vocab_size", "aux_layer_ids", "dtype")
    return {k: model_info[k] for k in facts if k in model_info}


def run_identity(config, *, data_digest: str, vocab_digest: str, model_info: dict) -> dict:
    """What a checkpoint records about the run it belongs to (plain JSON-able values)."""
    fields = {name: getattr(config, name) for name in RUN_CHANGING_FIELDS}
    return {"data_digest": data_digest, "vocab_digest": vocab_digest, "target": target_record(model_info),
            "config": json.loads(json.dumps(fields))}


def identity_mismatches(saved: dict, current: dict, skip_target_fields=()) -> list[str]:
    """One line per difference between a checkpoint's :func:`run_identity` and the current run's, naming the
    field; target identities are compared on the keys both record, but ``skip_target_fields``."""
    problems = []
    for key, what in (("data_digest", "--data (its contents' digest)"),
                      ("vocab_digest", "the draft vocabulary (digest)")):
        if key in saved and saved[key] != current[key]:
            problems.append(f"{what}: checkpoint {str(saved[key])[:16]}, now {str(current[key])[:16]}")
    old_target, new_target = saved.get("target") or {}, current["target"]
    for key in sorted((set(old_target) & set(new_target)) - set(skip_target_fields)):
        if old_target[key] != new_target[key]:
            problems.append(f"target {key}: checkpoint {old_target[key]!r}, now {new_target[key]!r}")
    old_config = saved.get("config") or {}
    for key in RUN_CHANGING_FIELDS:
        if key in old_config and old_config[key] != current["config"][key]:
            problems.append(f"--{key.replace('_', '-')}: checkpoint {old_config[key]!r}, "
                            f"now {current['config'][key]!r}")
    return problems


def check_resume(saved: Optional[dict], current: dict, allow_mismatch: bool, where: Any,
                 skip_target_fields=()) -> list[str]:
    """Refuse (``ResumeMismatchError``) a resume whose run differs from the checkpoint's, naming each field,
    unless ``allow_mismatch``; then warn and return the differences. A checkpoint from before these records
    (``saved`` None) is resumed with a warning. ``skip_target_fields``: target facts another check owns (the
    target record, ``identity.check_run_record``, with its own ``--allow-target-mismatch``)."""
    if saved is None:
        logger.warning("--resume: %s records no data, vocabulary or target digests (written by an older tandem); "
                       "they cannot be checked", where)
        return []
    problems = identity_mismatches(saved, current, skip_target_fields)
    if problems and not allow_mismatch:
        raise ResumeMismatchError(f"--resume: {where} belongs to another run: " + "; ".join(problems)
                                  + ". Pass --allow-resume-mismatch to continue it anyway, "
                                    "or choose a new --output-dir")
    for problem in problems:
        logger.warning("--resume with --allow-resume-mismatch: %s", problem)
    return problems

