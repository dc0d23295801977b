"""Speculative decoding of a hybrid-attention target (Qwen3-Next: gated DeltaNet beside full attention).

A linear-attention layer keeps a recurrent state instead of per-position keys and values; the decode cache
records it after each position of a forward and rolls back to the last accepted one (``recurrent_state.py``).
Rejected proposals then leave no trace: the output equals greedy decoding exactly (float32), while the decode
accepts some proposals and rejects others. A draft tree, which such a layer cannot verify, is refused in one line.
"""

from __future__ import annotations

import pytest
import torch

from tandem.speculative.decoding.decode import greedy_decode, speculative_decode
from tandem.speculative.decoding.recurrent_state import ROLLBACK_POSITIONS, TreeUnsupportedError
from tandem.speculative.decoding.tree import TreeShape
from tandem.speculative.target.model import Eagle3TargetModel
from tests.speculative.target_families import build_family_target, fitted_draft

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def hybrid():
    return Eagle3TargetModel(build_family_target("qwen3_next", seed=5), aux_layer_ids=[0, 2, 3])


def test_a_crop_rolls_the_recurrent_state_back_to_the_kept_positions(hybrid):
    prompt, proposal, after = torch.randint(3, 250, (1, 7)), torch.tensor([[5, 6, 7, 8, 9]]), torch.tensor([[40, 41]])
    session = hybrid.decode_session()
    session.extend(prompt)
    session.extend(proposal)  # five positions verified, the last three rejected
    session.crop(7 + 2)
    got = session.extend(after)
    reference = hybrid.decode_session()
    reference.extend(prompt)
    reference.extend(proposal[:, :2])
    want = reference.extend(after)
    assert torch.equal(got.next_token_ids, want.next_token_ids)
    torch.testing.assert_close(got.aux_hidden_states, want.aux_hidden_states, rtol=1e-5, atol=1e-5)
    # Had the rejected positions advanced the state, the answer would be another one.
    unrolled = hybrid.decode_session()
    unrolled.extend(torch.cat([prompt, proposal], 1))
    assert not torch.allclose(unrolled.extend(after).aux_hidden_states, want.aux_hidden_states, atol=1e-3)


def test_the_recorded_states_stay_bounded_over_a_long_decode(hybrid):
    session = hybrid.decode_session()
    session.extend(torch.randint(3, 250, (1, 5)))
    for token in range(3, 43):
        session.extend(torch.tensor([[token]]))
    linear = [layer for layer in session.cache.layers if hasattr(layer, "recurrent_states_history")]
    assert linear and session.length == 45
    for layer in linear:  # one forward's history at most, the convolution window its kernel plus that forward
        assert len(layer.recurrent_states_history[0]) <= 1
        assert layer.conv_states[0].shape[-1] <= layer.conv_kernel_size[0] + 1
    with pytest.raises(ValueError, match="recorded"):
        session.crop(session.length - 2)  # deeper than the last forward: refused, not silently wrong
    assert ROLLBACK_POSITIONS >= 16


def test_speculative_decoding_of_a_hybrid_target_equals_greedy(hybrid):
    torch.manual_seed(0)
    prompts = [torch.randint(3, 250, (1, 6)) for _ in range(3)]
    draft = fitted_draft(hybrid, prompts)
    accepted, rejected = 0, 0
    for prompt in prompts:
        greedy = greedy_decode(hybrid, prompt, 24)
        for draft_tokens in (1, 4):
            got = speculative_decode(hybrid, draft, prompt, 24, draft_tokens)
            assert got.tokens == greedy.tokens
            kept = len(got.tokens) - got.target_forwards  # accepted proposals
            accepted, rejected = accepted + kept, rejected + got.drafted - kept
    assert accepted > 0 and rejected > 0  # both paths ran: states kept and states rolled back


def test_a_draft_tree_is_refused_in_one_line(hybrid):
    from tandem.speculative.drafts.eagle3 import Eagle3DraftConfig, Eagle3DraftModel

    draft = Eagle3DraftModel(Eagle3DraftConfig.from_target_config(hybrid.config, 320)).eval()
    with pytest.raises(TreeUnsupportedError, match="linear-attention layers.*drop --tree") as refused:
        speculative_decode(hybrid, draft, torch.randint(3, 250, (1, 5)), 8, tree=TreeShape(depth=2, top_k=2, size=4))
    assert "\n" not in str(refused.value)
    with pytest.raises(TreeUnsupportedError):
        hybrid.decode_session().extend(torch.tensor([[5, 6, 7]]), tree_parents=[-1, 0, 0])
