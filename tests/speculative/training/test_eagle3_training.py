"""The TTT loss and the training loop: learning, metrics, bit-exact resume, export dtype, live evaluation."""

import json

import pytest
import torch

from tandem.speculative.decoding.evaluation import evaluate_speculative
from tandem.speculative.drafts.eagle3 import Eagle3DraftConfig, Eagle3DraftModel
from tandem.speculative.target.model import Eagle3TargetModel
from tandem.speculative.training.checkpoint import ResumeMismatchError
from tandem.speculative.training.config import TrainConfig
from tandem.speculative.training.eagle3_loss import soft_cross_entropy, ttt_loss
from tandem.speculative.training.trainer import Trainer, lr_at
from tandem.speculative.training.vocab import build_draft_vocab
from tests.conftest import build_tiny_llama, build_tiny_tokenizer, write_chat_data
from tests.speculative.tiny_runs import peaked_target, tiny_run_config


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
    def losses(run):
        return [json.loads(line)["loss"] for line in (run / "out" / "metrics.jsonl").read_text().splitlines()]

    assert losses(tmp_path / "a") == losses(tmp_path / "b")


def test_a_time_limit_stops_the_run_early_checkpointed_and_exported(tmp_path, caplog):
    # A limit of about 0.06 s: the first step already leaves no room for a second.
    config = tiny_run_config(tmp_path, total_steps=50, save_every=20, time_limit_min=0.001)
    trainer = Trainer(config, target=peaked_target(), tokenizer=build_tiny_tokenizer())
    with caplog.at_level("WARNING"):
        trainer.train()
    assert 1 <= trainer.step < 50
    assert f"stopping at step {trainer.step} of 50" in caplog.text
    assert (tmp_path / "out" / "checkpoints" / f"step_{trainer.step}.pt").is_file()
    assert (tmp_path / "out" / "eagle3-draft" / "model.safetensors").is_file()
    # The stopped run resumes where it stopped and goes on without a limit to the schedule's end.
    resumed = Trainer(tiny_run_config(tmp_path, total_steps=50, save_every=20, resume=True),
                      target=peaked_target(), tokenizer=build_tiny_tokenizer())
    resumed.train()
    assert resumed.step == 50


def test_a_resume_keeps_the_schedule_a_time_limit_fitted(tmp_path):
    # What --time-limit-min does when the run is slower than planned: config.total_steps shrinks mid-run.
    shortened = Trainer(tiny_run_config(tmp_path, total_steps=50, save_every=5, stop_at_step=5),
                        target=peaked_target(), tokenizer=build_tiny_tokenizer())
    shortened.config.total_steps = 12
    shortened.train()
    assert shortened.step == 5
    # Resumed with the flags it was started with, it continues the 12-step schedule, not the 50 asked for.
    resumed = Trainer(tiny_run_config(tmp_path, total_steps=50, save_every=5, resume=True),
                      target=peaked_target(), tokenizer=build_tiny_tokenizer())
    resumed.train()
    assert resumed.step == 12 and resumed.config.total_steps == 12
    # Another --total-steps than the run asked for is another run, refused as before.
    with pytest.raises(ResumeMismatchError, match="--total-steps: checkpoint 50, now 12"):
        Trainer(tiny_run_config(tmp_path, total_steps=12, save_every=5, resume=True),
                target=peaked_target(), tokenizer=build_tiny_tokenizer()).train()


def test_training_data_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl.*2"):
        Trainer(tiny_run_config(tmp_path, data=str(bad)), target=peaked_target(), tokenizer=build_tiny_tokenizer())
    with pytest.raises(ValueError, match="--data"):
        Trainer(tiny_run_config(tmp_path, data=""), target=peaked_target(), tokenizer=build_tiny_tokenizer())


def test_the_run_exports_in_the_targets_dtype_unless_told(tmp_path):
    # SGLang's --dtype auto turned a float32 draft beside a bfloat16 target into float16: export the target's.
    from safetensors.torch import load_file

    model = build_tiny_llama(seed=1).to(torch.bfloat16)
    trainer = Trainer(tiny_run_config(tmp_path), target=Eagle3TargetModel(model, [0, 1, 2]),
                      tokenizer=build_tiny_tokenizer())
    tensors = load_file(str(trainer.export() / "model.safetensors"))
    assert tensors["fc.weight"].dtype == torch.bfloat16
    assert torch.equal(tensors["embed_tokens.weight"], model.get_input_embeddings().weight)  # lossless
    trainer.config.export_dtype = "float32"
    assert load_file(str(trainer.export(tmp_path / "fp32") / "model.safetensors"))["fc.weight"].dtype == torch.float32


def test_live_evaluation_measures_what_eval_does_and_leaves_training_bit_identical(tmp_path):
    # --eval-every: the figures it logs are those `tandem eval`'s decoder gives for the same draft and prompts,
    # and the run's weights are those of the same run without it, bit for bit.
    from tandem.speculative.decoding.evaluation import teacher_forced_accuracy
    from tandem.speculative.training.data import prompt_ids, read_chat_jsonl

    prompts_path = write_chat_data(tmp_path / "prompts.jsonl", count=3)
    tokenizer = build_tiny_tokenizer()

    def run(name: str, **overrides) -> Trainer:
        trainer = Trainer(tiny_run_config(tmp_path / name, **overrides), target=peaked_target(seed=1),
                          tokenizer=tokenizer)
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
    assert rows[-1]["eval_step0_accuracy"] == teacher_forced_accuracy(measured.target, measured.draft, prompts, 8,
                                                                      stop_ids)


