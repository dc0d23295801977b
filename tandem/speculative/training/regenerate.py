"""Regeneration: rewrite a conversation's assistant turns with the target's own greedy answers.

A draft learns to predict the *target's* next token, so it should train on text the target itself would
write (EAGLE, HASS and SpecForge all regenerate). ``tandem regenerate`` runs :func:`regenerate_file`.
Conversations are generated in batches on a growing KV cache (``generation_cache.py``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Sequence

import torch

from tandem.speculative.training import generation_cache
from tandem.speculative.training.data import (
    ChatRecord,
    DataFormatError,
    Message,
    end_of_turn_token_ids,
    pad_token_id_for,
    read_chat_jsonl,
    render_ids,
    write_jsonl,
)

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Regeneration: rewrite assistant turns with the target's own greedy answers
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _GenerationJob:
    """One assistant turn to generate: conversation ``record``, turn index ``turn``, prompt token ids."""

    record: int
    turn: int
    prompt_ids: list[int]


def _turns_to_generate(messages: list[Message]) -> list[int]:
    """Indices of the assistant turns to (re)write; a conversation ending in a prompt gets one appended."""
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if messages and messages[-1]["role"] != "assistant":
        turns.append(len(messages))
    return turns


def _left_pad(prompts: Sequence[list[int]], pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompts to `[B, P]` int64 ``input_ids`` and ``attention_mask`` (generation appends on the right)."""
    length = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, length - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, length - len(prompt) :] = 1
    return input_ids.to(device), attention_mask.to(device)


@torch.inference_mode()
def _generate_batch(model, jobs: Sequence[_GenerationJob], pad_token_id: int, stop_ids: set[int],
                    max_new_tokens: int) -> list[list[int]]:
    """Greedy answers for a batch of prompts, one list of new token ids per job (stop token excluded).

    A plain KV-cached loop rather than ``model.generate``: a row that has stopped leaves the batch (its
    cache rows are dropped), so the long answers of a batch do not drag the finished ones along, and no
    step pays for generation's per-step machinery (docs/training.md, "Regenerating the answers with the
    target"). Positions count real tokens only (left padding). The cache appends in place
    (``generation_cache.growing_cache``), and the greedy pick is ``max().indices``: the same first-maximum
    rule as ``argmax``, which is much slower on bf16 rows on CPU.
    """

    device = next(model.parameters()).device
    input_ids, attention_mask = _left_pad([job.prompt_ids for job in jobs], pad_token_id, device)
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    cache = generation_cache.growing_cache()
    # The last position's logits only, picked by index (a contiguous [B, 1, H] copy): with ``logits_to_keep=1``
    # the head multiplies a strided slice, which torch runs as a batched matmul on B copies of the [V, H] head
    # (measured: 8.5 of a 10 s prefill of 64 x 58 tokens, SmolLM2-135M).
    last = torch.tensor([input_ids.shape[1] - 1], device=device)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, past_key_values=cache,
                   use_cache=True, logits_to_keep=last).logits[:, -1]
    answers: list[list[int]] = [[] for _ in jobs]
    rows = list(range(len(jobs)))  # the jobs still generating, in batch order
    while True:
        next_ids = logits.max(-1).indices
        keep = []
        for position, (row, token) in enumerate(zip(rows, next_ids.tolist())):
            if token in stop_ids:
                continue
            answers[row].append(token)
            if len(answers[row]) < max_new_tokens:
                keep.append(position)
        if not keep:
            return answers
        if len(keep) < len(rows):
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            attention_mask, positions, next_ids = attention_mask[index], positions[index], next_ids[index]
            rows = [rows[i] for i in keep]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(rows), 1)], dim=1)
        positions = positions[:, -1:] + 1
        logits = model(input_ids=next_ids.unsqueeze(1), attention_mask=attention_mask, position_ids=positions,
                       past_key_values=cache, use_cache=True).logits[:, -1]


def _run_round(model, tokenizer, jobs: list[_GenerationJob], batch_size: int, max_new_tokens: int,
               progress) -> list[str]:
    """Generate every job (sorted by prompt length so a batch pads little); answers in job order."""
    pad_token_id = pad_token_id_for(tokenizer)
    stop_ids = end_of_turn_token_ids(tokenizer)
    order = sorted(range(len(jobs)), key=lambda i: len(jobs[i].prompt_ids))
    answers: list[str] = [""] * len(jobs)
    for begin in range(0, len(order), batch_size):
        chunk = order[begin : begin + batch_size]
        generated = _generate_batch(model, [jobs[i] for i in chunk], pad_token_id, stop_ids, max_new_tokens)
        for job_index, token_ids in zip(chunk, generated):
            answers[job_index] = tokenizer.decode(token_ids, skip_special_tokens=True).strip()
        progress.add(len(chunk), sum(len(t) for t in generated))
    return answers


