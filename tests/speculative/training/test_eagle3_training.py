"""The TTT loss and the training loop: learning, metrics, bit-exact resume, speculative decoding."""

import json

import pytest
import torch

from tests.conftest import build_tiny_llama, build_tiny_tokenizer, write_chat_data
from tandem.speculative.eagle.decode import evaluate_speculative, greedy_decode, speculative_decode
from tandem.speculative.eagle.draft import Eagle3DraftConfig, Eagle3DraftModel
from tandem.speculative.eagle.recipe import TrainConfig, Trainer, lr_at
from tandem.speculative.eagle.target import Eagle3TargetModel
from tandem.speculative.eagle.trainer import soft_cross_entropy, ttt_loss
from tandem.speculative.eagle.vocab import build_draft_vocab


def peaked_target(seed: int = 0) -> Eagle3TargetModel:
    """A tiny random target whose next-token distributions are peaked, so there is something to learn."""
    model = build_tiny_llama(seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    return Eagle3TargetModel(model, aux_layer_ids=[0, 1, 2])


def tiny_run_config(tmp_path, **overrides) -> TrainConfig:
    fields = dict(data=str(write_chat_data(tmp_path / "data.jsonl")), output_dir=str(tmp_path / "out"), total_steps=8,
                  batch_size=4, max_seq_len=64, draft_vocab_size=120, warmup_steps=2, ttt_steps=3, save_every=4,
                  show_progress=False, learning_rate=3e-3, dtype="float32")
    fields.update(overrides)
    return TrainConfig(**fields)


def test_soft_cross_entropy_matches_formula_and_ignores_masked():
    logits = torch.randn(1, 3, 4)
    probs = torch.softmax(torch.randn(1, 3, 4), -1)
    mask = torch.tensor([[True, False, True]])
    expected = -(probs * torch.log_softmax(logits, -1)).sum(-1)[mask].mean()
    torch.testing.assert_close(soft_cross_entropy(logits, probs, mask), expected)


def test_lr_schedule_warms_up_then_decays_to_floor():
    config = TrainConfig(total_steps=100, warmup_steps=10, learning_rate=1.0, min_lr_ratio=0.1)
    assert lr_at(0, config) == pytest.approx(0.1) and lr_at(9, config) == pytest.approx(1.0)
    assert lr_at(55, config) < lr_at(20, config)
    assert lr_at(100, config) == pytest.approx(0.1)


def test_a_few_steps_lower_the_loss_and_report_metrics():
    torch.manual_seed(0)
    target = peaked_target()
    vocab = build_draft_vocab(torch.arange(320), 120)
    target.set_vocab_mapping(vocab.selected_token_ids, vocab.selected_token_mask)
    draft = Eagle3DraftModel(Eagle3DraftConfig.from_target_config(target.config, 120))
    draft.set_vocab(vocab.d2t, vocab.t2d)
    draft.seed_from_target(target.get_input_embeddings(), vocab.selected_token_ids)
    ids = torch.randint(3, 250, (4, 24))
    mask = torch.ones_like(ids)
    supervision = target.supervise(ids, mask, mask)
    optimizer = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=3e-3)
    first = None
    for _ in range(25):
        result = ttt_loss(draft, supervision, mask, ttt_steps=3)
        first = first or result
        optimizer.zero_grad()
        result.loss.backward()
        optimizer.step()
    assert result.loss.item() < 0.7 * first.loss.item()
    assert result.step_losses.shape == (3,) and result.step_accuracies.shape == (3,)
    assert result.step_accuracies[0] > first.step_accuracies[0]
    assert 1.0 <= result.acceptance_length <= 4.0
    assert not draft.embed_tokens.weight.requires_grad  # the embedding stays the target's


def test_training_loop_writes_metrics_checkpoints_and_export(tmp_path):
    trainer = Trainer(tiny_run_config(tmp_path), target=peaked_target(), tokenizer=build_tiny_tokenizer())
    trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert len(rows[0]["step_accuracies"]) == 3 and rows[0]["tokens_per_s"] > 0
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir()) == ["step_4.pt", "step_8.pt"]
    assert (tmp_path / "out" / "eagle3-draft" / "model.safetensors").is_file()


