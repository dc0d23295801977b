"""Speculative decoding with an EAGLE-3 draft: equal to greedy, accepted once trained, measured as users see it."""

import json

import pytest
import torch

from tandem.speculative.decoding.decode import greedy_decode, speculative_decode
from tandem.speculative.decoding.evaluation import evaluate_speculative
from tandem.speculative.drafts.eagle3 import Eagle3DraftConfig, Eagle3DraftModel
from tests.conftest import write_chat_data
from tests.speculative.tiny_runs import fit, on_own_continuations, peaked_target


@pytest.mark.parametrize("num_draft_tokens", [1, 3, 6])
def test_speculative_decoding_equals_greedy_with_random_draft(num_draft_tokens):
    target = peaked_target(seed=3)
    torch.manual_seed(num_draft_tokens)
    draft = Eagle3DraftModel(Eagle3DraftConfig.from_target_config(target.config, 320)).eval()
    draft.seed_from_target(target.get_input_embeddings())
    for prompt_len in (1, 5, 17):
        prompt = torch.randint(3, 250, (1, prompt_len))
        greedy = greedy_decode(target, prompt, 25)
        spec = speculative_decode(target, draft, prompt, 25, num_draft_tokens)
        assert spec.tokens == greedy.tokens
        assert len(spec.tokens) == 25


def test_trained_draft_is_accepted_and_still_exact(tmp_path):
    """Train the draft on the target's own greedy continuations, then decode: same tokens, fewer forwards."""
    target, draft, prompts, supervision, mask = on_own_continuations(num_prompts=8, new_tokens=40)
    fit(draft, supervision, mask, steps=60, ttt_steps=3)
    summary = evaluate_speculative(target, draft, prompts, max_new_tokens=40, num_draft_tokens=3, progress=False)
    assert summary.outputs_match
    assert summary.acceptance_length > 1.5


def test_dynamic_draft_length_drafts_less_and_stays_exact():
    target, draft, prompts, supervision, mask = on_own_continuations(num_prompts=4, new_tokens=30)
    fit(draft, supervision, mask, steps=30, ttt_steps=3)
    draft.eval()
    for prompt in prompts:
        greedy = greedy_decode(target, prompt, 30)
        fixed = speculative_decode(target, draft, prompt, 30, num_draft_tokens=5)
        dynamic = speculative_decode(target, draft, prompt, 30, num_draft_tokens=5, min_confidence=0.9)
        assert fixed.tokens == dynamic.tokens == greedy.tokens
        assert fixed.drafted == 5 * (fixed.target_forwards - 1)  # every round drafts the full chain
        assert dynamic.drafted < fixed.drafted


def test_bf16_speculative_decoding_leaves_greedy_only_at_near_ties():
    """In bf16 a (k+1)-token verification rounds differently from a 1-token forward; an output may leave the
    greedy one only where the top two logits of one of the two forwards were within bf16 rounding."""
    from tandem.speculative.decoding.evaluation import summarize

    target, draft, prompts, supervision, mask = on_own_continuations(num_prompts=6, new_tokens=30)
    fit(draft, supervision, mask, steps=30, ttt_steps=3)
    target.model.to(torch.bfloat16)
    draft = draft.to(torch.bfloat16).eval()
    greedy = [greedy_decode(target, p, 30) for p in prompts]
    spec = [speculative_decode(target, draft, p, 30, num_draft_tokens=4) for p in prompts]
    summary = summarize(greedy, spec)
    assert summary.exact_up_to_ties, summary
    assert all(len(r.near_ties) == len(r.tokens) for r in greedy + spec)


