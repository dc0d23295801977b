"""DFlash training: the one-pass training mask equals blocks run one at a time (loss and gradients), the mask
itself, and a DFlash run end to end: it trains, checkpoints without the target's frozen weights, resumes
exactly, exports, and a checkpoint of another method is refused naming both."""

import json

import pytest
import torch

from tandem.speculative.drafts.dflash import DFlashDraftConfig, DFlashDraftModel, block_attention_mask
from tandem.speculative.target.model import Eagle3TargetModel
from tandem.speculative.training import checkpoint
from tandem.speculative.training.checkpoint import ResumeMismatchError
from tandem.speculative.training.dflash_loss import LOSS_KINDS, DFlashObjective, sample_anchors, weight_sum
from tandem.speculative.training.dflash_trainer import DFlashTrainer
from tandem.speculative.training.trainer import Trainer, train
from tests.conftest import build_tiny_llama, build_tiny_tokenizer
from tests.speculative.tiny_runs import tiny_run_config


def tiny_draft(dtype=torch.float64) -> DFlashDraftModel:
    torch.manual_seed(0)
    config = DFlashDraftConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=8, vocab_size=50, block_size=4,
                               target_layer_ids=[0, 2], mask_token_id=49)
    draft = DFlashDraftModel(config)
    draft.set_target_weights(torch.randn(50, 32), torch.randn(50, 32))
    return draft.to(dtype)


def tiny_supervision(dtype=torch.float64):
    generator = torch.Generator().manual_seed(1)
    batch, seq = 2, 24
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    attention_mask[1, 17:] = 0
    trained = attention_mask.clone()
    trained[:, :4] = 0
    supervision = {"aux_hidden_states": torch.randn(batch, seq, 64, generator=generator, dtype=dtype),
                   "final_hidden_states": torch.randn(batch, seq, 32, generator=generator, dtype=dtype),
                   "tokens": torch.randint(0, 49, (batch, seq), generator=generator), "trained": trained,
                   "attention_mask": attention_mask}
    anchors, valid = sample_anchors(trained, [24, 17], 6, [3, 4])
    return {**supervision, "anchors": anchors, "anchor_valid": valid}


@pytest.mark.parametrize("loss_kind", LOSS_KINDS)
def test_all_blocks_in_one_pass_equal_blocks_one_at_a_time(loss_kind):
    draft, supervision = tiny_draft(), tiny_supervision()
    objective = DFlashObjective(draft, 4, 4.0, loss_kind)
    normalizer = weight_sum(supervision, supervision["attention_mask"], 4, 4.0)
    all_at_once = objective(supervision, supervision["attention_mask"], normalizer).loss
    all_at_once.backward()
    together = {name: p.grad.clone() for name, p in draft.named_parameters() if p.grad is not None}
    draft.zero_grad()
    total = 0.0
    for n in range(supervision["anchors"].shape[1]):
        one = {**supervision, "anchors": supervision["anchors"][:, n:n + 1],
               "anchor_valid": supervision["anchor_valid"][:, n:n + 1]}
        loss = objective(one, supervision["attention_mask"], normalizer).loss
        loss.backward()
        total += float(loss.detach())
    torch.testing.assert_close(float(all_at_once.detach()), total, rtol=1e-12, atol=0)
    # (RMSNorm normalises in float32 whatever the input, so gradients summed in another order differ at ~1e-8.)
    assert set(together) == {name for name, p in draft.named_parameters() if p.requires_grad}
    for name, grad in together.items():
        torch.testing.assert_close(grad, dict(draft.named_parameters())[name].grad, rtol=1e-5, atol=1e-7)


def test_the_training_mask_sees_the_context_before_the_anchor_and_the_whole_own_block():
    anchors = torch.tensor([[2, 5]])
    valid = torch.tensor([[1, 1, 1, 1, 1, 1, 0]]).bool()
    mask = block_attention_mask(anchors, 7, 3, valid)[0]
    for query in range(6):
        block, anchor = query // 3, int(anchors[0, query // 3])
        for key in range(7 + 6):
            if key < 7:
                expected = key < anchor and bool(valid[0, key])
            else:
                expected = (key - 7) // 3 == block
            assert bool(mask[query, key]) == expected, (query, key)


def test_anchors_are_trained_positions_whose_next_token_is_trained():
    trained = torch.tensor([[0, 0, 1, 1, 1, 0, 1, 1, 0, 0]])
    anchors, valid = sample_anchors(trained, [9], 10, [0])
    assert anchors[valid].tolist() == [2, 3, 6]


