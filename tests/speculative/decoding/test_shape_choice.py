"""The shape chooser: given a machine's costs and a draft's acceptance, the shape with the most tokens per second."""

import pytest

from tandem.speculative.decoding.shape_choice import (
    PLAIN,
    ChoiceConfig,
    DecodingShape,
    RoundCosts,
    candidate_shapes,
    choose_shape,
    predicted_speedup,
)
from tandem.speculative.decoding.tree import TreeShape

CHAIN_2, CHAIN_4 = DecodingShape.chain(2), DecodingShape.chain(4)
WIDE_TREE = DecodingShape.of_tree(TreeShape(4, 8, 32))
# A draft whose trees accept more than its chains (runners-up get accepted), as measured drafts do.
ACCEPTANCE = {DecodingShape.chain(1): 1.6, CHAIN_2: 1.9, CHAIN_4: 2.1, DecodingShape.of_tree(TreeShape(3, 4, 12)): 2.3,
              WIDE_TREE: 2.8}
DRAFT_MS = {"chain 1": 2.0, "chain 2": 4.0, "chain 4": 8.0, "tree 3,4": 7.0, "tree 4,8": 10.0}


def costs(per_token_ms: float, one_ms: float = 40.0) -> RoundCosts:
    """A verification cost curve: ``one_ms`` for one token plus ``per_token_ms`` for each further one."""
    curve = {n: one_ms + per_token_ms * (n - 1) for n in range(1, 34)}
    return RoundCosts(verify_ms=curve, tree_verify_ms=dict(curve), draft_ms=dict(DRAFT_MS))


def test_costly_verification_picks_a_short_chain():
    # A CPU in float32: every verified token costs a third of a one-token forward.
    choice = choose_shape(ACCEPTANCE, costs(per_token_ms=13.0))
    assert choice.chosen.kind == "chain", choice.reason()
    assert choice.chosen.draft_tokens <= 2
    assert choice.predicted_speedup >= ChoiceConfig().margin


def test_flat_verification_picks_the_wide_tree():
    # A GPU: verifying 33 tokens costs about what one does.
    choice = choose_shape(ACCEPTANCE, costs(per_token_ms=0.05))
    assert choice.chosen == WIDE_TREE, choice.reason()
    assert choice.estimates[0].shape == WIDE_TREE


def test_plain_decoding_when_nothing_pays():
    # Every verified token costs as much as a forward, the draft costs too: no shape can win.
    choice = choose_shape(ACCEPTANCE, costs(per_token_ms=40.0))
    assert choice.chosen == PLAIN
    assert choice.predicted_speedup == 1.0
    assert choice.best_speculative.predicted_speedup < 1.0
    assert "plain decoding" in choice.reason()


def test_the_margin_keeps_a_marginal_shape_out():
    table = costs(per_token_ms=13.0)
    best = choose_shape(ACCEPTANCE, table)
    assert best.chosen != PLAIN
    assert choose_shape(ACCEPTANCE, table, ChoiceConfig(margin=best.predicted_speedup + 0.01)).chosen == PLAIN


def test_prediction_is_plain_time_over_speculative_time():
    table = RoundCosts(verify_ms={1: 10.0, 3: 20.0}, draft_ms={"chain 2": 5.0}, prefill_ms=30.0)
    # 65 tokens: the prefill gives the first; 64 plain steps of 10 ms, or 32 rounds of 25 ms at acceptance 2.
    assert predicted_speedup(2.0, table.round_ms(CHAIN_2), table, 65) == pytest.approx((30 + 640) / (30 + 32 * 25))


def test_shapes_without_measured_costs_are_skipped():
    table = RoundCosts(verify_ms={1: 10.0, 2: 11.0}, draft_ms={"chain 1": 1.0})
    choice = choose_shape({DecodingShape.chain(1): 1.8, CHAIN_4: 3.0}, table)
    assert [e.shape for e in choice.estimates] == [DecodingShape.chain(1)]


def test_candidates_cover_chains_and_trees_that_can_hold_their_size():
    shapes = candidate_shapes(max_chain=3, top_ks=(2,), depths=(2,), sizes=(2, 4, 8))
    assert [str(s) for s in shapes] == ["chain 1", "chain 2", "chain 3", "tree 2,2,2", "tree 2,2,4"]
    assert DecodingShape.chain(3).verified == 4 and DecodingShape.of_tree(TreeShape(2, 2, 4)).verified == 5
    with pytest.raises(ValueError):
        DecodingShape("chain")