def test_resume_is_bit_exact(tmp_path):
    tokenizer = build_tiny_tokenizer()
    straight = Trainer(tiny_run_config(tmp_path / "a", total_steps=8, save_every=4, grad_accum_steps=2),
                       target=peaked_target(), tokenizer=tokenizer)
    straight.train()

    half = tiny_run_config(tmp_path / "b", total_steps=8, save_every=3, grad_accum_steps=2, stop_at_step=4)
    Trainer(half, target=peaked_target(), tokenizer=tokenizer).train()
    resumed = Trainer(tiny_run_config(tmp_path / "b", total_steps=8, save_every=4, grad_accum_steps=2, resume=True),
                      target=peaked_target(), tokenizer=tokenizer)
    resumed.train()
    assert resumed.step == 8
    for key, value in straight.draft.state_dict().items():
        assert torch.equal(resumed.draft.state_dict()[key], value), key
    losses = lambda d: [json.loads(l)["loss"] for l in (d / "out" / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


def test_training_data_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl.*2"):
        Trainer(tiny_run_config(tmp_path, data=str(bad)), target=peaked_target(), tokenizer=build_tiny_tokenizer())
    with pytest.raises(ValueError, match="--data"):
        Trainer(tiny_run_config(tmp_path, data=""), target=peaked_target(), tokenizer=build_tiny_tokenizer())


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


def on_own_continuations(num_prompts: int, new_tokens: int):
    """A peaked tiny target, random prompts, the supervision of its own greedy continuations of them, and a
    fresh draft whose vocabulary comes from those tokens: ``(target, draft, prompts, supervision, mask)``."""
    target = peaked_target(seed=5)
    prompts = [torch.randint(3, 250, (1, 6)) for _ in range(num_prompts)]
    continuations = [torch.tensor([greedy_decode(target, p, new_tokens).tokens]) for p in prompts]
    ids = torch.cat([torch.cat([p, c], 1) for p, c in zip(prompts, continuations)])
    mask = torch.ones_like(ids)
    vocab = build_draft_vocab(torch.bincount(ids.flatten(), minlength=320), 320)
    target.set_vocab_mapping(vocab.selected_token_ids, vocab.selected_token_mask)
    torch.manual_seed(0)
    draft = Eagle3DraftModel(Eagle3DraftConfig.from_target_config(target.config, 320))
    draft.seed_from_target(target.get_input_embeddings(), vocab.selected_token_ids, seed_lm_head=True)
    return target, draft, prompts, target.supervise(ids, mask, mask), mask


def fit(draft, supervision, mask, steps: int, ttt_steps: int) -> None:
    """``steps`` AdamW steps of the TTT loss on one batch."""
    optimizer = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=3e-3)
    draft.train()
    for _ in range(steps):
        loss = ttt_loss(draft, supervision, mask, ttt_steps=ttt_steps).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


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
    from tandem.speculative.eagle.decode import summarize

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

    from tandem.speculative.eagle.decode import _draft_chain, teacher_forced_proposals
    from tandem.speculative.eagle.draft import DraftKVCache

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
    from tandem.speculative.eagle.decode import teacher_forced_accuracy

    target, draft, prompts, supervision, mask = on_own_continuations(num_prompts=6, new_tokens=30)
    before = teacher_forced_accuracy(target, draft, prompts, max_new_tokens=30)
    fit(draft, supervision, mask, steps=40, ttt_steps=1)
    after = teacher_forced_accuracy(target, draft, prompts, max_new_tokens=30)
    assert 0.0 <= before < 0.5 < after <= 1.0
    # The demo reuses the evaluation's plain decodes as the continuations: the same figure.
    from tandem.speculative.eagle.decode import evaluate_drafts

    greedy = []
    evaluate_drafts(target, {"trained": draft}, prompts, 30, 3, progress=False, greedy_results=greedy)
    assert len(greedy) == len(prompts)
    reused = teacher_forced_accuracy(target, draft, prompts, 30, continuations=[g.tokens for g in greedy])
    assert reused == after


def test_eval_command_reports_acceptance_and_step0_accuracy(tmp_path, capsys):
    # `tandem eval --step0-accuracy` end to end on a saved tiny target and an exported (untrained) draft.
    from tests.remote_utils import save_tiny_target
    from tandem.cli import main
    from tandem.models import load_target
    from tandem.speculative.eagle.checkpoint import export_draft

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


def test_the_run_exports_in_the_targets_dtype_unless_told(tmp_path):
    # SGLang's --dtype auto turned a float32 draft beside a bfloat16 target into float16: export the target's.
    from safetensors.torch import load_file

    model = build_tiny_llama(seed=1).to(torch.bfloat16)
    trainer = Trainer(tiny_run_config(tmp_path), target=Eagle3TargetModel(model, [0, 1, 2]), tokenizer=build_tiny_tokenizer())
    tensors = load_file(str(trainer.export() / "model.safetensors"))
    assert tensors["fc.weight"].dtype == torch.bfloat16
    assert torch.equal(tensors["embed_tokens.weight"], model.get_input_embeddings().weight)  # lossless
    trainer.config.export_dtype = "float32"
    assert load_file(str(trainer.export(tmp_path / "fp32") / "model.safetensors"))["fc.weight"].dtype == torch.float32


def test_live_evaluation_measures_what_eval_does_and_leaves_training_bit_identical(tmp_path):
    # --eval-every: the figures it logs are those `tandem eval`'s decoder gives for the same draft and prompts,
    # and the run's weights are those of the same run without it, bit for bit.
    from tandem.speculative.eagle.data import prompt_ids, read_chat_jsonl
    from tandem.speculative.eagle.decode import teacher_forced_accuracy

    prompts_path = write_chat_data(tmp_path / "prompts.jsonl", count=3)
    tokenizer = build_tiny_tokenizer()

    def run(name: str, **overrides) -> Trainer:
        trainer = Trainer(tiny_run_config(tmp_path / name, **overrides), target=peaked_target(seed=1), tokenizer=tokenizer)
        trainer.train()
        return trainer

    plain = run("plain")
    measured = run("measured", eval_every=3, eval_prompts=str(prompts_path), eval_limit=2, eval_max_new_tokens=8,
                   eval_draft_tokens=3)
    for key, value in plain.draft.state_dict().items():
        assert torch.equal(measured.draft.state_dict()[key], value), key
    rows = [json.loads(line) for line in (tmp_path / "measured" / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval_acceptance_length" in r] == [3, 6, 8]
    prompts = [prompt_ids(tokenizer, r.messages) for r in read_chat_jsonl(prompts_path, limit=2)]
    stop_ids = {tokenizer.eos_token_id}
    summary = evaluate_speculative(measured.target, measured.draft, prompts, 8, 3, stop_ids=stop_ids, progress=False)
    assert rows[-1]["eval_acceptance_length"] == summary.acceptance_length
    assert rows[-1]["eval_outputs_match"] == summary.outputs_match
    assert rows[-1]["eval_step0_accuracy"] == teacher_forced_accuracy(measured.target, measured.draft, prompts, 8, stop_ids)


def test_a_divergence_counts_as_a_tie_when_either_forward_saw_one():
    from tandem.speculative.eagle.decode import DecodeResult, summarize

    greedy = DecodeResult([5, 6, 7], 3, 1.0, near_ties=[False, False, False])
    tie_in_verification = DecodeResult([5, 9, 7], 2, 1.0, drafted=2, near_ties=[False, True, False])
    no_tie_anywhere = DecodeResult([5, 9, 7], 2, 1.0, drafted=2, near_ties=[False, False, True])
    assert summarize([greedy], [tie_in_verification]).exact_up_to_ties
    summary = summarize([greedy], [no_tie_anywhere])
    assert (summary.diverged, summary.diverged_at_ties, summary.exact_up_to_ties) == (1, 0, False)
