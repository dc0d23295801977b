"""``tandem demo --method dflash`` end to end on a tiny random target: regenerated data, training through a
serve-target subprocess, both exports, a fresh-process evaluation whose every output equals greedy decoding, and a
summary row per decode-time block size; the DFlash time budget fits its plan."""

import json

import pytest

from tandem.cli import main
from tandem.demo import DemoConfig
from tandem.demo_dflash import dflash_budget_plan, eval_block_sizes
from tandem.models import load_target
from tandem.speculative.export.dflash import DFLASH_ARCHITECTURE, is_dflash_export
from tests.conftest import save_tiny_target


def tiny_demo_config(tmp_path, **overrides) -> DemoConfig:
    fields = dict(out=str(tmp_path / "demo"), target=str(save_tiny_target(tmp_path / "target")), dtype="float32",
                  method="dflash", time_budget_min=0, train_prompts=8, regen_max_new_tokens=8, regen_batch_size=8,
                  total_steps=4, batch_size=2, max_seq_len=64, warmup_steps=1, block_size=4, draft_layers=1,
                  num_anchors=4, eval_block_sizes="2,4", eval_prompts=2, untrained_eval_prompts=1,
                  eval_max_new_tokens=6)
    fields.update(overrides)
    return DemoConfig(**fields)


def as_flags(config: DemoConfig) -> list[str]:
    defaults = DemoConfig()
    return [f"--{name.replace('_', '-')}={value}" for name, value in vars(config).items()
            if value != getattr(defaults, name)]


def test_the_dflash_demo_trains_remotely_exports_both_formats_and_decodes_equal_to_greedy(tmp_path, capsys):
    config = tiny_demo_config(tmp_path)
    assert main(["demo", *as_flags(config)]) == 0  # as typed: tandem demo --method dflash ...
    out = tmp_path / "demo"
    summary = json.loads((out / "summary-dflash.json").read_text())
    assert summary["method"] == "dflash" and summary["config"]["total_steps"] == 4
    assert [r["block_size"] for r in summary["trained"]] == [2, 4]
    assert [r["block_size"] for r in summary["untrained"]] == [2]
    for row in summary["trained"] + summary["untrained"]:
        assert row["outputs_match"] and row["new_tokens"] > 0 and row["acceptance_length"] >= 1.0
    assert summary["trained"][0]["prompts"] == 2 and summary["untrained"][0]["prompts"] == 1
    native = json.loads((out / "train-dflash" / "dflash-draft" / "config.json").read_text())
    speculators = json.loads((out / "train-dflash" / "dflash-draft-speculators" / "config.json").read_text())
    assert native["architectures"] == [DFLASH_ARCHITECTURE] and native["dflash_config"]["block_size"] == 4
    assert speculators["speculators_model_type"] == "dflash" and speculators["block_size"] == 4
    assert is_dflash_export(summary["exported_draft"]) and is_dflash_export(summary["exported_speculators"])
    assert (out / "training-dflash.png").is_file() and (out / "serve-target-dflash.log").is_file()
    assert (out / "train_regenerated.jsonl").is_file()  # the data, named as the EAGLE-3 demo's: both reuse it
    metrics = [json.loads(line) for line in (out / "train-dflash" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 4
    assert "DFlash speculative decoding of held-out prompts" in capsys.readouterr().out


def test_the_dflash_budget_fits_and_prices_each_decode_block(tmp_path):
    config = tiny_demo_config(tmp_path, time_budget_min=3, train_prompts=0)
    model, tokenizer = load_target(config.target, dtype="float32")
    plan = dflash_budget_plan(config, model, tokenizer, elapsed_s=1.0)
    assert set(plan.rates["round_s"]) == {2, 4} and plan.rates["train_step_s"] > 0
    assert plan.estimates_s["total_s"] <= 180 * 1.02 and plan.total_steps >= 20 and plan.live_eval_every == 0
    assert plan.estimates_s["train_s"] == pytest.approx(plan.total_steps * plan.rates["train_step_s"], abs=0.1)


@pytest.mark.parametrize("sizes", ["1,4", "2,8", "a", ""])
def test_decode_block_sizes_outside_the_trained_block_are_refused_before_anything_runs(tmp_path, sizes):
    with pytest.raises(ValueError, match="eval_block_sizes"):
        eval_block_sizes(DemoConfig(method="dflash", block_size=4, eval_block_sizes=sizes))
