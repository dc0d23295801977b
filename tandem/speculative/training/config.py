"""``TrainConfig``: every field of a training run, each a ``tandem train`` flag with its docstring as help."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tandem.speculative.decoding.tree import TreeShape
from tandem.speculative.export.eagle3 import EXPORT_FORMATS
from tandem.speculative.export.engine_conventions import parse_dtype


@dataclass(kw_only=True)
class TrainConfig:
    """Everything a training run needs; every field is also a ``tandem train`` flag."""

    data: str = ""
    """Chat JSONL to train on (ShareGPT ``conversations`` or ``messages`` lines)."""
    output_dir: str = "runs/train"
    """Where checkpoints, metrics.jsonl, the vocabulary cache and the exported draft go."""
    target: str = "default"
    """In-process target: ``default`` (SmolLM2-135M-Instruct), an HF directory, or a .gguf file."""
    tokenizer: str | None = None
    """Tokenizer spec (same forms as ``target``); defaults to ``target``."""
    target_urls: list[str] = field(default_factory=list)
    """Remote target servers (``tandem serve-target``); when set, no target is loaded here."""
    prefetch_depth: int = 2
    """Remote only: supervision requests kept in flight ahead of the training step."""
    request_timeout_s: float = 300.0
    """Remote only: the most seconds one request to a target server may take, from connecting to the last byte of
    its answer, retries included; a server that sends nothing or drips its answer is given up then, naming it."""
    supervision_encoding: str = "full"
    """Remote only: ``full`` (fp32 draft-vocabulary probabilities on the wire) or ``compact`` (the target's final
    hidden state; the client computes the probabilities: far fewer bytes a token, docs/remote-target.md)."""
    dtype: str = "auto"
    """In-process target dtype: ``auto`` (bfloat16 where the hardware multiplies it natively -- GPUs, CPUs with
    AVX512-BF16 or AMX -- else float32), ``float32``, ``bfloat16`` or ``float16``. A remote target runs in its
    server's ``--dtype``."""
    mixed_precision: bool = True
    """Run the draft's forward in the target's dtype (autocast) when that is not float32; the master weights
    and the optimizer state stay float32."""
    supervision_cache: str | None = None
    """Directory of the supervision cache: each sample's target answer is computed once (alone, in the compact
    encoding) and reused in later epochs and runs; fill it ahead with ``tandem cache-supervision``."""
    method: str = "eagle3"
    """The draft method: ``eagle3`` or ``dflash`` (a block drafter that proposes ``block_size - 1`` tokens in one
    forward; ``drafts/dflash.py``)."""
    aux_layer_ids: list[int] | None = None
    """Target layers whose outputs feed the draft; default: EAGLE-3 ``[1, L//2-1, L-4]``, DFlash one a draft
    layer by the reference's ``round(1 + i*(L-4)/(n-1))``."""
    block_size: int = 16
    """DFlash: the trained block, the anchor and ``block_size - 1`` proposals (the reference: 16)."""
    draft_layers: int = 5
    """DFlash: the draft's decoder layers (the reference's Qwen3-8B draft: 5)."""
    num_anchors: int = 64
    """DFlash: blocks trained per sequence a step, their anchors drawn from the trained positions."""
    dflash_loss: str = "data"
    """DFlash: the slot loss, ``data`` (cross-entropy on the data token), ``argmax`` (on the target's greedy token)
    or ``kl`` (to the target's distribution); see ``training/dflash_loss.py`` and docs/experiments.md."""
    dflash_gamma: float | None = None
    """DFlash: the slot weights' decay ``exp(-(k-1)/gamma)``; default 7 for blocks of 16, 4 for 8, else half the
    block."""
    mask_token_id: int | None = None
    """DFlash: the id embedded at the proposal slots; default: the tokenizer's mask token, else the first unused
    embedding row, else the highest id the data never uses."""
    max_seq_len: int = 256
    """Conversations are truncated to this many tokens."""
    batch_size: int = 4
    """Sequences per micro-batch on each rank (the global batch is world_size times this)."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step."""
    group_by_length: bool = True
    """Batch samples of similar lengths (sorted within windows of 16 batches of a random order, the batches then
    shuffled; ``data.group_by_length``): a batch pads to its longest sample, and random chat batches are ~17 %
    padding. Off: plain random batches."""
    total_steps: int = 200
    """Optimizer steps in the whole run (the schedule's length)."""
    learning_rate: float = 1e-3
    """Peak AdamW learning rate."""
    min_lr_ratio: float = 0.1
    """The cosine decays to ``learning_rate * min_lr_ratio``."""
    warmup_steps: int = 20
    """Linear warmup from 0 to the peak."""
    weight_decay: float = 0.0
    max_grad_norm: float = 0.5
    """Gradient clipping threshold (global L2 norm)."""
    ttt_steps: int = 7
    """Unrolled training-time-test steps K."""
    ttt_decay: float = 0.8
    """Loss weight ratio between consecutive TTT steps."""
    draft_vocab_size: int = 8192
    """Draft vocabulary size Vd (clamped to the target vocabulary)."""
    seed_lm_head: bool = True
    """Start lm_head from the target's embedding rows of the draft vocabulary (tied-embedding targets)."""
    seed: int = 0
    """Seeds the draft's initialisation and the data order."""
    save_every: int = 100
    """Write a resumable checkpoint every this many steps (and always at the end); 0: only at the end."""
    keep_checkpoints: int = 2
    """How many resumable checkpoints to keep on disk."""
    stop_at_step: int | None = None
    """End this run at this step (checkpointed) though the schedule spans total_steps: for time-boxed jobs."""
    time_limit_min: float = 0.0
    """Fit this run to this many minutes of training, live evaluations included (0: no limit): 10 steps in and
    every tenth of the run, the schedule is fitted to the steps that fit at the rate measured lately (shorter, or
    longer again up to total_steps), so the learning rate ends its decay in time; the run ends, checkpointed and
    exported, when one more step would not fit. A later --resume with the same flags continues the schedule as it
    was fitted (``training/time_limit.py``)."""
    resume: bool = False
    """Continue from the newest checkpoint in ``output_dir/checkpoints`` that loads (a damaged newer one is skipped)."""
    export_format: str = "sglang"
    """The exported draft's format: ``sglang`` (SGLang and vLLM load it) or ``speculators`` (vLLM's native one)."""
    export_dtype: str | None = None
    """The exported weights' dtype: float32, bfloat16 or float16 (default: the dtype of the target's checkpoint, as
    engines expect, whatever dtype the run computes in; else the dtype the target runs in)."""
    allow_target_mismatch: bool = False
    """Accept on purpose a target that is not the one the run was trained against (``--resume``), or a
    tokenizer other than the target's; without it either is an error."""
    allow_resume_mismatch: bool = False
    """With --resume: continue although the data, the vocabulary or a run-changing setting differs from the
    checkpoint's (each difference is then a warning instead of an error)."""
    eval_every: int = 0
    """Measure the draft by real speculative decoding every this many steps and at the end, against the run's own
    target (in-process, or the server's ``/verify``): acceptance length and step-0 accuracy on held-out prompts go
    to metrics.jsonl and the progress bar beside the simulated figure (a DFlash run: the acceptance length at
    blocks of ``block_size``, ``decoding/dflash_live_eval.py``). 0: never. Rank 0 evaluates."""
    eval_prompts: str = "heldout"
    """The evaluation's prompts: ``heldout`` or ``train`` (the shipped prompt sets), or a chat JSONL file."""
    eval_limit: int = 8
    """Prompts an evaluation decodes (the first ones of ``eval_prompts``)."""
    eval_max_new_tokens: int = 64
    """Tokens an evaluation decodes a prompt."""
    eval_draft_tokens: int = 4
    """The longest draft chain a round of the evaluation's speculative decoding."""
    eval_min_confidence: float = 0.0
    """Dynamic draft length of the evaluation's decoding (see ``tandem eval --min-confidence``)."""
    eval_tree: str = ""
    """The evaluation drafts trees of this shape, ``DEPTH,TOP_K,SIZE`` (see ``tandem eval --tree``); "": chains;
    ``auto``: each evaluation measures which chain or tree pays most on this machine for the current draft and
    decodes with it (metrics.jsonl then records ``eval_shape`` and ``eval_predicted_speedup``)."""
    show_progress: bool = True

    def __post_init__(self) -> None:
        # Checked here, not after hours of training at export time.
        if self.export_format not in EXPORT_FORMATS:
            raise ValueError(f"export_format must be one of {EXPORT_FORMATS}, got {self.export_format!r}")
        if self.export_dtype is not None:
            parse_dtype(self.export_dtype)
        if self.eval_every < 0 or self.eval_limit < 1 or self.eval_max_new_tokens < 1 or self.eval_draft_tokens < 1:
            raise ValueError("eval_every must be >= 0, and eval_limit, eval_max_new_tokens, eval_draft_tokens >= 1")
        if self.eval_tree and self.eval_tree != "auto":
            TreeShape.parse(self.eval_tree)
        if self.method not in ("eagle3", "dflash"):
            raise ValueError(f"method must be eagle3 or dflash, got {self.method!r}")
        if self.block_size < 2 or self.draft_layers < 1 or self.num_anchors < 1:
            raise ValueError("block_size must be >= 2, draft_layers and num_anchors >= 1")
        if self.dflash_loss not in ("data", "argmax", "kl"):
            raise ValueError(f"dflash_loss must be data, argmax or kl, got {self.dflash_loss!r}")
        if self.method == "dflash" and self.eval_tree:
            raise ValueError("--eval-tree drafts EAGLE-3 trees; a DFlash run's --eval-every decodes blocks of "
                             "--block-size")

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> "TrainConfig":
        raw = yaml.safe_load(Path(path).read_text()) or {}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{path}: unknown config keys {unknown}")
        raw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**raw)