class _Progress:
    """A tqdm bar over assistant turns whose postfix shows tokens generated and tokens/s."""

    def __init__(self, total_turns: int, enabled: bool):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total_turns, unit="turn", desc="regenerate", disable=not enabled)
        self.tokens = 0
        self.started = time.perf_counter()

    def add(self, turns: int, tokens: int) -> None:
        self.tokens += tokens
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        self.bar.set_postfix(tokens=self.tokens, tok_per_s=f"{self.tokens / elapsed:.1f}", refresh=False)
        self.bar.update(turns)

    def close(self) -> None:
        self.bar.close()


def _decode_friendly_attention(model) -> str | None:
    """Switch a CPU model to :mod:`generation_cache`'s grouped-query attention for batched one-token decoding
    steps; returns the implementation to restore (None: nothing changed). PyTorch's fused CPU attention kernel
    is slow on a one-token query over a short cache, and eager attention copies the whole cache to repeat its
    key/value heads; the grouped form does neither."""

    current = getattr(model.config, "_attn_implementation", None)
    device = next(model.parameters()).device
    if device.type != "cpu" or current not in ("sdpa", "eager") or not hasattr(model, "set_attn_implementation"):
        return None
    model.set_attn_implementation(generation_cache.register())
    return current


def _copy_record(record: ChatRecord | Sequence[Message]) -> ChatRecord:
    if isinstance(record, ChatRecord):
        return ChatRecord([dict(m) for m in record.messages], dict(record.extra), list(record.images))
    return ChatRecord([dict(m) for m in record])


def regenerate(
    model,
    tokenizer,
    records: Sequence[ChatRecord | Sequence[Message]],
    max_new_tokens: int = 256,
    batch_size: int = 16,
    show_progress: bool = True,
) -> list[ChatRecord]:
    """Rewrite every assistant turn with the target's own greedy answer (EAGLE practice).

    For each conversation, assistant turns are generated in order, each from the conversation so far
    with the earlier turns already regenerated; a conversation that ends with a user (or system)
    turn gets a final assistant turn appended. Round ``r`` generates the ``r``-th turn of every
    conversation that has one, in LEFT-padded batches of ``batch_size`` sorted by prompt length;
    answers stop at eos or an end-of-turn token (``<|im_end|>``) or after ``max_new_tokens``.

    Returns new :class:`ChatRecord` s in the input order (inputs are not modified), ``extra`` kept.
    """
    conversations = [_copy_record(record) for record in records]
    pending = [_turns_to_generate(c.messages) for c in conversations]
    progress = _Progress(sum(len(p) for p in pending), show_progress)
    model_was_training = model.training
    model.eval()
    attention = _decode_friendly_attention(model)
    try:
        for round_index in range(max((len(p) for p in pending), default=0)):
            jobs = []
            for record_index, turns in enumerate(pending):
                if round_index < len(turns):
                    turn = turns[round_index]
                    prompt = conversations[record_index].messages[:turn]
                    jobs.append(_GenerationJob(record_index, turn,
                                               render_ids(tokenizer, prompt, add_generation_prompt=True)))
            answers = _run_round(model, tokenizer, jobs, batch_size, max_new_tokens, progress)
            for job, answer in zip(jobs, answers):
                messages = conversations[job.record].messages
                if job.turn == len(messages):
                    messages.append({"role": "assistant", "content": answer})
                else:
                    messages[job.turn] = {"role": "assistant", "content": answer}
    finally:
        progress.close()
        model.train(model_was_training)
        if attention is not None:
            model.set_attn_implementation(attention)
    logger.info("regenerated %d assistant turns, %d tokens", progress.bar.n, progress.tokens)
    return conversations


def regenerate_file(
    model,
    tokenizer,
    in_path: str | Path,
    out_path: str | Path,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    limit: int | None = None,
) -> int:
    """Read chat JSONL (either format), regenerate its assistant turns, write messages JSONL.

    ``limit`` keeps only the first that many conversations. Returns the number written.
    """
    records = read_chat_jsonl(in_path, limit=limit)
    with_images = next((r for r in records if r.images), None)
    if with_images is not None:  # the answers would be written without seeing the image: not the target's own
        raise DataFormatError(f"{with_images.source}: regenerating conversations with images is not supported yet "
                              f"(train on their answers as they are)")
    logger.info("regenerating %d conversations from %s", len(records), in_path)
    regenerated = regenerate(model, tokenizer, records, max_new_tokens=max_new_tokens, batch_size=batch_size)
    count = write_jsonl(out_path, regenerated)
    logger.info("wrote %d conversations to %s", count, out_path)
    return count
