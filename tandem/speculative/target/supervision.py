"""The draft's supervision from one target forward: one code path for the local and the remote target.

The remote server calls ``compute_supervision`` exactly as the in-process trainer does, which is why a
remote run is bit-identical to a local one.
"""

from __future__ import annotations

import torch

# The order is also the process-group data plane's send order.
SUPERVISION_KEYS = ["aux_hidden_states", "target_probs", "position_mask", "input_ids", "loss_mask"]


def shift_left(tensor: torch.Tensor) -> torch.Tensor:
    """``out[:, i] = tensor[:, i + 1]`` and ``out[:, -1] = 0`` (dim 1 is the sequence)."""
    tail = torch.zeros_like(tensor[:, :1])
    return torch.cat([tensor[:, 1:], tail], dim=1)


def compute_target_distribution(
    logits: torch.Tensor,
    selected_token_ids: torch.Tensor,
    selected_token_mask: torch.Tensor,
    loss_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Project shifted target logits onto the draft vocabulary.

    Arguments:
        logits: ``[B, S, V]`` shifted target logits, any float dtype.
        selected_token_ids: ``[Vd]`` long, draft id -> target id.
        selected_token_mask: ``[V]`` bool, True for target ids in the draft vocabulary.
        loss_mask: ``[B, S]`` shifted loss mask (any dtype; nonzero = trained).

    Returns:
        target_probs: ``[B, S, Vd]`` fp32, softmax over the draft-vocabulary logits.
        position_mask: ``[B, S, 1]`` bool, True where the target's full-vocabulary argmax is in the
            draft vocabulary and the position is trained; the draft is only scored there.
    """
    position_mask = draft_position_mask(logits, selected_token_mask, loss_mask)
    target_probs = torch.softmax(logits[..., selected_token_ids].float(), dim=-1)
    return target_probs, position_mask


def draft_position_mask(logits: torch.Tensor, selected_token_mask: torch.Tensor,
                        loss_mask: torch.Tensor) -> torch.Tensor:
    """``[B, S, 1]`` bool: the target's full-vocabulary argmax lies in the draft vocabulary and the
    position is trained. ``logits [B, S, V]``, ``selected_token_mask [V]`` bool, ``loss_mask [B, S]``."""
    top = logits.argmax(dim=-1)
    return (selected_token_mask[top] & loss_mask.bool()).unsqueeze(-1)


def generate(target_wrapper, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor,
             layer_ids: list[int] | None = None):
    """``target_wrapper.generate_batch`` capturing ``layer_ids`` (not passed when None: a wrapper that captures one
    fixed set needs no such argument)."""
    if layer_ids is None:
        return target_wrapper.generate_batch(input_ids, attention_mask, loss_mask)
    return target_wrapper.generate_batch(input_ids, attention_mask, loss_mask, layer_ids=list(layer_ids))


def compute_supervision(
    target_wrapper,
    selected_token_ids: torch.Tensor,
    selected_token_mask: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    layer_ids: list[int] | None = None,
) -> dict[str, torch.Tensor]:
    """Produce the draft-vocab supervision for one batch.

    ``target_wrapper.generate_batch`` runs the target and returns shifted logits / input_ids / loss_mask
    plus the aux hidden states; ``compute_target_distribution`` projects the logits onto the draft vocab.

    Arguments:
        target_wrapper: an ``Eagle3TargetModel`` (or anything with the same ``generate_batch``).
        selected_token_ids: ``[Vd]`` long.
        selected_token_mask: ``[V]`` bool.
        input_ids: ``[B, S]`` long.
        attention_mask: ``[B, S]`` 0/1.
        loss_mask: ``[B, S]`` 0/1.
        layer_ids: the target layers to capture (a session's, ``draft_layers.CaptureSpec``); None: the
            wrapper's own.

    Returns:
        dict keyed by ``SUPERVISION_KEYS``: ``aux_hidden_states [B, S, K*H]`` (target dtype; K = 3 for EAGLE-3),
        ``target_probs [B, S, Vd]`` fp32, ``position_mask [B, S, 1]`` bool, ``input_ids [B, S]`` long
        (shifted), ``loss_mask [B, S]`` (shifted).
    """
    with torch.no_grad():
        batch = generate(target_wrapper, input_ids, attention_mask, loss_mask, layer_ids)
        device = batch.logits.device
        target_probs, position_mask = compute_target_distribution(
            batch.logits, selected_token_ids.to(device), selected_token_mask.to(device), batch.loss_mask
        )
    return {
        "aux_hidden_states": batch.aux_hidden_states,
        "target_probs": target_probs,
        "position_mask": position_mask,
        "input_ids": batch.input_ids,
        "loss_mask": batch.loss_mask,
    }
