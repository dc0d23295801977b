"""The EAGLE-3 training loop: one process or data-parallel ranks (torchrun), target in-process or remote.

    tandem train --data chat.jsonl --out runs/my-draft --total-steps 400
    tandem train --data chat.jsonl --out runs/my-draft --resume        # continue from the last checkpoint
    torchrun --nproc-per-node 8 -m tandem.train --data chat.jsonl ...  # DDP; see distributed.py

The ``Trainer`` builds itself in named phases (target, data, vocabulary, draft, optimizer) and is a
``Stateful``: ``state_dict()`` holds everything a bit-exact resume needs (trainable weights, optimizer
moments, step, RNG), so training 2N steps in one run equals N + resume + N, bit for bit on CPU.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tandem.speculative.decoding.tree import TreeShape
from tandem.speculative.drafts.eagle3 import Eagle3DraftConfig, Eagle3DraftModel
from tandem.speculative.export import eagle3 as draft_export
from tandem.speculative.export.engine_conventions import parse_dtype
from tandem.speculative.target import identity
from tandem.speculative.target.vision import mrope_positions
from tandem.speculative.training import checkpoint
from tandem.speculative.training.config import TrainConfig
from tandem.speculative.training.data import (
    ChatCollator,
    TokenizedChatDataset,
    batch_order,
    pad_token_id_for,
    read_chat_jsonl,
)
from tandem.speculative.training.distributed import (
    DistributedContext,
    RankThroughput,
    current_context,
    init_distributed,
    servers_in_use,
    throughput_summary,
)
from tandem.speculative.training.eagle3_loss import TTTObjective, step_valid_counts
from tandem.speculative.training.image_patches import ImagePatches, batch_patches, image_context, row_images
from tandem.speculative.training.prefetch import SupervisionPrefetcher
from tandem.speculative.training.supervision_cache import SupervisionCache, cache_identity
from tandem.speculative.training.time_limit import TimeLimit
from tandem.speculative.training.vocab import (
    DraftVocab,
    build_draft_vocab,
    count_tokens,
    file_digest,
    load_draft_vocab,
    save_draft_vocab,
    vocab_digest,
    vocab_fingerprint,
)

logger = logging.getLogger(__name__)


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warmup then cosine decay; a pure function of the step, so resume needs no scheduler state."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    span = max(config.total_steps - config.warmup_steps, 1)
    progress = min((step - config.warmup_steps) / span, 1.0)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.learning_rate * (config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine)


class Trainer:
    """Builds the run in phases, then ``train()``; ``state_dict()`` / ``load_state_dict()`` for resume.

    Arguments:
        config: the run's configuration.
        target: an ``Eagle3TargetModel`` or ``RemoteEagle3TargetModel`` (anything with ``supervise``,
            ``get_input_embeddings``, ``set_vocab_mapping``, ``model_info``).
        tokenizer: built from ``config.tokenizer or config.target`` if None.
        target_factory: ``(config, distributed) -> target`` when ``target`` is None;
            ``tandem.speculative.training.target_factory.build_target`` is the one the CLI uses. The trainer
            itself never imports the remote package: ``remote/`` depends on ``training/``, not the reverse.
        distributed: this rank's place in a data-parallel job (see ``distributed.py``); default: the
            initialised default process group, else a single process.
    """

    METHOD = "eagle3"
    """The draft method this trainer trains (``config.method``)."""
    FROZEN_DRAFT_KEYS: tuple[str, ...] = ("embed_tokens.weight",)
    """Draft weights copied from the target and frozen: not in checkpoints."""

    def __init__(self, config: TrainConfig, target=None, tokenizer=None, distributed: DistributedContext | None = None,
                 target_factory=None):
        self.config = config
        # --time-limit-min may shorten config.total_steps; the run's identity keeps the schedule it was asked for,
        # and checkpoints carry the one it runs, so a resume with the same flags continues the shortened one.
        self.requested_total_steps = config.total_steps
        self.dist = distributed or current_context()
        self.output_dir = Path(config.output_dir)
        if self.dist.is_main:  # rank 0 alone writes files
            self.output_dir.mkdir(parents=True, exist_ok=True)
        self.step = 0
        self.throughput = RankThroughput()
        self._build_target(target, tokenizer, target_factory)
        self._build_data()
        self._build_vocab()
        self._build_draft()
        self._build_optimizer()

    # --- phases -------------------------------------------------------------------------------

    def _build_target(self, target, tokenizer, target_factory) -> None:
        from tandem.models import load_tokenizer

        if target is None:
            if target_factory is None:
                raise ValueError("no target: pass target=, or target_factory= "
                                 "(tandem.speculative.training.target_factory.build_target builds "
                                 "the in-process or remote target a TrainConfig names)")
            target = target_factory(self.config, self.dist)
        self.target = target
        self.tokenizer = (tokenizer if tokenizer is not None
                          else load_tokenizer(self.config.tokenizer or self.config.target))
        self.model_info = self.target.model_info()
        self._check_target_identity()

    def _check_target_identity(self) -> None:
        """Learn the target's identity (see ``identity.py``); the data must be tokenized by the target's tokenizer."""
        self.target_identity = identity.identity_of(self.target, tokenizer=self.tokenizer)
        identity.check_same_target({"tokenizer_digest": identity.tokenizer_digest(self.tokenizer)},
                                   self.target_identity,
                                   what="the training tokenizer and the target's", fields=("tokenizer_digest",),
                                   allow=self.config.allow_target_mismatch)

    @property
    def record(self) -> dict:
        """What checkpoints and the exported draft record about this run: target identity, aux ids, vocabulary."""
        return identity.run_record(self.target_identity, self.vocab.selected_token_ids)

    def _build_data(self) -> None:
        if not self.config.data:
            raise ValueError("no training data: pass --data PATH (chat JSONL; see `tandem regenerate`)")
        records = read_chat_jsonl(self.config.data)
        self.images = self._image_patches(records)
        self.dataset = TokenizedChatDataset.from_records(self.tokenizer, records, self.config.max_seq_len, self.images)
        self.global_batch_size = self.config.batch_size * self.dist.world_size
        if len(self.dataset) < self.global_batch_size:
            raise ValueError(f"{self.config.data}: {len(self.dataset)} usable conversations, fewer than the global "
                             f"batch batch_size={self.config.batch_size} x world_size={self.dist.world_size}")
        self.collate = ChatCollator(pad_token_id=pad_token_id_for(self.tokenizer), images=self.images)
        self._epoch_orders: dict[int, list[list[int]]] = {}
        # Each sample's token count, for batches grouped by length (data.group_by_length); None: random batches.
        self._sample_lengths = ([len(sample["input_ids"]) for sample in self.dataset.samples]
                                if self.config.group_by_length else None)
        if self.dist.is_main:
            with_images = sum(1 for sample in self.dataset.samples if sample.get("images"))
            logger.info("data: %d conversations (%d with images), %d trained tokens", len(self.dataset), with_images,
                        self.dataset.num_loss_tokens())

    def _image_patches(self, records) -> ImagePatches | None:
        """The target's image processor when a record has images (None otherwise); refused in one line for a
        text-only target or a target without an image processor."""
        first = next((r for r in records if r.images), None)
        if first is None:
            return None
        from tandem.models import load_target_config

        spec = self.config.tokenizer or self.config.target
        model = getattr(self.target, "model", None)
        full_config = model.config if model is not None else load_target_config(spec)
        try:
            return ImagePatches.for_target(spec, full_config, self.tokenizer, first.source)
        except ValueError as exc:
            hint = (" (a remote target's processor and config are read from --tokenizer: pass the target's "
                    "directory or hub id)") if model is None and not self.config.tokenizer else ""
            raise type(exc)(f"{exc}{hint}") from None

    def _build_vocab(self) -> None:
        vocab_size = self.model_info["vocab_size"]
        self.data_digest = file_digest(self.config.data)
        fingerprint = vocab_fingerprint(data=self.data_digest, vocab=vocab_size,
                                        size=self.config.draft_vocab_size, max_seq_len=self.config.max_seq_len,
                                        tokenizer=type(self.tokenizer).__name__, tokens=len(self.tokenizer))
        cache_path = self.output_dir / "draft_vocab.safetensors"
        vocab = load_draft_vocab(cache_path, fingerprint)
        # Every rank must take the same branch: the counting below is a collective.
        if not self.dist.all_agree(vocab is not None):
            # Rank r counts samples r, r+W, ...: disjoint shards covering the data, so the sum is the 1-rank count.
            shard = (self.dataset[i] for i in range(self.dist.rank, len(self.dataset), self.dist.world_size))
            counts = self.dist.all_reduce_sum(count_tokens(((s["input_ids"], s["loss_mask"]) for s in shard),
                                                           vocab_size))
            vocab = build_draft_vocab(counts, self.config.draft_vocab_size, self.tokenizer.all_special_ids)
            if self.dist.is_main:
                save_draft_vocab(vocab, cache_path, counts, fingerprint)
                # Every trained token outside the draft vocabulary is a certain rejection when decoding.
                covered = float(counts[vocab.selected_token_ids].sum()) / max(float(counts.sum()), 1.0)
                logger.info("draft vocabulary: %d tokens cover %.1f %% of the trained tokens",
                            vocab.draft_vocab_size, 100 * covered)
        self.vocab = vocab
        self.target.set_vocab_mapping(vocab.selected_token_ids, vocab.selected_token_mask)
        self.supervision_cache = None
        if self.config.supervision_cache:
            cached_for = cache_identity(self.target, vocab.selected_token_ids, self.target_identity)
            self.supervision_cache = SupervisionCache(self.config.supervision_cache, cached_for)
            if self.dist.is_main:
                logger.info("supervision cache: %s", self.supervision_cache.directory)

    def _build_draft(self) -> None:
        torch.manual_seed(self.config.seed)
        target_config = self._target_config()
        draft_config = Eagle3DraftConfig.from_target_config(target_config, self.config.draft_vocab_size)
        self.draft = Eagle3DraftModel(draft_config)
        self.draft.set_vocab(self.vocab.d2t, self.vocab.t2d)
        self.draft.seed_from_target(self.target.get_input_embeddings().cpu(), self.vocab.selected_token_ids,
                                    seed_lm_head=self.config.seed_lm_head)
        self.draft.to(self.dist.device).train()
        # What the step runs: the TTT loss, in DDP when data parallel (gradients averaged in backward).
        self.objective = self.dist.wrap(TTTObjective(self.draft, self.config.ttt_steps, self.config.ttt_decay))
        self.compute_dtype = self.target.dtype if self.config.mixed_precision else torch.float32
        if self.dist.is_main:
            logger.info("draft: %s compute, float32 master weights and optimizer state",
                        str(self.compute_dtype).removeprefix("torch."))

    def autocast(self):
        """The draft forward's precision: autocast to the target's dtype (bf16 compute on fp32 weights), or none."""
        if self.compute_dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=self.dist.device.type, dtype=self.compute_dtype)

    def _target_config(self):
        """The target's HF config: the in-process model's, or (remote target) read from the local spec."""
        from tandem.models import load_target_config, text_config

        model = getattr(self.target, "model", None)
        if model is not None:
            return text_config(model.config)
        config = text_config(load_target_config(self.config.tokenizer or self.config.target))
        for key in ("hidden_size", "vocab_size", "num_hidden_layers"):
            if getattr(config, key) != self.model_info[key]:
                raise ValueError(f"the remote target's {key}={self.model_info[key]} differs from the local "
                                 f"spec {self.config.tokenizer or self.config.target!r} ({getattr(config, key)})")
        return config

    def _build_optimizer(self) -> None:
        params = [p for p in self.draft.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=self.config.learning_rate, betas=(0.9, 0.95),
                                           weight_decay=self.config.weight_decay)

    # --- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        trainable = {k: v for k, v in self.draft.state_dict().items() if k not in self.FROZEN_DRAFT_KEYS}
        return {"step": self.step, "draft": trainable, "optimizer": self.optimizer.state_dict(),
                "rng": torch.get_rng_state(), "config": json.dumps(dataclasses.asdict(self.config)),
                "world_size": self.dist.world_size, "global_batch_size": self.global_batch_size,
                "record": json.dumps(self.record), "run": self.run_identity(),
                "schedule_total_steps": self.config.total_steps}

    def run_identity(self) -> dict:
        """What this run trains on, as checkpoints record it (see ``checkpoint.run_identity``)."""
        digest = vocab_digest(self.vocab.selected_token_ids)
        target = {**self.model_info, "dtype": str(self.target.dtype).removeprefix("torch.")}
        asked = dataclasses.replace(self.config, total_steps=self.requested_total_steps)
        return checkpoint.run_identity(asked, data_digest=self.data_digest, vocab_digest=digest, model_info=target)

    def load_state_dict(self, state: dict) -> None:
        saved = json.loads(state["record"]) if "record" in state else None
        identity.check_run_record(saved, self.record, what="--resume", allow=self.config.allow_target_mismatch)
        try:
            missing, unexpected = self.draft.load_state_dict(state["draft"], strict=False)
        except RuntimeError as exc:  # shapes differ: another draft size or vocabulary size
            raise ValueError(f"checkpoint does not fit this draft: {str(exc)[:500]}") from None
        if unexpected or any(k not in self.FROZEN_DRAFT_KEYS for k in missing):
            raise ValueError(f"checkpoint does not fit this draft: missing {missing}, unexpected {unexpected}")
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        self.step = int(state["step"])
        self._keep_fitted_schedule(int(state.get("schedule_total_steps", self.config.total_steps)))
        self._explain_world_size_change(int(state.get("world_size", 1)),
                                        int(state.get("global_batch_size", self.global_batch_size)))

    def _keep_fitted_schedule(self, schedule_total_steps: int) -> None:
        """A checkpoint of a run whose time limit shortened its schedule resumes on that schedule (the learning
        rate's cosine is a function of it), when this run asks for the total the checkpointed one asked for."""
        if schedule_total_steps == self.config.total_steps:
            return
        logger.info("--resume: the checkpointed run's time limit had fitted its schedule to %d steps of the %d asked "
                    "for; resuming on %d", schedule_total_steps, self.requested_total_steps, schedule_total_steps)
        self.config.total_steps = schedule_total_steps

    def _explain_world_size_change(self, saved_world_size: int, saved_global_batch: int) -> None:
        """Say what a resume at another world size keeps and what it changes (rank 0, once)."""
        if not self.dist.is_main or (saved_world_size == self.dist.world_size
                                     and saved_global_batch == self.global_batch_size):
            return
        kept = "weights, optimizer moments, step and learning-rate schedule carry over"
        if saved_global_batch == self.global_batch_size:
            logger.warning("resuming a %d-rank run on %d ranks with the same global batch %d: %s, and so does the data "
                           "order (the same samples per step); only floating-point summation order changes",
                           saved_world_size, self.dist.world_size, saved_global_batch, kept)
            return
        per_rank = (saved_global_batch // self.dist.world_size if saved_global_batch % self.dist.world_size == 0
                    else None)
        hint = (f"; pass --batch-size {per_rank} to keep global batch {saved_global_batch} and the data order"
                if per_rank else "")
        logger.warning("resuming a run with global batch %d (%d ranks) at global batch %d (%d ranks x batch_size %d): "
                       "%s, but each step now averages over %d sequences and the data order from step %d on is that of "
                       "a global-batch-%d run (samples of the current epoch may be repeated or skipped)%s",
                       saved_global_batch, saved_world_size, self.global_batch_size, self.dist.world_size,
                       self.config.batch_size, kept, self.global_batch_size, self.step, self.global_batch_size, hint)

    def save_checkpoint(self) -> Path | None:
        """Rank 0 writes ``checkpoints/step_N.pt`` (every rank holds the same state) and deletes tandem's older
        ones past ``keep_checkpoints``; others return None."""
        if not self.dist.is_main:
            return None
        path = checkpoint.checkpoint_path(self.output_dir, self.step)
        checkpoint.save_training_state(self.state_dict(), path)
        checkpoint.rotate(path.parent, self.config.keep_checkpoints)
        return path

    def _check_fresh_output_dir(self) -> None:
        """A run from step 0 must not mix with an earlier run's checkpoints and metrics (a later
        ``--resume`` would pick the wrong checkpoint); refuse rather than delete anything."""
        old = checkpoint.latest_checkpoint(self.output_dir / checkpoint.CHECKPOINT_DIR)
        if old is not None and not self.config.resume:
            raise ValueError(f"{self.output_dir} already holds checkpoints of another run ({old.name}): pass --resume "
                             f"to continue it, or choose a new --output-dir")
        if self.dist.is_main:
            (self.output_dir / checkpoint.METRICS_FILE).unlink(missing_ok=True)

    def maybe_resume(self) -> bool:
        """With ``resume``: load the newest checkpoint that loads (rank 0 picks it, so no rank resumes from
        another step), after checking that it belongs to this run (``checkpoint.check_resume``)."""
        if not self.config.resume:
            return False
        directory = self.output_dir / checkpoint.CHECKPOINT_DIR
        step, state = checkpoint.load_newest_intact(directory, set_aside=True) if self.dist.is_main else (None, None)
        step = self.dist.broadcast_int(-1 if step is None else step)
        if step < 0:
            logger.warning("--resume: no checkpoint that loads under %s; starting from step 0", directory)
            return False
        path = checkpoint.checkpoint_path(self.output_dir, step)
        if state is None:
            if not path.is_file():
                raise FileNotFoundError(f"rank {self.dist.rank}: cannot read {path}, which rank 0 resumes from: put "
                                        f"--output-dir on a filesystem every node shares")
            state = checkpoint.load_training_state(path)
        # The target's facts are the target record's to check (in load_state_dict, --allow-target-mismatch);
        # this one checks the data, the vocabulary, the settings and the dtype (--allow-resume-mismatch).
        owned_by_record = identity.SAME_MODEL_FIELDS if "record" in state else ()
        checkpoint.check_resume(state.get("run"), self.run_identity(), self.config.allow_resume_mismatch, path,
                               skip_target_fields=owned_by_record)
        self._keep_checkpoint_vocab(state["draft"])
        self.load_state_dict(state)
        if self.dist.is_main:
            logger.info("resumed from %s at step %d", path, self.step)
            checkpoint.trim_metrics(self.output_dir / checkpoint.METRICS_FILE, self.step)
        return True

    def _keep_checkpoint_vocab(self, draft_state: dict) -> None:
        """A resumed draft's ``lm_head`` rows belong to the checkpoint's vocabulary: when that differs from the
        one built now (accepted with ``allow_resume_mismatch``), keep it and send it to the target."""
        d2t, t2d = draft_state.get("d2t"), draft_state.get("t2d")
        if d2t is None or t2d is None or (d2t.shape == self.vocab.d2t.shape and torch.equal(d2t, self.vocab.d2t)):
            return
        selected = d2t.long() + torch.arange(d2t.numel(), dtype=torch.long)
        self.vocab = DraftVocab(selected, t2d.bool())
        self.target.set_vocab_mapping(self.vocab.selected_token_ids, self.vocab.selected_token_mask)
        logger.warning("--resume: training on with the checkpoint's draft vocabulary, "
                       "not the one built from --data now")

    # --- the loop -----------------------------------------------------------------------------

    def micro_batch(self, index: int) -> dict[str, torch.Tensor]:
        """This rank's rows of the ``index``-th global micro-batch (epochs concatenated); a pure function of
        the config and the world size.

        A global micro-batch holds ``batch_size x world_size`` samples; rank r takes rows
        ``r*batch_size : (r+1)*batch_size``, padded to the longest sample of the whole global batch, so
        the ranks together see exactly the batches, and shapes, of one process at the global batch size.
        """
        size = self.global_batch_size
        per_epoch = len(self.dataset) // size  # the full batches of batch_order(..., drop_last=True)
        epoch, within = divmod(index, per_epoch)
        if epoch not in self._epoch_orders:
            self._epoch_orders = {epoch: batch_order(len(self.dataset), size, self.config.seed, epoch, drop_last=True,
                                                     lengths=self._sample_lengths)}
        samples = [self.dataset[i] for i in self._epoch_orders[epoch][within]]
        longest = max(len(sample["input_ids"]) for sample in samples)
        first = self.dist.rank * self.config.batch_size
        return dataclasses.replace(self.collate, pad_to=longest)(samples[first : first + self.config.batch_size])

    def train_step(self, batches: list[dict[str, torch.Tensor]], supervisions: list | None = None) -> dict:
        """One optimizer step over ``grad_accum_steps`` micro-batches; returns its metrics.

        ``supervisions``: futures of the batches' supervision, already requested (prefetch); else the
        target is asked here, synchronously.
        """
        lr = lr_at(self.step, self.config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        started = time.perf_counter()
        wait = 0.0
        results = []
        for k, batch in enumerate(batches):
            t0 = time.perf_counter()
            supervision = self.supervision_for(batch, supervisions[k] if supervisions is not None else None)
            wait += time.perf_counter() - t0
            normalizers = self._global_valid_counts(supervision)
            with self.dist.no_sync(self.objective, sync=k == len(batches) - 1):
                with self.autocast():
                    positions = self.draft_positions(batch)
                    result = self.objective(supervision, batch["attention_mask"], normalizers,
                                            *(() if positions is None else (positions,)))
                # Data parallel: the loss is this rank's share of the global mean, and DDP averages the
                # gradients over W ranks, so W x share backpropagates the global mean's gradient.
                (result.loss * self.dist.world_size / len(batches)).backward()
            results.append(result)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.draft.parameters(), self.config.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        elapsed = time.perf_counter() - started
        tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        self._count_throughput(tokens, elapsed, wait, synchronous=supervisions is None, requests=len(batches))
        return self._step_metrics(lr, results, grad_norm, tokens, elapsed, wait)

    def draft_positions(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The positions the engines give the draft for a batch: M-RoPE's ``[3, B, S]`` for a batch with images
        and a draft with ``mrope_section`` (a Qwen-VL target), else None (``0..S-1``: M-RoPE's for text)."""
        patches = batch_patches(batch)
        if patches is None or getattr(self.draft.config, "mrope_section", None) is None:
            return None
        return mrope_positions(batch["input_ids"], batch["attention_mask"], patches[1], self.images.image_token_id,
                               self.images.merge_size)

    def supervision_for(self, batch: dict[str, torch.Tensor], future=None) -> dict[str, torch.Tensor]:
        """A micro-batch's supervision: a prefetched ``future``'s, else from the supervision cache (asking the
        target for the samples it lacks), else the target's answer, asked now."""
        if future is not None:
            return future.result()
        if self.supervision_cache is not None:
            return self.supervision_cache.supervise(self.target, batch["input_ids"], batch["attention_mask"],
                                                    batch["loss_mask"], row_images(batch))
        with image_context(self.target, batch_patches(batch)):
            return self.target.supervise(batch["input_ids"], batch["attention_mask"], batch["loss_mask"])

    def fill_supervision_cache(self) -> tuple[int, int]:
        """Compute every sample's cache entry that is missing (this rank: samples r, r+W, ...); returns
        ``(already there, computed)``. What ``tandem cache-supervision`` runs."""
        if self.supervision_cache is None:
            raise ValueError("no supervision cache: pass --supervision-cache DIR")
        cache = self.supervision_cache
        indices = range(self.dist.rank, len(self.dataset), self.dist.world_size)
        bar = tqdm(indices, desc="cache-supervision", unit="sample",
                   disable=not (self.config.show_progress and self.dist.is_main), dynamic_ncols=True)
        for index in bar:
            sample = self.dataset[index]
            patches = self.images.patches(sample["images"]) if sample.get("images") else None
            cache.entry(self.target, sample["input_ids"], sample["loss_mask"], patches)
            bar.set_postfix(computed=cache.misses, reused=cache.hits, refresh=False)
        bar.close()
        logger.info("%s", cache.summary())
        return cache.hits, cache.misses

    def _global_valid_counts(self, supervision: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """``[K]`` positions each TTT step scores over the whole global micro-batch; None in one process."""
        if not self.dist.enabled:
            return None
        return self.dist.all_reduce_sum(step_valid_counts(supervision["position_mask"], self.config.ttt_steps))

    def _count_throughput(self, tokens: int, elapsed: float, wait: float, synchronous: bool, requests: int) -> None:
        totals = self.throughput
        totals.tokens, totals.step_s, totals.wait_s = (totals.tokens + tokens, totals.step_s + elapsed,
                                                       totals.wait_s + wait)
        if synchronous:  # a synchronous request's latency is the wait (prefetched ones are timed by the prefetcher)
            totals.latency_s, totals.requests = totals.latency_s + wait, totals.requests + requests

    def _step_metrics(self, lr: float, results: list, grad_norm: torch.Tensor, tokens: int, elapsed: float,
                      wait: float) -> dict:
        """The step's metrics row; data parallel: of the global batch (one all-reduce of a short vector)."""
        k = len(results[0].step_losses)  # TTT steps (EAGLE-3), block slots (DFlash)
        world = self.dist.world_size
        local = torch.cat([
            torch.tensor([float(r.loss.detach()) for r in results], dtype=torch.float64).mean().reshape(1),
            torch.stack([r.step_losses for r in results]).double().mean(0).cpu(),
            torch.stack([r.step_accuracies for r in results]).double().mean(0).cpu(),
            torch.tensor([sum(r.acceptance_length for r in results) / len(results), tokens, wait / elapsed],
                         dtype=torch.float64),
        ])
        # Losses and accuracies are per-rank shares of the global batch's (they add up); the simulated
        # acceptance length and the wait share are averaged over ranks. A host sync, once per step.
        total = self.dist.all_reduce_sum(local)
        acceptance, global_tokens, wait_share = total[1 + 2 * k :].tolist()
        return {
            "step": self.step, "lr": lr, "loss": total[0].item(), "step_accuracies": total[1 + k : 1 + 2 * k].tolist(),
            "step_losses": total[1 : 1 + k].tolist(), "sim_acceptance_length": acceptance / world,
            "grad_norm": float(grad_norm), "tokens": int(global_tokens), "tokens_per_s": global_tokens / elapsed,
            "supervision_wait_share": wait_share / world, "step_time_s": elapsed,
        }

    def train(self) -> dict:
        """Run to ``total_steps``; checkpoint every ``save_every`` and at the end; export the draft."""
        if not self.maybe_resume():
            self._check_fresh_output_dir()
        main = self.dist.is_main
        accum = self.config.grad_accum_steps
        end = min(self.config.total_steps, self.config.stop_at_step or self.config.total_steps)
        bar = tqdm(total=self.config.total_steps, initial=self.step, desc="train", unit="step",
                   disable=not (self.config.show_progress and main), dynamic_ncols=True)
        last: dict = {}
        prefetcher = None
        if hasattr(self.target, "supervise_async") and self.supervision_cache is None:
            prefetcher = SupervisionPrefetcher(self.target, self.micro_batch, self.config.prefetch_depth,
                                               stop=end * accum)
        evaluator = self.live_evaluator() if main and self.config.eval_every else None
        measured: dict = {}
        started = time.perf_counter()
        clock = TimeLimit(60 * self.config.time_limit_min, self.step) if self.config.time_limit_min > 0 else None
        with open(self.output_dir / checkpoint.METRICS_FILE, "a") if main else nullcontext() as metrics_file:
            while self.step < end:
                indices = range(self.step * accum, (self.step + 1) * accum)
                batches = [self.micro_batch(i) for i in indices]
                last = self.train_step(batches, prefetcher.take(indices) if prefetcher else None)
                if clock is not None and self.step < end:
                    end = self._keep_to_time(clock, last, end)
                    bar.total = self.config.total_steps
                if evaluator is not None and checkpoint.checkpoint_due(self.step, self.config.eval_every, end):
                    measured = self.evaluate(evaluator, last, time.perf_counter() - started)
                    last.update(measured)
                    if clock is not None:
                        clock.record_eval(measured["eval_s"])
                if metrics_file is not None:
                    metrics_file.write(json.dumps(last) + "\n")
                    metrics_file.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{last['loss']:.3f}", acc0=f"{last['step_accuracies'][0]:.2f}",
                                tok_s=f"{last['tokens_per_s']:.0f}",
                                **({"accept": f"{measured['eval_acceptance_length']:.2f}"} if measured else {}))
                if checkpoint.checkpoint_due(self.step, self.config.save_every, end):
                    self.save_checkpoint()
        bar.close()
        self._report_throughput(prefetcher)
        if self.supervision_cache is not None:
            logger.info("%s", self.supervision_cache.summary())
        if main:
            logger.info("exported the %s draft to %s", self.METHOD, self.export())
        return last

    def _keep_to_time(self, clock: TimeLimit, last: dict, end: int) -> int:
        """The step this run now ends at under ``time_limit_min`` (``time_limit.py``): the schedule shortened to the
        steps that fit at a few points of the run, and the run ended early if one more step does not fit. Rank 0
        decides; every rank follows."""
        evals_left = self._evals_left(end)
        if clock.replan_due(self.step, self.config.total_steps):
            rate = clock.seconds_a_step(self.step)
            fitted = clock.fitted_schedule(self.step, self.config.total_steps, self.requested_total_steps, evals_left)
            fitted = self.dist.broadcast_int(-1 if fitted is None else fitted)
            if fitted > 0:
                logger.warning("time limit %.1f min: the schedule now spans %d steps instead of %d (%.2f s a step "
                               "lately)", self.config.time_limit_min, fitted, self.config.total_steps, rate)
                self.config.total_steps = fitted
                end = min(fitted, self.config.stop_at_step or fitted)
        out_of_time = clock.out_of_time(last.get("step_time_s", 0.0), evals_left > 0)
        if self.step < end and self.dist.broadcast_int(int(out_of_time)):
            logger.warning("time limit %.1f min: stopping at step %d of %d (%.1f min trained)",
                           self.config.time_limit_min, self.step, self.config.total_steps, clock.elapsed_s() / 60)
            end = self.step
        return end

    def _evals_left(self, end: int) -> int:
        """Live evaluations still due after this step up to ``end`` (the one at ``end`` included)."""
        every = self.config.eval_every
        if not every:
            return 0
        return end // every - (self.step - 1) // every + (1 if end % every else 0)

    def live_evaluator(self):
        """A ``live_eval.LiveEvaluator`` over the first ``eval_limit`` prompts of ``eval_prompts``, decoding against
        this run's target (remote: through the server's ``/verify``)."""
        from tandem.speculative.decoding.live_eval import LiveEvaluator
        from tandem.speculative.training.data import PROMPT_SPLITS, default_prompt_path, prompt_ids

        spec = self.config.eval_prompts
        path = default_prompt_path(spec) if spec in PROMPT_SPLITS else Path(spec)
        records = read_chat_jsonl(path, limit=self.config.eval_limit)
        prompts = [prompt_ids(self.tokenizer, r.messages) for r in records]
        stop_ids = {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set()
        tree = self.config.eval_tree or None
        if tree and tree != "auto":
            tree = TreeShape.parse(tree)
        drafting = f"a {self.config.eval_tree} tree" if tree else f"up to {self.config.eval_draft_tokens} draft tokens"
        if tree == "auto":
            drafting = "the shape that pays most on this machine (auto)"
        logger.info("live evaluation: %d prompts of %s every %d steps and at the end, %d new tokens each, %s a round",
                    len(prompts), spec, self.config.eval_every, self.config.eval_max_new_tokens, drafting)
        return LiveEvaluator(self.target, prompts, self.config.eval_max_new_tokens, self.config.eval_draft_tokens,
                             self.config.eval_min_confidence, stop_ids, tree)

    def evaluate(self, evaluator, last: dict, run_s: float) -> dict:
        """Measure the current draft (``evaluator.measure``) without disturbing training: no gradients, the RNG
        state forked and restored, the draft back in training mode; logs the figures beside the simulated one."""
        with torch.random.fork_rng(devices=[]):
            measured = evaluator.measure(self.draft)
        logger.info("step %d: measured acceptance %.2f on %d prompts (simulated on the batch: %.2f), step-0 accuracy "
                    "%.2f, outputs equal greedy%s; took %.1f s (%.0f %% of the run so far)", self.step,
                    measured["eval_acceptance_length"], measured["eval_prompts"], last["sim_acceptance_length"],
                    measured["eval_step0_accuracy"],
                    "" if measured["eval_outputs_match"] else " NOT (beyond near-ties)",
                    measured["eval_s"], 100 * measured["eval_s"] / max(run_s, 1e-9))
        return measured

    @property
    def export_dir(self) -> Path:
        """Where ``export()`` writes the draft by default."""
        return self.output_dir / draft_export.EXPORT_DIRNAME

    def export(self, out_dir: str | Path | None = None) -> Path:
        """Write the draft for serving engines (``output_dir/eagle3-draft`` by default; see ``export/eagle3.py``)
        in ``export_format``, in ``export_dtype`` or else the dtype of the target's checkpoint (a bf16 checkpoint gets
        a bf16 draft, whatever dtype this run computed in), or the dtype the target ran in when that is unknown."""
        dtype = (self.config.export_dtype or self.target_identity.get("checkpoint_dtype")
                 or getattr(self.target, "dtype", None) or torch.float32)
        return draft_export.export_draft(
            self.draft, out_dir or self.export_dir, parse_dtype(dtype),
            self.model_info["aux_layer_ids"], export_format=self.config.export_format, record=self.record,
            verifier=self.target_identity.get("name") or self.config.tokenizer or self.config.target,
            verifier_architectures=self.target_identity.get("architectures"), speculative_tokens=self.config.ttt_steps,
        )

    def _report_throughput(self, prefetcher: SupervisionPrefetcher | None) -> None:
        """Each rank logs its speed and supervision wait; rank 0 adds the aggregate: target- or trainer-bound."""
        if prefetcher is not None:
            self.throughput.latency_s, self.throughput.requests = prefetcher.latency_s, prefetcher.answered
        logger.info("%s", self.throughput.line(self.dist.rank))
        rows = self.dist.gather_rows(self.throughput.as_tensor())  # a host sync, once per run
        if self.dist.is_main:
            if self.config.target_urls:
                servers = servers_in_use(self.config.target_urls, self.dist.world_size)
            else:
                servers = len(getattr(self.target, "urls", []))
            logger.info("%s", throughput_summary(rows, servers))


def train(config: TrainConfig, target=None, tokenizer=None, target_factory=None, trainer_class=None) -> Trainer:
    """Build a ``Trainer`` (or ``trainer_class``, the one ``methods.trainer_class_for(config.method)`` names) and run
    it; returns the trainer (its draft, metrics file, checkpoints).

    Under torchrun (``WORLD_SIZE`` > 1) this joins the job's process group first and leaves it at the end.
    """
    trainer_class = trainer_class or Trainer
    if trainer_class.METHOD != config.method:
        raise ValueError(f"a {config.method} run needs its own trainer (methods.trainer_class_for({config.method!r})), "
                         f"not {trainer_class.__name__}")
    if target is None and target_factory is None:
        # The entry point's convenience: the CLI's own factory (in-process or remote, from the config).
        # Imported here, not at the top, so that importing the trainer never loads the remote package.
        from tandem.speculative.training.target_factory import build_target as target_factory
    distributed = init_distributed()
    try:
        trainer = trainer_class(config, target=target, tokenizer=tokenizer, distributed=distributed,
                                target_factory=target_factory)
        try:
            trainer.train()
        finally:
            if target is None and config.target_urls:
                trainer.target.close()  # ends this client's session; the servers keep serving
    finally:
        distributed.close()
    return trainer