@pytest.fixture()
def dflash_target():
    model = build_tiny_llama(seed=0)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)  # peaked distributions: something to learn
    return Eagle3TargetModel(model, draft_method="dflash", num_draft_layers=2)


def dflash_config(tmp_path, name: str, **overrides):
    fields = dict(method="dflash", draft_layers=2, block_size=4, num_anchors=6, total_steps=6, save_every=3,
                  output_dir=str(tmp_path / name))
    fields.update(overrides)
    return tiny_run_config(tmp_path, **fields)


def test_a_dflash_run_trains_checkpoints_resumes_exactly_and_exports(tmp_path, dflash_target):
    whole = train(dflash_config(tmp_path, "whole"), target=dflash_target, tokenizer=build_tiny_tokenizer(),
                  trainer_class=DFlashTrainer)
    assert whole.draft.config.mask_token_id == 259  # the tiny tokenizer's 259 ids leave rows 259.. unused
    assert whole.draft.config.target_layer_ids == [0, 2]
    train(dflash_config(tmp_path, "split", stop_at_step=3), target=dflash_target, tokenizer=build_tiny_tokenizer(),
          trainer_class=DFlashTrainer)
    resumed = train(dflash_config(tmp_path, "split", resume=True), target=dflash_target,
                    tokenizer=build_tiny_tokenizer(), trainer_class=DFlashTrainer)
    assert resumed.step == whole.step == 6
    for (name, a), b in zip(whole.draft.state_dict().items(), resumed.draft.state_dict().values()):
        assert torch.equal(a, b), name
    rows = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    tail = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == [r["loss"] for r in tail]
    assert len(rows[0]["step_accuracies"]) == 3 and rows[-1]["loss"] < rows[0]["loss"]
    state = checkpoint.load_training_state(checkpoint.checkpoint_path(tmp_path / "whole", 6))
    assert "lm_head.weight" not in state["draft"] and "embed_tokens.weight" not in state["draft"]
    assert json.loads(state["record"])["draft_method"] == "dflash"
    exported = json.loads((tmp_path / "whole" / "dflash-draft" / "config.json").read_text())
    assert exported["architectures"] == ["DFlashDraftModel"]
    assert exported["dflash_config"]["target_layer_ids"] == [0, 2] and exported["block_size"] == 4


def test_resuming_another_methods_checkpoint_is_refused_naming_both(tmp_path, dflash_target):
    eagle_target = Eagle3TargetModel(dflash_target.model, aux_layer_ids=[0, 1, 2])
    config = tiny_run_config(tmp_path, total_steps=2, save_every=2, ttt_steps=2)
    train(config, target=eagle_target, tokenizer=build_tiny_tokenizer())
    with pytest.raises(ResumeMismatchError, match=r"--method: checkpoint 'eagle3', now 'dflash'"):
        train(dflash_config(tmp_path, "out", resume=True, total_steps=4), target=dflash_target,
              tokenizer=build_tiny_tokenizer(), trainer_class=DFlashTrainer)
    with pytest.raises(ValueError, match="dflash run needs its own trainer"):
        train(dflash_config(tmp_path, "other"), target=dflash_target, tokenizer=build_tiny_tokenizer(),
              trainer_class=Trainer)


def test_live_evaluation_of_a_dflash_run_measures_real_decoding_and_leaves_training_unchanged(tmp_path, dflash_target):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"go {i}"}]}) + "\n"
                               for i in range(2)))
    plain = train(dflash_config(tmp_path, "plain"), target=dflash_target, tokenizer=build_tiny_tokenizer(),
                  trainer_class=DFlashTrainer)
    measured = train(dflash_config(tmp_path, "measured", eval_every=3, eval_prompts=str(prompts), eval_limit=2,
                                   eval_max_new_tokens=8), target=dflash_target, tokenizer=build_tiny_tokenizer(),
                     trainer_class=DFlashTrainer)
    for (name, a), b in zip(plain.draft.state_dict().items(), measured.draft.state_dict().values()):
        assert torch.equal(a, b), name  # the measurements changed nothing in the training
    rows = [json.loads(line) for line in (tmp_path / "measured" / "metrics.jsonl").read_text().splitlines()]
    evaluated = [r for r in rows if "eval_acceptance_length" in r]
    assert [r["step"] for r in evaluated] == [3, 6]
    for row in evaluated:
        assert row["eval_outputs_match"] and row["eval_prompts"] == 2 and row["eval_block_size"] == 4
        assert row["eval_acceptance_length"] >= 1.0 and row["eval_new_tokens"] > 0
    with pytest.raises(ValueError, match="--eval-tree drafts EAGLE-3 trees"):
        dflash_config(tmp_path, "tree", eval_every=3, eval_tree="3,8,24")
