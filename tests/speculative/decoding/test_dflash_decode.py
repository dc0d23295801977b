"""DFlash decoding: the draft's context cache equals recomputing the context; decoding equals greedy exactly in
float32 at every decode-time block size, in-process and through a real server's /verify, with proposals accepted."""

import pytest
import torch

from tandem.speculative.decoding.decode import greedy_decode
from tandem.speculative.decoding.dflash_decode import dflash_decode, evaluate_dflash
from tandem.speculative.drafts.dflash import DFlashContextCache, DFlashDraftConfig, DFlashDraftModel
from tandem.speculative.target.model import Eagle3TargetModel
from tandem.speculative.training.dflash_loss import DFlashObjective, sample_anchors
from tests.conftest import build_tiny_llama

BLOCK = 4


def peaked_dflash_target(model=None) -> Eagle3TargetModel:
    model = model or build_tiny_llama(seed=0)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    return Eagle3TargetModel(model, draft_method="dflash", num_draft_layers=2)


def fitted_draft(target: Eagle3TargetModel, prompts: list[torch.Tensor], steps: int = 40) -> DFlashDraftModel:
    """A tiny DFlash draft fitted to the target's greedy continuations of ``prompts`` (so proposals get accepted)."""
    ids = torch.cat([torch.cat([p, torch.tensor([greedy_decode(target, p, 16).tokens])], 1) for p in prompts])
    ones = torch.ones_like(ids)
    vocab = target.config.vocab_size
    target.set_vocab_mapping(torch.arange(vocab), torch.ones(vocab, dtype=torch.bool))
    answer = target.supervise_compact(ids, ones, ones)
    torch.manual_seed(0)
    config = DFlashDraftConfig.from_target_config(target.config, num_hidden_layers=2, block_size=BLOCK,
                                                  target_layer_ids=target.aux_layer_ids, mask_token_id=300)
    draft = DFlashDraftModel(config)
    draft.set_target_weights(target.get_input_embeddings(), target.model.lm_head.weight)
    objective = DFlashObjective(draft, BLOCK, 4.0, "argmax")
    optimizer = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=3e-3)
    anchors, valid = sample_anchors(ones, [ids.shape[1]] * len(prompts), 64, list(range(len(prompts))))
    supervision = {**answer, "tokens": ids, "trained": ones, "anchors": anchors, "anchor_valid": valid}
    for _ in range(steps):
        loss = objective(supervision, ones).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return draft.eval()


@pytest.fixture(scope="module")
def trained():
    target = peaked_dflash_target()
    prompts = [torch.randint(3, 250, (1, 6), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    return target, fitted_draft(target, prompts), prompts


def test_the_context_cache_equals_recomputing_the_context():
    torch.manual_seed(0)
    config = DFlashDraftConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=8, vocab_size=50, block_size=4,
                               target_layer_ids=[0, 1], mask_token_id=49)
    draft = DFlashDraftModel(config).eval()
    states = draft.project_context(torch.randn(1, 9, 64))
    positions = torch.arange(9).unsqueeze(0)
    block = draft.block_inputs(torch.tensor([[7]]), 4)
    block_positions = torch.arange(9, 13).unsqueeze(0)
    with torch.no_grad():
        whole = draft(block, block_positions, states, positions)
        cache = DFlashContextCache(2)
        draft(block, block_positions - 4, states[:, :5], positions[:, :5], cache=cache)  # an earlier round
        cached = draft(block, block_positions, states[:, 5:], positions[:, 5:], cache=cache)
    assert cache.length == 9
    torch.testing.assert_close(cached, whole, rtol=1e-6, atol=1e-6)


def test_dflash_decoding_equals_greedy_at_every_block_size_and_accepts_proposals(trained):
    target, draft, prompts = trained
    accepted = 0
    for prompt in prompts + [torch.randint(3, 250, (1, 4))]:
        greedy = greedy_decode(target, prompt, 14).tokens
        for size in (2, BLOCK):
            result = dflash_decode(target, draft, prompt, 14, size)
            assert result.tokens == greedy, size
            assert result.drafted == (result.target_forwards - 1) * (size - 1)
            accepted += len(result.tokens) - result.target_forwards
    assert accepted > 0  # some rounds committed more than the target's own token
    with pytest.raises(ValueError, match="block_size"):
        dflash_decode(target, draft, prompts[0], 5, BLOCK + 1)


def test_decoding_through_a_server_equals_decoding_in_process(trained, tmp_path):
    from tandem.speculative.remote.client import RemoteEagle3TargetModel
    from tests.conftest import build_tiny_tokenizer
    from tests.speculative.remote.remote_utils import start_tiny_server

    target, draft, prompts = trained
    target.model.save_pretrained(tmp_path / "target")
    build_tiny_tokenizer().save_pretrained(tmp_path / "target")
    server = start_tiny_server(tmp_path / "target", tmp_path / "serve.log")
    try:
        with RemoteEagle3TargetModel(server.url, enable_nccl=False, draft_method="dflash",
                                     aux_layer_ids=draft.config.target_layer_ids) as remote:
            here = evaluate_dflash(target, draft, prompts, 12, [BLOCK], progress=False)
            there = evaluate_dflash(remote, draft, prompts, 12, [BLOCK], progress=False)
    finally:
        server.stop()
    for size in (BLOCK,):
        assert there[size].outputs_match and here[size].outputs_match
        assert there[size].acceptance_length == here[size].acceptance_length
    assert here[BLOCK].acceptance_length > 1.0


def test_bf16_dflash_decoding_leaves_greedy_only_at_near_ties():
    """In bf16 the target's block verification rounds differently from its 1-token forward: an output may leave the
    greedy one only where the top two logits of one of the two forwards were within bf16 rounding."""
    target = peaked_dflash_target(build_tiny_llama(seed=3))
    prompts = [torch.randint(3, 250, (1, 6), generator=torch.Generator().manual_seed(10 + i)) for i in range(4)]
    draft = fitted_draft(target, prompts)
    target.model.to(torch.bfloat16)
    assert target.dtype == torch.bfloat16
    summaries = evaluate_dflash(target, draft, prompts, 16, [2, BLOCK], progress=False)
    for size, summary in summaries.items():
        assert summary.exact_up_to_ties, (size, summary)
        assert summary.new_tokens == 4 * 16
    assert summaries[BLOCK].acceptance_length > 1.0  # the bf16 draft's proposals are accepted, not only verified
    greedy = greedy_decode(target, prompts[0], 16)
    spec = dflash_decode(target, draft.to(torch.bfloat16), prompts[0], 16, BLOCK)
    assert len(spec.near_ties) == len(spec.tokens) and len(greedy.near_ties) == len(greedy.tokens)
