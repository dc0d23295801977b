"""The target's greedy step for speculative decoding (``verification.py``): the cheap projection of a bf16 target
gives exactly the tokens and near-tie flags of the float32 logits, whatever the number of positions."""

from __future__ import annotations

import pytest
import torch

from tandem.speculative.decoding.verification import (
    CANDIDATES,
    WIDE_CANDIDATES,
    dot_magnitude,
    greedy_from_hidden,
    near_tie_mask,
)


def _hidden_and_head(rows: int, dtype: torch.dtype, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    weight = (torch.randn(3000, 64, generator=generator) * 0.2).to(dtype)
    hidden = (torch.randn(1, rows, 64, generator=generator) * 8).to(dtype)
    return hidden, weight


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_greedy_from_hidden_equals_the_float32_logits(dtype):
    hidden, weight = _hidden_and_head(400, dtype)
    # A few near-ties on purpose: rows whose best two tokens are (almost) the same vector.
    weight[1] = weight[0]
    hidden[0, :5] = weight[0] * 3
    logits = torch.nn.functional.linear(hidden.float(), weight.float())
    next_ids, near_ties = greedy_from_hidden(hidden, weight)
    want_ids = logits.argmax(-1)
    want_ties = near_tie_mask(logits, dtype, dot_magnitude(hidden, weight, want_ids))
    # Exact ties may go either way between two summation orders; everywhere else the token is the same.
    assert torch.equal(next_ids[~want_ties], want_ids[~want_ties])
    assert torch.equal(near_ties, want_ties)
    assert bool(want_ties.any()) and bool((~want_ties).any())


def test_flat_rows_fall_back_to_the_full_projection():
    hidden, weight = _hidden_and_head(4, torch.bfloat16)
    hidden[0, 1] = 0  # every logit 0: more than CANDIDATES tokens share the top
    next_ids, near_ties = greedy_from_hidden(hidden, weight)
    logits = torch.nn.functional.linear(hidden.float(), weight.float())
    assert CANDIDATES < weight.shape[0]
    assert int(next_ids[0, 1]) == int(logits[0, 1].argmax()) and bool(near_ties[0, 1])
    assert torch.equal(next_ids, logits.argmax(-1))


def test_rows_too_flat_for_the_first_candidates_are_settled_by_the_wide_ones(monkeypatch):
    """A row whose best 40 tokens are within rounding of each other: 16 candidates cannot hold every possible
    answer, 512 can; the answer and its near-tie flag are the float32 projection's, without computing it."""
    hidden, weight = _hidden_and_head(3, torch.bfloat16, seed=5)
    weight[:40] = weight[0]  # 40 identical rows: an exact 40-way tie at the top of row 1
    hidden[0, 1] = weight[0] * 4
    logits = torch.nn.functional.linear(hidden.float(), weight.float())
    assert CANDIDATES < 40 < WIDE_CANDIDATES < weight.shape[0]
    projections = []
    original = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda *a: projections.append(a) or original(*a))
    next_ids, near_ties = greedy_from_hidden(hidden, weight)
    assert len(projections) == 1  # the low-precision projection only: no float32 fallback
    assert int(next_ids[0, 1]) < 40 and bool(near_ties[0, 1])  # one of the tied tokens, flagged as a tie
    keep = ~near_ties[0]
    assert torch.equal(next_ids[0][keep], logits[0].argmax(-1)[keep])


def test_a_position_gets_the_same_answer_alone_and_among_others():
    # Greedy decoding scores one position a forward, verification k + 1: the answer for a position must not
    # depend on how many were projected with it.
    hidden, weight = _hidden_and_head(7, torch.bfloat16, seed=3)
    together = greedy_from_hidden(hidden, weight)
    for i in range(7):
        alone = greedy_from_hidden(hidden[:, i : i + 1], weight)
        assert int(alone[0][0, 0]) == int(together[0][0, i])
        assert bool(alone[1][0, 0]) == bool(together[1][0, i])


def test_the_tie_window_scales_with_the_dot_products_terms_not_the_logit():
    # A small logit made of large cancelling terms carries the rounding error of those terms.
    weight = torch.tensor([[1.0, 1.0], [1.0, 0.999]])
    hidden = torch.tensor([[[100.0, -99.0]]])  # logits 1.0 and 1.099: cancellation
    logits = torch.nn.functional.linear(hidden, weight)
    magnitude = dot_magnitude(hidden, weight, logits.argmax(-1))
    assert float(magnitude) > 100
    assert not bool(near_tie_mask(logits, torch.bfloat16))  # relative to |1.099| the gap looks wide
    assert bool(near_tie_mask(logits, torch.bfloat16, magnitude))  # relative to the terms it is rounding
