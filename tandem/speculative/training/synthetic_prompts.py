"""Prompts the target writes itself: more distinct training conversations than a prompt set holds.

A short draft-training run memorises its conversations (step-0 accuracy 0.73 on them against 0.36 on new ones
after the demo's 4.5 minutes), so distinct prompts are worth more than more passes. An instruction-tuned target
asked to continue its chat template right after the user turn's opening writes a plausible user message (the
Magpie method, Xu et al. 2024): sampled, each is another prompt, in the target's own notion of what users ask.

:func:`synthesize_prompts` renders the template around a placeholder, keeps what precedes it (the system prompt
and the user turn's opening), samples continuations in batches until the end of the turn, and keeps those that
are new, long enough and not cut off. Their answers are then regenerated greedily like any prompt's.
"""

from __future__ import annotations

import logging

import torch

from tandem.speculative.training import generation_cache
from tandem.speculative.training.data import ChatRecord, end_of_turn_token_ids

logger = logging.getLogger(__name__)

_PLACEHOLDER = "\x00PROMPT\x00"


def user_turn_prefix(tokenizer) -> list[int]:
    """Token ids of the chat template up to where a user's first message begins (system prompt included)."""
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": _PLACEHOLDER}], tokenize=False)
    prefix = rendered.split(_PLACEHOLDER)[0]
    if prefix == rendered:
        raise ValueError("the tokenizer's chat template does not render the user message verbatim")
    return tokenizer(prefix, add_special_tokens=False)["input_ids"]


@torch.inference_mode()
def _sample_batch(model, prefix: list[int], rows: int, max_tokens: int, stop_ids: set[int], temperature: float,
                  top_p: float, generator: torch.Generator) -> list[list[int] | None]:
    """``rows`` sampled continuations of ``prefix``; None for one that did not end its turn in ``max_tokens``."""
    device = next(model.parameters()).device
    ids = torch.tensor([prefix] * rows, device=device)
    cache = generation_cache.growing_cache()
    logits = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    out: list[list[int]] = [[] for _ in range(rows)]
    done: list[bool] = [False] * rows
    for _ in range(max_tokens):
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Nucleus: keep the smallest set of tokens whose mass reaches top_p (the first token always).
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        picked = order.gather(-1, torch.multinomial(sorted_probs.cpu(), 1, generator=generator).to(device))
        for row, token in enumerate(picked.view(-1).tolist()):
            if done[row]:
                continue
            if token in stop_ids:
                done[row] = True
            else:
                out[row].append(token)
        if all(done):
            break
        logits = model(input_ids=picked, past_key_values=cache, use_cache=True).logits[:, -1]
    return [tokens if finished else None for tokens, finished in zip(out, done)]


def synthesize_prompts(model, tokenizer, count: int, *, existing: set[str] = frozenset(), batch_size: int = 64,
                       max_tokens: int = 48, min_chars: int = 12, temperature: float = 1.0, top_p: float = 0.95,
                       seed: int = 0, max_batches: int | None = None) -> list[ChatRecord]:
    """Up to ``count`` new single-turn prompts written by ``model``, each a ``ChatRecord`` with one user message.

    A sample is kept when it ended its turn within ``max_tokens``, has at least ``min_chars`` characters, and its
    text (case and spacing folded) is in neither ``existing`` nor the prompts kept so far. Sampling stops after
    ``max_batches`` batches (default: enough for ``count`` at a quarter kept) even if fewer were found.
    """
    prefix = user_turn_prefix(tokenizer)
    stop_ids = end_of_turn_token_ids(tokenizer)  # eos included
    seen = {" ".join(text.lower().split()) for text in existing}
    generator = torch.Generator().manual_seed(seed)
    kept: list[ChatRecord] = []
    batches = max_batches or max(4 * count // batch_size + 1, 1)
    was_training = model.training
    model.eval()
    try:
        for _ in range(batches):
            for tokens in _sample_batch(model, prefix, batch_size, max_tokens, stop_ids, temperature, top_p,
                                        generator):
                text = tokenizer.decode(tokens, skip_special_tokens=True).strip() if tokens else ""
                key = " ".join(text.lower().split())
                if len(text) >= min_chars and key not in seen:
                    seen.add(key)
                    kept.append(ChatRecord([{"role": "user", "content": text}], {"category": "synthetic"}))
            if len(kept) >= count:
                break
    finally:
        model.train(was_training)
    logger.info("the target wrote %d new prompts", min(len(kept), count))
    return kept[:count]
