"""The DFlash training run: ``Trainer``'s loop, checkpoints, resume and data parallelism, with a DFlash draft.

    tandem train --method dflash --data chat.jsonl --output-dir runs/dflash --block-size 16 --draft-layers 5

What differs from EAGLE-3, phase by phase: the target captures the DFlash layers (``CaptureSpec``) and answers
in the compact encoding (its final hidden state: the loss needs the target's logits only at the scored slots,
and the draft holds the target's head); the vocabulary is the target's whole one (the draft proposes through the
target's head); the draft is ``DFlashDraftModel``, its objective ``DFlashObjective``; each micro-batch's anchors
are drawn from a generator seeded by the run's seed, the step and the sample (``anchor_seed``), so a resumed or
data-parallel run draws what one uninterrupted process does; the export is the DFlash directory.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from tandem.speculative.drafts.dflash import DFlashDraftConfig, DFlashDraftModel, choose_mask_token
from tandem.speculative.export.dflash import DFLASH_EXPORT_DIRNAME, export_dflash_draft
from tandem.speculative.export.engine_conventions import parse_dtype
from tandem.speculative.target.compact import COMPACT_SUPERVISION_KEYS
from tandem.speculative.training.dflash_loss import (
    DFlashObjective,
    anchor_seed,
    default_gamma,
    sample_anchors,
    weight_sum,
)
from tandem.speculative.training.image_patches import batch_patches, image_context, row_images
from tandem.speculative.training.supervision_cache import SupervisionCache, cache_identity
from tandem.speculative.training.trainer import Trainer
from tandem.speculative.training.vocab import DraftVocab, count_tokens, file_digest

logger = logging.getLogger(__name__)


class DFlashTrainer(Trainer):
    """``Trainer`` for a DFlash draft (see the module docstring); ``config.method`` must be ``dflash``."""

    METHOD = "dflash"
    FROZEN_DRAFT_KEYS = DFlashDraftModel.FROZEN

    @property
    def gamma(self) -> float:
        return self.config.dflash_gamma or default_gamma(self.config.block_size)

    def _build_vocab(self) -> None:
        """The target's whole vocabulary, sent as the session's mapping (the server answers no session without one)."""
        vocab_size = self.model_info["vocab_size"]
        self.data_digest = file_digest(self.config.data)
        self.vocab = DraftVocab(torch.arange(vocab_size), torch.ones(vocab_size, dtype=torch.bool))
        self.target.set_vocab_mapping(self.vocab.selected_token_ids, self.vocab.selected_token_mask)
        self.supervision_cache = None
        if self.config.supervision_cache:
            cached_for = cache_identity(self.target, self.vocab.selected_token_ids, self.target_identity)
            self.supervision_cache = SupervisionCache(self.config.supervision_cache, cached_for)
            if self.dist.is_main:
                logger.info("supervision cache: %s", self.supervision_cache.directory)

    def _mask_token(self) -> int:
        """``--mask-token-id``, else ``choose_mask_token`` (the data's token counts only when the tokenizer leaves
        no row free: a collective every rank takes alike)."""
        if self.config.mask_token_id is not None:
            return int(self.config.mask_token_id)
        vocab_size = self.model_info["vocab_size"]
        counts = None
        if getattr(self.tokenizer, "mask_token_id", None) is None and len(self.tokenizer) >= vocab_size:
            shard = (self.dataset[i] for i in range(self.dist.rank, len(self.dataset), self.dist.world_size))
            every = ((s["input_ids"], torch.ones_like(s["input_ids"])) for s in shard)  # all tokens, not only trained
            counts = self.dist.all_reduce_sum(count_tokens(every, vocab_size))
        return choose_mask_token(self.tokenizer, vocab_size, counts)

    def _build_draft(self) -> None:
        torch.manual_seed(self.config.seed)
        config = DFlashDraftConfig.from_target_config(
            self._target_config(), num_hidden_layers=self.config.draft_layers, block_size=self.config.block_size,
            target_layer_ids=self.model_info["aux_layer_ids"], mask_token_id=self._mask_token())
        self.draft = DFlashDraftModel(config)
        self.draft.set_target_weights(self.target.get_input_embeddings().cpu(), self.target.draft_lm_head().cpu())
        self.draft.to(self.dist.device).train()
        self.objective = self.dist.wrap(DFlashObjective(self.draft, config.block_size, self.gamma,
                                                        self.config.dflash_loss))
        self.compute_dtype = self.target.dtype if self.config.mixed_precision else torch.float32
        if self.dist.is_main:
            logger.info("DFlash draft: %d layers, block %d, target layers %s, mask token %d, loss %s (gamma %.1f), "
                        "%s compute", config.num_hidden_layers, config.block_size, config.target_layer_ids,
                        config.mask_token_id, self.config.dflash_loss, self.gamma,
                        str(self.compute_dtype).removeprefix("torch."))

    @property
    def record(self) -> dict:
        return {**super().record, "draft_method": "dflash"}

    def supervision_for(self, batch: dict[str, torch.Tensor], future=None) -> dict[str, torch.Tensor]:
        """The compact supervision (prefetched, cached or asked now) with the batch's own tokens and the anchors."""
        if future is not None:
            answer = future.result()
        elif self.supervision_cache is not None:
            answer = self.supervision_cache.supervise_compact(self.target, batch["input_ids"], batch["attention_mask"],
                                                              batch["loss_mask"], row_images(batch))
        else:
            with image_context(self.target, batch_patches(batch)):
                answer = self.target.supervise_compact(batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
        missing = [k for k in COMPACT_SUPERVISION_KEYS if k not in answer]
        if missing:
            raise ValueError(f"DFlash training needs the target's compact answer; it lacks {missing} (a target whose "
                             f"logits are not a linear map of its final hidden state cannot train DFlash here)")
        device = self.dist.device
        tokens, trained = batch["input_ids"].to(device), batch["loss_mask"].to(device)
        lengths = batch["attention_mask"].sum(1).tolist()
        seeds = [anchor_seed(self.config.seed, self.step, batch["input_ids"][b, :n]) for b, n in enumerate(lengths)]
        anchors, valid = sample_anchors(trained, lengths, self.config.num_anchors, seeds)
        return {**{k: answer[k].to(device) for k in COMPACT_SUPERVISION_KEYS}, "tokens": tokens, "trained": trained,
                "attention_mask": batch["attention_mask"].to(device), "anchors": anchors, "anchor_valid": valid}

    def _global_valid_counts(self, supervision: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The global micro-batch's slot-weight sum (the loss's normaliser under data parallelism); None in one
        process."""
        if not self.dist.enabled:
            return None
        local = weight_sum(supervision, supervision["attention_mask"], self.config.block_size, self.gamma)
        return self.dist.all_reduce_sum(local.reshape(1))[0]

    def live_evaluator(self):
        """A ``DFlashLiveEvaluator`` over the first ``eval_limit`` prompts of ``eval_prompts`` at the trained block,
        decoding against this run's target (remote: through the server's ``/verify``)."""
        from tandem.speculative.decoding.dflash_live_eval import DFlashLiveEvaluator
        from tandem.speculative.training.data import PROMPT_SPLITS, default_prompt_path, prompt_ids, read_chat_jsonl

        spec = self.config.eval_prompts
        path = default_prompt_path(spec) if spec in PROMPT_SPLITS else Path(spec)
        prompts = [prompt_ids(self.tokenizer, r.messages) for r in read_chat_jsonl(path, limit=self.config.eval_limit)]
        stop_ids = {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set()
        logger.info("live evaluation: %d prompts of %s every %d steps and at the end, %d new tokens each, DFlash "
                    "blocks of %d", len(prompts), spec, self.config.eval_every, self.config.eval_max_new_tokens,
                    self.config.block_size)
        return DFlashLiveEvaluator(self.target, prompts, self.config.eval_max_new_tokens, self.config.block_size,
                                   stop_ids)

    def evaluate(self, evaluator, last: dict, run_s: float) -> dict:
        """``Trainer.evaluate`` for DFlash: the measurement with the RNG state forked and restored, and its log line."""
        with torch.random.fork_rng(devices=[]):
            measured = evaluator.measure(self.draft)
        logger.info("step %d: measured acceptance %.2f on %d prompts at block %d (simulated on the batch: %.2f), "
                    "outputs equal greedy%s; took %.1f s (%.0f %% of the run so far)", self.step,
                    measured["eval_acceptance_length"], measured["eval_prompts"], measured["eval_block_size"],
                    last["sim_acceptance_length"], "" if measured["eval_outputs_match"] else " NOT (beyond near-ties)",
                    measured["eval_s"], 100 * measured["eval_s"] / max(run_s, 1e-9))
        return measured

    @property
    def export_dir(self) -> Path:
        return self.output_dir / DFLASH_EXPORT_DIRNAME

    def export(self, out_dir: str | Path | None = None) -> Path:
        """Write the DFlash draft (``output_dir/dflash-draft``): ``sglang`` -> the native format both engines load."""
        dtype = self.config.export_dtype or getattr(self.target, "dtype", None) or torch.float32
        export_format = "speculators" if self.config.export_format == "speculators" else "native"
        return export_dflash_draft(
            self.draft, out_dir or self.export_dir, parse_dtype(dtype),
            export_format=export_format, record=self.record,
            verifier=self.target_identity.get("name") or self.config.tokenizer or self.config.target,
            verifier_architectures=self.target_identity.get("architectures"))