def test_teacher_forced_proposals_are_the_decoders_first_proposals():
    # The held-out accuracy the demo reports is only meaningful if it measures what decoding does: the
    # first proposal the decoder makes after each committed prefix, built incrementally through its caches.
    from transformers import DynamicCache

    from tandem.speculative.decoding.decode import _draft_chain
    from tandem.speculative.decoding.evaluation import teacher_forced_proposals
    from tandem.speculative.drafts.eagle3 import DraftKVCache

    target = peaked_target(seed=4)
    torch.manual_seed(1)
    draft = Eagle3DraftModel(Eagle3DraftConfig.from_target_config(target.config, 320)).eval()
    draft.seed_from_target(target.get_input_embeddings())
    prompt = torch.randint(3, 250, (1, 4))
    ids = torch.cat([prompt, torch.tensor([greedy_decode(target, prompt, 10).tokens])], dim=1)
    proposals = teacher_forced_proposals(target, draft, ids)
    assert proposals.shape == (ids.shape[1] - 1,)
    for committed in range(2, ids.shape[1] + 1):
        # The decoder's state with ids[:committed] committed: prefill of all but the last, which is pending.
        _, aux = target.forward_cached(ids[:, : committed - 1], DynamicCache())
        with torch.no_grad():
            first = _draft_chain(draft, ids[:, 1:committed], aux, 0, DraftKVCache(), num_draft_tokens=1)[0]
        assert first == int(proposals[committed - 2])


def test_teacher_forced_accuracy_of_a_trained_draft_beats_a_random_one():
    from tandem.speculative.decoding.evaluation import teacher_forced_accuracy

    target, draft, prompts, supervision, mask = on_own_continuations(num_prompts=6, new_tokens=30)
    before = teacher_forced_accuracy(target, draft, prompts, max_new_tokens=30)
    fit(draft, supervision, mask, steps=40, ttt_steps=1)
    after = teacher_forced_accuracy(target, draft, prompts, max_new_tokens=30)
    assert 0.0 <= before < 0.5 < after <= 1.0
    # The demo reuses the evaluation's plain decodes as the continuations: the same figure.
    from tandem.speculative.decoding.evaluation import evaluate_drafts

    greedy = []
    evaluate_drafts(target, {"trained": draft}, prompts, 30, 3, progress=False, greedy_results=greedy)
    assert len(greedy) == len(prompts)
    reused = teacher_forced_accuracy(target, draft, prompts, 30, continuations=[g.tokens for g in greedy])
    assert reused == after


def test_eval_command_reports_acceptance_and_step0_accuracy(tmp_path, capsys):
    # `tandem eval --step0-accuracy` end to end on a saved tiny target and an exported (untrained) draft.
    from tandem.cli import main
    from tandem.models import load_target
    from tandem.speculative.export.eagle3 import export_draft
    from tests.speculative.remote.remote_utils import save_tiny_target

    target_dir = save_tiny_target(tmp_path / "target")
    model, _ = load_target(str(target_dir))
    torch.manual_seed(0)
    draft = Eagle3DraftModel(Eagle3DraftConfig.from_target_config(model.config, 320))
    export_draft(draft, tmp_path / "draft")
    prompts = write_chat_data(tmp_path / "prompts.jsonl", count=3)
    code = main(["--log-level", "WARNING", "eval", "--draft", str(tmp_path / "draft"), "--model", str(target_dir),
                 "--prompts", str(prompts), "--limit", "3", "--max-new-tokens", "8", "--draft-tokens", "2",
                 "--step0-accuracy"])
    out = capsys.readouterr().out
    report = json.loads(out[out.index("{"):])
    assert code == 0 and report["outputs_match"] and report["prompts"] == 3
    assert report["acceptance_length"] >= 1.0 and 0.0 <= report["step0_accuracy"] <= 1.0


def test_a_divergence_counts_as_a_tie_when_either_forward_saw_one():
    from tandem.speculative.decoding.decode import DecodeResult
    from tandem.speculative.decoding.evaluation import summarize

    greedy = DecodeResult([5, 6, 7], 3, 1.0, near_ties=[False, False, False])
    tie_in_verification = DecodeResult([5, 9, 7], 2, 1.0, drafted=2, near_ties=[False, True, False])
    no_tie_anywhere = DecodeResult([5, 9, 7], 2, 1.0, drafted=2, near_ties=[False, False, True])
    assert summarize([greedy], [tie_in_verification]).exact_up_to_ties
    summary = summarize([greedy], [no_tie_anywhere])
    assert (summary.diverged, summary.diverged_at_ties, summary.exact_up_to_ties) == (1, 0, False)
