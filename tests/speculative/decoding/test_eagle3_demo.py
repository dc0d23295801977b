"""``tandem demo`` (EAGLE-3) end to end on a tiny random target: regenerated data, training through a serve-target
subprocess with a live evaluation, a fresh-process evaluation on held-out and unseen prompts whose every output
equals greedy decoding, the export and the summary."""

import json

from tandem.cli import main
from tests.conftest import TINY_VOCAB_SIZE, save_tiny_target


def test_the_demo_trains_remotely_evaluates_held_out_and_unseen_prompts_and_exports(tmp_path, capsys):
    target = save_tiny_target(tmp_path / "target")
    out = tmp_path / "demo"
    flags = {"out": out, "target": target, "dtype": "float32", "time-budget-min": 0, "train-prompts": 8,
             "regen-max-new-tokens": 8, "regen-batch-size": 8, "total-steps": 4, "batch-size": 2,
             "max-seq-len": 64, "warmup-steps": 1, "draft-vocab-size": min(64, TINY_VOCAB_SIZE), "tree": "",
             "draft-tokens": 2, "eval-prompts": 2, "unseen-prompts": 1, "untrained-eval-prompts": 1,
             "eval-max-new-tokens": 6, "generalisation-prompts": 1, "live-eval-every": 2, "live-eval-prompts": 1,
             "live-eval-max-new-tokens": 4}
    assert main(["demo", *[f"--{name}={value}" for name, value in flags.items()]]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["total_steps"] == 4
    assert summary["trained"]["prompts"] == 2 and summary["untrained"]["prompts"] == 1
    assert summary["trained_unseen"]["prompts"] == 1
    for name in ("trained", "untrained", "trained_unseen"):
        assert summary[name]["outputs_match"] and summary[name]["new_tokens"] > 0
    assert {"server_and_setup_s", "supervision_cache_s", "train_s", "evaluate_s"} <= set(summary["phases"])
    metrics = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in metrics] == [1, 2, 3, 4]
    assert "eval_acceptance_length" in metrics[1] and "eval_acceptance_length" in metrics[3]
    assert (out / "train" / "eagle3-draft" / "model.safetensors").is_file()
    assert (out / "training.png").is_file() and (out / "serve-target.log").is_file()
    assert "trained, unseen" in capsys.readouterr().out
