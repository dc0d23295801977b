"""The training-time-test (TTT) unrolled loss of EAGLE-3 and its metrics.

The draft is unrolled ``K`` steps on one batch of supervision. Step k sees the draft's own output
hidden from step k-1 (as it will when drafting a chain at decode time), its inputs and targets
shifted left by k, and its loss weighted ``decay ** k``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tandem.speculative.drafts.eagle3 import Eagle3DraftModel
from tandem.speculative.target.supervision import shift_left


@dataclass
class TTTResult:
    """loss: scalar (with grad). step_losses / step_accuracies: ``[K]`` fp32 (no grad).

    acceptance_length: simulated ``1 + sum_k P(steps 0..k all correct)`` over positions valid at every
    step (a proxy; ``decode.py`` measures the real thing).
    """

    loss: torch.Tensor
    step_losses: torch.Tensor
    step_accuracies: torch.Tensor
    acceptance_length: float


def soft_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor, mask: torch.Tensor,
                       count: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over masked positions of ``-sum_v p(v) log q(v)``; logits/probs ``[B, S, Vd]``, mask ``[B, S]`` bool.

    ``count``: divide the sum by this instead of ``mask.sum()`` (data parallel: the global valid count).
    """
    log_q = torch.log_softmax(logits.float(), dim=-1)
    per_position = -(target_probs * log_q).sum(-1)
    count = mask.sum().clamp(min=1) if count is None else count
    return (per_position * mask).sum() / count


def step_valid_counts(position_mask: torch.Tensor, ttt_steps: int) -> torch.Tensor:
    """``[K]`` long: positions ``ttt_loss`` scores at each step (step k sees the mask shifted left by k).

    Arguments:
        position_mask: ``[B, S, 1]`` or ``[B, S]`` bool, the supervision's position mask.
    """
    mask = position_mask.reshape(position_mask.shape[0], -1).bool()
    return torch.stack([mask[:, k:].sum() for k in range(ttt_steps)])


def ttt_loss(draft: Eagle3DraftModel, supervision: dict[str, torch.Tensor], attention_mask: torch.Tensor,
             ttt_steps: int = 7, decay: float = 0.8, loss_normalizers: torch.Tensor | None = None,
             positions: torch.Tensor | None = None) -> TTTResult:
    """Unroll the draft ``ttt_steps`` times on one batch.

    Arguments:
        draft: the draft model (train mode).
        supervision: ``compute_supervision``'s dict: ``aux_hidden_states [B,S,3Ht]``,
            ``target_probs [B,S,Vd]`` fp32, ``position_mask [B,S,1]`` bool, ``input_ids [B,S]`` long
            (shifted), ``loss_mask [B,S]`` (shifted).
        attention_mask: ``[B, S]`` 0/1, unshifted; padding keys are never attended.
        ttt_steps: K, the number of unrolled steps.
        decay: the loss weight ratio between consecutive steps.
        loss_normalizers: ``[K]`` valid-position counts to divide step k's summed loss and correct count
            by, instead of this batch's own (``step_valid_counts`` all-reduced over data-parallel ranks:
            each rank's loss and accuracies are then its share of the global batch's, and they sum to it).
        positions: the target's positions of the (unshifted) tokens, ``[B, S]`` or M-RoPE's ``[3, B, S]`` long
            (``vision.mrope_positions``: a batch with images for a Qwen-VL target); step k adds k on every axis,
            as the engines do for each drafted token. None: ``0..S-1``.
    """
    if ttt_steps < 1:
        raise ValueError(f"ttt_steps must be at least 1, got {ttt_steps}")
    device = draft.fc.weight.device
    input_ids = supervision["input_ids"].to(device)
    target_probs = supervision["target_probs"].to(device)
    position_mask = supervision["position_mask"].to(device).squeeze(-1).bool()
    key_padding_mask = attention_mask.to(device).bool()
    batch, seq = input_ids.shape
    if positions is None:
        positions = torch.arange(seq, device=device).unsqueeze(0).expand(batch, seq)
    positions = positions.to(device)

    hidden = draft.project_aux(supervision["aux_hidden_states"].to(device))
    ttt_cache: list = []
    weighted, weights, step_losses, step_accuracies = 0.0, 0.0, [], []
    still_correct = position_mask.clone()  # chain of correct predictions starting at each position
    valid_everywhere = position_mask.clone()
    chain_counts = []
    for k in range(ttt_steps):
        hidden = draft.step(input_ids, hidden, positions + k, ttt_cache=ttt_cache, key_padding_mask=key_padding_mask)
        logits = draft.logits(hidden)
        count_k = None if loss_normalizers is None else loss_normalizers[k].to(device).clamp(min=1)
        loss_k = soft_cross_entropy(logits, target_probs, position_mask, count_k)
        weighted = weighted + (decay ** k) * loss_k
        weights += decay ** k
        with torch.no_grad():
            correct = (logits.argmax(-1) == target_probs.argmax(-1)) & position_mask
            step_losses.append(loss_k.detach().float())
            denominator = position_mask.sum().clamp(min=1) if count_k is None else count_k
            step_accuracies.append(correct.sum().float() / denominator)
            valid_everywhere = valid_everywhere & position_mask
            still_correct = still_correct & correct
            chain_counts.append(still_correct)
        if k + 1 < ttt_steps:
            input_ids = shift_left(input_ids)
            target_probs = shift_left(target_probs)
            position_mask = shift_left(position_mask)
    with torch.no_grad():
        denominator = valid_everywhere.sum().clamp(min=1).float()
        acceptance = 1.0 + sum(float((c & valid_everywhere).sum()) / float(denominator) for c in chain_counts)
    return TTTResult(
        loss=weighted / weights,
        step_losses=torch.stack(step_losses),
        step_accuracies=torch.stack(step_accuracies),
        acceptance_length=acceptance,
    )


class TTTObjective(nn.Module):
    """``ttt_loss`` as a module's ``forward``, so ``DistributedDataParallel`` can wrap it (DDP syncs
    gradients for what runs inside its wrapped forward). Holds the draft; adds no parameters."""

    def __init__(self, draft: Eagle3DraftModel, ttt_steps: int, decay: float):
        super().__init__()
        self.draft, self.ttt_steps, self.decay = draft, ttt_steps, decay

    def forward(self, supervision: dict[str, torch.Tensor], attention_mask: torch.Tensor,
                loss_normalizers: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> TTTResult:
        return ttt_loss(self.draft, supervision, attention_mask, self.ttt_steps, self.decay, loss_normalizers,
                        positions)
