"""Vision-language targets (Qwen2.5-VL): the draft reads the language model's states, and never learns an image.

A vision-language target's language model reads text tokens and, in place of each image placeholder token, one
embedding a merged patch from its vision tower. The draft captures the language model's aux states at every
position (an image's positions are context it attends to) and is trained on none of an image's positions: the
loss mask is zero on every vision token whatever the data says (``mask_vision_tokens``). Images enter a forward
as the image processor's patches, ``pixel_values [P, C*T*p*p]`` float and ``image_grid_thw [I, 3]`` long, given to
the forwards inside ``Eagle3TargetModel.with_images``; a conversation's text holds one placeholder an image,
expanded here to the positions its patches take (``tokenize_image_conversation``).
"""

from __future__ import annotations

from typing import Sequence

import torch

VISION_TOKEN_FIELDS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
"""The config fields naming a vision-language model's special tokens (Qwen2-VL, Qwen2.5-VL, Qwen3-VL)."""


def vision_token_ids(config) -> list[int]:
    """The vision special tokens of a target's (top-level) config; empty for a text-only target."""
    return [int(getattr(config, f)) for f in VISION_TOKEN_FIELDS if getattr(config, f, None) is not None]


def mask_vision_tokens(loss_mask: torch.Tensor, input_ids: torch.Tensor, token_ids: Sequence[int]) -> torch.Tensor:
    """``loss_mask [B, S]`` with every position whose ``input_ids [B, S]`` long is a vision token set to 0."""
    if not token_ids:
        return loss_mask
    vision = torch.isin(input_ids, torch.tensor(list(token_ids), device=input_ids.device))
    return loss_mask.masked_fill(vision, 0)


def image_positions(image_grid_thw: torch.Tensor, merge_size: int) -> list[int]:
    """Positions each image takes in the language model: ``t * h * w / merge_size**2`` for ``[I, 3]`` long."""
    return [int(t * h * w) // merge_size**2 for t, h, w in image_grid_thw.tolist()]


def expand_image_tokens(input_ids: torch.Tensor, loss_mask: torch.Tensor, image_token_id: int,
                        counts: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image placeholder in ``input_ids [S]`` long repeated to its ``counts[i]`` positions (loss 0 there).

    Returns ``(input_ids [S'], loss_mask [S'])``; a ValueError when the placeholders and ``counts`` disagree."""
    places = (input_ids == image_token_id).nonzero().flatten().tolist()
    if len(places) != len(counts):
        raise ValueError(f"the conversation has {len(places)} image placeholders for {len(counts)} images")
    ids, mask, start = [], [], 0
    for place, count in zip(places, counts):
        ids += [input_ids[start:place], torch.full((count,), image_token_id, dtype=input_ids.dtype)]
        mask += [loss_mask[start:place], torch.zeros(count, dtype=loss_mask.dtype)]
        start = place + 1
    return torch.cat(ids + [input_ids[start:]]), torch.cat(mask + [loss_mask[start:]])


def tokenize_image_conversation(tokenizer, messages, image_grid_thw: torch.Tensor, image_token_id: int,
                                merge_size: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids [S] long, loss_mask [S] long)`` of a conversation whose text holds one image placeholder token
    an image (``<|image_pad|>`` for Qwen2.5-VL), expanded to the positions of ``image_grid_thw [I, 3]``; the loss
    mask is ``data.tokenize_conversation``'s (assistant turns), zero on every image position. Not truncated: an
    image cut in half would not match its patches."""
    from tandem.speculative.training.data import assistant_spans

    ids, spans = assistant_spans(tokenizer, messages)
    loss_mask = torch.zeros(len(ids), dtype=torch.long)
    for start, end in spans:
        loss_mask[start:end] = 1
    return expand_image_tokens(torch.tensor(ids, dtype=torch.long), loss_mask, image_token_id,
                               image_positions(image_grid_thw, merge_size))
