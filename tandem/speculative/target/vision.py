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


def image_token_types(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """``mm_token_type_ids [B, S]`` int of ``input_ids [B, S]``: 1 on image tokens, 0 on text (what a Qwen-VL
    processor returns beside the ids, and what transformers needs to build the M-RoPE positions)."""
    return (input_ids == image_token_id).int()


def forget_rope_deltas(model) -> None:
    """Drop the M-RoPE offset a Qwen-VL model keeps after a forward with images (``model.model.rope_deltas``): a
    later cached forward, a text decode, would otherwise add that image's offset (of another batch) to its
    positions."""
    inner = getattr(model, "model", None)
    if getattr(inner, "rope_deltas", None) is not None:
        inner.rope_deltas = None


def mrope_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor, image_grid_thw: torch.Tensor | None,
                    image_token_id: int, merge_size: int) -> torch.Tensor:
    """M-RoPE's 3-D positions ``[3, B, S]`` long (temporal, height, width) of a batch with images, as Qwen2-VL and
    Qwen2.5-VL compute them (transformers' ``get_rope_index``, the engines' ``mrope_positions``): a text token's
    three are its index among the row's real tokens, shifted back by what the images before it saved; an
    image's run of tokens gets ``start + (t, h, w)`` over its merged ``t x h/m x w/m`` grid, and the text after
    it starts at ``start + max(h, w)/m``. Padding positions are 0.

    Arguments:
        input_ids: ``[B, S]`` long, right-padded, each image one run of ``image_token_id``.
        attention_mask: ``[B, S]`` 1 on real tokens.
        image_grid_thw: ``[I, 3]`` long, the batch's images row by row (None or empty: no image).
        image_token_id, merge_size: the target's image token and spatial merge size.
    """
    batch, seq = input_ids.shape
    positions = torch.zeros(3, batch, seq, dtype=torch.long)
    grids = iter([] if image_grid_thw is None else image_grid_thw.tolist())
    for row in range(batch):
        real = attention_mask[row].bool().cpu()
        ids = input_ids[row].cpu()[real].tolist()
        out, index, start = [], 0, 0
        while index < len(ids):
            if ids[index] != image_token_id:
                out.append(torch.full((3,), start, dtype=torch.long))
                index, start = index + 1, start + 1
                continue
            t, h, w = next(grids)
            h, w = h // merge_size, w // merge_size
            grid = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"))
            out.extend((grid.reshape(3, -1) + start).T)
            index, start = index + t * h * w, start + max(h, w)  # an image is t=1: HF advances by max(h, w)
        if out:
            positions[:, row, real] = torch.stack(out).T
    return positions.to(input_ids.device)
