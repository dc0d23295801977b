"""Tree drafting: the tree's shape, its masks against running each branch alone, the target's tree verification
against chain forwards, and tree speculative decoding equal to greedy decoding with more accepted per round."""

import pytest
import torch

from tandem.speculative.decoding.decode import _draft_chain, greedy_decode, speculative_decode
from tandem.speculative.decoding.evaluation import evaluate_speculative
from tandem.speculative.decoding.tree import DraftTree, TreeShape, draft_tree
from tandem.speculative.drafts.eagle3 import DraftKVCache
from tests.speculative.tiny_runs import fit, on_own_continuations, peaked_target


def test_tree_shape_parses_and_refuses_nonsense():
    assert TreeShape.parse("3,4,8") == TreeShape(depth=3, top_k=4, size=8)
    for bad in ("3,4", "a,b,c", "3,4,8,1"):
        with pytest.raises(ValueError, match="DEPTH,TOP_K,SIZE"):
            TreeShape.parse(bad)
    with pytest.raises(ValueError, match=">= 1"):
        TreeShape(depth=0)


def test_accept_follows_the_greedy_tokens_down_the_tree():
    #        0:root(5)
    #      /         \
    #   1:(7)       2:(8)
    #    |            |
    #   3:(9)       4:(9)
    tree = DraftTree(tokens=[5, 7, 8, 9, 9], parents=[-1, 0, 0, 1, 2], depths=[0, 1, 1, 2, 2])
    assert tree.ancestor_mask().int().tolist() == [
        [1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [1, 1, 0, 1, 0], [1, 0, 1, 0, 1]]
    # greedy[i] is the target's next token after node i.
    assert tree.accept([8, 0, 9, 0, 3]) == [2, 4]  # root -> 8 (node 2) -> 9 (node 4), then 3 is the bonus
    assert tree.accept([7, 1, 0, 0, 0]) == [1]  # node 1's child holds 9, the target wants 1
    assert tree.accept([6, 0, 0, 0, 0]) == []


def trained_setup(steps: int = 40):
    target, draft, prompts, supervision, mask = on_own_continuations(num_prompts=6, new_tokens=30)
    fit(draft, supervision, mask, steps=steps, ttt_steps=3)
    return target, draft.eval(), prompts


def draft_inputs(target, prompt):
    """What the draft reads at the first round of a decode of ``prompt``: ``(tokens, aux, start, root)``."""
    step = target.decode_session().extend(prompt)
    root = int(step.next_token_ids[0, -1])
    return torch.cat([prompt[:, 1:], torch.tensor([[root]])], 1), step.aux_hidden_states, 0, root


def test_a_one_wide_tree_is_the_chain():
    target, draft, prompts = trained_setup(steps=10)
    with torch.no_grad():
        for prompt in prompts:
            tokens, aux, start, root = draft_inputs(target, prompt)
            chain = _draft_chain(draft, tokens, aux, start, DraftKVCache(), num_draft_tokens=4)
            cache = DraftKVCache()
            tree = draft_tree(draft, tokens, aux, start, cache, root, TreeShape(depth=4, top_k=1, size=4))
            assert tree.tokens == [root] + chain
            assert tree.parents == [-1, 0, 1, 2, 3] and tree.depths == [0, 1, 2, 3, 4]
            assert cache.length == tokens.shape[1]  # the speculative entries are gone


def test_every_tree_node_is_what_its_branch_drafted_alone_predicts():
    """A node's children are the best tokens the draft predicts after running the node's branch as a chain:
    the tree mask shows each query its own ancestors and nothing else."""
    target, draft, prompts = trained_setup(steps=10)
    shape = TreeShape(depth=3, top_k=3, size=40)  # keep every drafted node
    with torch.no_grad():
        for prompt in prompts[:3]:
            tokens, aux, start, root = draft_inputs(target, prompt)
            tree = draft_tree(draft, tokens, aux, start, DraftKVCache(), root, shape)
            assert len(tree) == 1 + 3 + 9 + 9  # depth 1: 3; depth 2: 3 x 3; depth 3: the 3 best expanded x 3
            for parent in range(len(tree)):
                children = [tree.tokens[i] for i, p in enumerate(tree.parents) if p == parent]
                if not children:
                    continue
                branch = []
                node = parent
                while node > 0:
                    branch.insert(0, tree.tokens[node])
                    node = tree.parents[node]
                cache = DraftKVCache()
                positions = torch.arange(start, start + tokens.shape[1]).unsqueeze(0)
                hidden = draft.step(tokens, draft.project_aux(aux), positions, kv_cache=cache)[:, -1:]
                for j, token in enumerate(branch):
                    hidden = draft.step(torch.tensor([[token]]), hidden, torch.tensor([[tokens.shape[1] + j]]),
                                        kv_cache=cache)
                best = draft.draft_to_target(draft.logits(hidden)[0, -1].topk(3).indices).tolist()
                assert sorted(children) == sorted(best)


def test_tree_verification_equals_a_chain_forward_along_each_branch():
    target = peaked_target(seed=7)
    prompt = torch.randint(3, 250, (1, 9))
    tree = DraftTree(tokens=[11, 20, 21, 30, 31, 40], parents=[-1, 0, 0, 1, 2, 3], depths=[0, 1, 1, 2, 2, 3])
    session = target.decode_session()
    session.extend(prompt)
    step = session.extend(torch.tensor([tree.tokens]), tree.parents)
    for node in range(len(tree)):
        branch = []
        i = node
        while i >= 0:
            branch.insert(0, i)
            i = tree.parents[i]
        alone = target.decode_session()
        alone.extend(prompt)
        chain = alone.extend(torch.tensor([[tree.tokens[i] for i in branch]]))
        assert int(step.next_token_ids[0, node]) == int(chain.next_token_ids[0, -1])
        torch.testing.assert_close(step.aux_hidden_states[0, node], chain.aux_hidden_states[0, -1], rtol=1e-4,
                                   atol=1e-5)
    # Keeping one branch leaves the cache a plain sequence: the next forward sees prompt + that branch.
    session.keep_branch(prompt.shape[1], [0, 2, 4])
    assert session.length == prompt.shape[1] + 3
    after = session.extend(torch.tensor([[50]]))
    fresh = target.decode_session()
    fresh_step = fresh.extend(torch.cat([prompt, torch.tensor([[11, 21, 31, 50]])], 1))
    assert int(after.next_token_ids[0, -1]) == int(fresh_step.next_token_ids[0, -1])
    torch.testing.assert_close(after.aux_hidden_states[0, -1], fresh_step.aux_hidden_states[0, -1], rtol=1e-4,
                               atol=1e-5)
    with pytest.raises(ValueError, match="cannot keep branch"):
        session.keep_branch(prompt.shape[1], [5, 1])


def test_tree_decoding_equals_greedy_and_accepts_more_than_the_chain():
    target, draft, prompts = trained_setup(steps=40)
    chain = evaluate_speculative(target, draft, prompts, max_new_tokens=30, num_draft_tokens=3, progress=False)
    tree = evaluate_speculative(target, draft, prompts, max_new_tokens=30, num_draft_tokens=3, progress=False,
                                tree=TreeShape(depth=3, top_k=3, size=8))
    assert tree.outputs_match and chain.outputs_match
    assert tree.acceptance_length > chain.acceptance_length
    for prompt in prompts:  # and with a tree of another shape
        assert speculative_decode(target, draft, prompt, 30, tree=TreeShape(2, 2, 3)).tokens == \
            greedy_decode(target, prompt, 30).tokens


def test_bf16_tree_decoding_leaves_greedy_only_at_near_ties():
    from tandem.speculative.decoding.evaluation import summarize

    target, draft, prompts = trained_setup(steps=30)
    target.model.to(torch.bfloat16)
    draft = draft.to(torch.bfloat16)
    greedy = [greedy_decode(target, p, 30) for p in prompts]
    spec = [speculative_decode(target, draft, p, 30, tree=TreeShape(3, 3, 8)) for p in prompts]
    summary = summarize(greedy, spec)
    assert summary.exact_up_to_ties, summary
    assert all(len(r.near_ties) == len(r.tokens) for r in spec)


def test_eval_command_drafts_a_tree_and_refuses_a_malformed_shape(tmp_path, capsys):
    import json

    from tandem.cli import main
    from tandem.models import load_target
    from tandem.speculative.drafts.eagle3 import Eagle3DraftConfig, Eagle3DraftModel
    from tandem.speculative.export.eagle3 import export_draft
    from tests.conftest import write_chat_data
    from tests.speculative.remote.remote_utils import save_tiny_target

    target_dir = save_tiny_target(tmp_path / "target")
    model, _ = load_target(str(target_dir))
    torch.manual_seed(0)
    export_draft(Eagle3DraftModel(Eagle3DraftConfig.from_target_config(model.config, 320)), tmp_path / "draft")
    prompts = write_chat_data(tmp_path / "prompts.jsonl", count=2)
    common = ["--log-level", "WARNING", "eval", "--draft", str(tmp_path / "draft"), "--model", str(target_dir),
              "--prompts", str(prompts), "--limit", "2", "--max-new-tokens", "8"]
    assert main(common + ["--tree", "2,3,4"]) == 0
    out = capsys.readouterr().out
    report = json.loads(out[out.index("{"):])
    assert report["outputs_match"] and report["tree"] == "2,3,4"
    with pytest.raises(SystemExit):
        main(common + ["--tree", "2,3"])
    assert "DEPTH,TOP_K,SIZE" in capsys.readouterr().err
