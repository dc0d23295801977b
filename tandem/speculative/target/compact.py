"""Compact supervision: ship the target's final hidden state, not its draft-vocabulary probabilities.

The full encoding's ``target_probs [B, S, Vd]`` fp32 costs ``4 * Vd`` bytes a token, far more than the rest
of the answer. They are ``softmax(h @ W_d.T)`` of the target's final normalised hidden state ``h`` with
``W_d = lm_head.weight[selected_token_ids]`` ``[Vd, H]``, so the server sends ``h`` (``H`` values a token)
and the client, holding ``W_d`` (fetched once), computes the probabilities itself, overlapped with training.
``position_mask`` needs the full-vocabulary argmax, so the server still sends it. Exact only when the logits
are a bias-free linear map of ``h``: :func:`output_projection` refuses other targets (soft-capping, scaled
logits, a biased head) and the server answers those in full. Sizes: docs/remote-target.md.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from tandem.speculative.target.supervision import SUPERVISION_KEYS, draft_position_mask, generate, shift_left

FINAL_HIDDEN_KEY = "final_hidden_states"
# The compact answer: the full encoding's keys with target_probs replaced, in the data-plane send order.
COMPACT_SUPERVISION_KEYS = [FINAL_HIDDEN_KEY if k == "target_probs" else k for k in SUPERVISION_KEYS]
# Config fields of targets whose logits are not lm_head(h) alone (Gemma-2 soft-capping, Cohere scaling).
_NONLINEAR_LOGIT_FIELDS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def output_projection(model: Optional[nn.Module]) -> Optional[nn.Linear]:
    """The target's ``lm_head`` if its logits are exactly ``h @ lm_head.weight.T``, else None.

    Arguments:
        model: a transformers causal LM (or None, for a target wrapper without one).
    """
    if model is None or not hasattr(model, "get_output_embeddings"):
        return None
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear) or head.bias is not None:
        return None
    config = getattr(model, "config", None)
    if any(getattr(config, name, None) not in (None, 1.0) for name in _NONLINEAR_LOGIT_FIELDS):
        return None
    return head


def draft_lm_head(model: nn.Module, selected_token_ids: torch.Tensor) -> torch.Tensor:
    """The rows of the target's ``lm_head`` for the draft vocabulary.

    Arguments:
        model: a target that :func:`output_projection` accepts.
        selected_token_ids: ``[Vd]`` long, draft id -> target id.

    Returns:
        ``[Vd, H]`` in the target dtype, a new contiguous tensor (``W_d`` above).
    """
    head = output_projection(model)
    if head is None:
        raise ValueError(f"{type(model).__name__}: logits are not a bias-free linear map of the final hidden state")
    return head.weight.detach()[selected_token_ids.to(head.weight.device, torch.long)].contiguous()


@torch.no_grad()
def compute_compact_supervision(
    target_wrapper,
    selected_token_ids: torch.Tensor,
    selected_token_mask: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    layer_ids: list[int] | None = None,
) -> dict[str, torch.Tensor]:
    """``compute_supervision`` in the compact encoding: one target forward, the ``lm_head`` input kept.

    Arguments:
        target_wrapper: an ``Eagle3TargetModel`` whose ``model`` passes :func:`output_projection`.
        selected_token_ids: ``[Vd]`` long (unused: the client projects; kept for the same signature).
        selected_token_mask: ``[V]`` bool.
        input_ids, attention_mask, loss_mask: ``[B, S]`` as for ``compute_supervision``.
        layer_ids: the target layers to capture; None: the wrapper's own (see ``compute_supervision``).

    Returns:
        dict keyed by ``COMPACT_SUPERVISION_KEYS``: ``aux_hidden_states [B, S, K*H]`` (target dtype),
        ``final_hidden_states [B, S, H]`` (target dtype, shifted left with a zero tail like the logits),
        ``position_mask [B, S, 1]`` bool, ``input_ids [B, S]`` long and ``loss_mask [B, S]`` (shifted).
    """
    head = output_projection(getattr(target_wrapper, "model", None))
    if head is None:
        raise ValueError("compact supervision needs a target whose logits are a bias-free linear map of its final "
                         "hidden state")
    captured: list[torch.Tensor] = []
    # A pre-hook sees exactly the tensor the logits were computed from (after any logits_to_keep slicing).
    handle = head.register_forward_pre_hook(lambda _module, args: captured.append(args[0]))
    try:
        batch = generate(target_wrapper, input_ids, attention_mask, loss_mask, layer_ids)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"expected one lm_head call in the target forward, saw {len(captured)}")
    mask = selected_token_mask.to(batch.logits.device)
    return {
        "aux_hidden_states": batch.aux_hidden_states,
        FINAL_HIDDEN_KEY: shift_left(captured[0]),
        "position_mask": draft_position_mask(batch.logits, mask, batch.loss_mask),
        "input_ids": batch.input_ids,
        "loss_mask": batch.loss_mask,
    }


def expand_supervision(compact: dict[str, torch.Tensor], draft_head: torch.Tensor) -> dict[str, torch.Tensor]:
    """Turn a compact answer into the full encoding the trainer consumes.

    Arguments:
        compact: dict keyed by ``COMPACT_SUPERVISION_KEYS`` (see :func:`compute_compact_supervision`).
        draft_head: ``[Vd, H]`` the target's ``lm_head`` rows for the draft vocabulary (target dtype).

    Returns:
        dict keyed by ``SUPERVISION_KEYS``: the compact tensors as they are, and ``target_probs [B, S, Vd]``
        fp32 = ``softmax(float(h @ draft_head.T))`` on ``h``'s device -- the full encoding's expression,
        with the projection done in the target dtype as the target's own ``lm_head`` does it.
    """
    hidden = compact[FINAL_HIDDEN_KEY]
    weight = draft_head.to(hidden.device, hidden.dtype)
    with torch.no_grad():
        target_probs = torch.softmax(nn.functional.linear(hidden, weight).float(), dim=-1)
    out = {key: compact[key] for key in SUPERVISION_KEYS if key != "target_probs"}
    out["target_probs"] = target_probs
    return {key: out[key] for key in SUPERVISION_KEYS}


def bytes_per_token(hidden: int, draft_vocab: int, target_itemsize: int = 2) -> dict[str, int]:
    """Payload bytes a supervised token costs in each encoding (tensor data only, no wire headers).

    Both carry ``aux_hidden_states`` (3H target dtype), ``position_mask`` (1 byte), ``input_ids`` (8 bytes)
    and ``loss_mask`` (8 bytes, int64 as collated); full adds ``4 * Vd``, compact ``H`` in the target dtype.
    """
    common = 3 * hidden * target_itemsize + 1 + 8 + 8
    return {"full": common + 4 * draft_vocab, "compact": common + hidden * target_itemsize}
