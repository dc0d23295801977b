"""``auto``: the acceptance every shape would get, estimated from draft forwards alone, equals what real speculative
decoding measures; the round costs are measured for every shape; the choice decodes to the greedy output."""

import pytest
import torch

from tandem.speculative.decoding.acceptance_profile import acceptance_lengths, replay_rounds
from tandem.speculative.decoding.auto_shape import auto_shape, continuations, format_cost_curve
from tandem.speculative.decoding.evaluation import evaluate_speculative
from tandem.speculative.decoding.shape_choice import DecodingShape, candidate_shapes
from tandem.speculative.decoding.tree import TreeShape
from tests.speculative.tiny_runs import fit, on_own_continuations

SHAPES = [DecodingShape.chain(1), DecodingShape.chain(3), DecodingShape.of_tree(TreeShape(2, 2, 4)),
          DecodingShape.of_tree(TreeShape(3, 4, 8))]


@pytest.fixture(scope="module")
def trained():
    target, draft, prompts, supervision, mask = on_own_continuations(num_prompts=6, new_tokens=30)
    fit(draft, supervision, mask, steps=40, ttt_steps=3)
    return target, draft.eval(), prompts


def test_replaying_rounds_counts_what_a_decode_takes():
    # Root offsets 0..5 (6 tokens to produce after the prefill's): accept 2 (+1 bonus) -> offset 3, accept 0 -> 4,
    # accept 3 -> past the end.
    assert replay_rounds([2, 9, 9, 0, 3, 0]) == 3
    assert replay_rounds([0, 0, 0]) == 3
    assert replay_rounds([]) == 0


def test_estimated_acceptance_equals_real_speculative_decoding(trained):
    target, draft, prompts = trained
    sequences = continuations(target, prompts[:4], 24, set())
    estimated = acceptance_lengths(draft, sequences, SHAPES)
    for shape in SHAPES:
        kwargs = {"tree": shape.tree} if shape.kind == "tree" else {"num_draft_tokens": shape.draft_tokens}
        measured = evaluate_speculative(target, draft, prompts[:4], 24, progress=False, **kwargs)
        assert measured.outputs_match
        assert estimated[shape] == pytest.approx(measured.acceptance_length, rel=0.02), shape
    assert max(estimated.values()) > 1.5  # the draft learned something: the comparison is not 1.0 against 1.0


def test_auto_measures_every_shape_and_decodes_the_greedy_output(trained):
    target, draft, prompts = trained
    shapes = candidate_shapes(max_chain=3, top_ks=(2, 4), depths=(2, 3), sizes=(4, 8))
    choice = auto_shape(target, draft, prompts[4:6], 24, set(), shapes=shapes)
    assert len(choice.estimates) == len(shapes)  # every candidate's costs were measured
    assert set(choice.costs.verify_ms) == {1, 2, 3, 4} and set(choice.costs.tree_verify_ms) == {5, 9}
    assert all(ms > 0 for ms in [*choice.costs.verify_ms.values(), *choice.costs.draft_ms.values()])
    assert choice.calibration["prompts"] == 2
    assert "chosen:" in format_cost_curve(choice)
    best = choice.best_speculative.shape
    kwargs = {"tree": best.tree} if best.kind == "tree" else {"num_draft_tokens": best.draft_tokens}
    assert evaluate_speculative(target, draft, prompts[:2], 24, progress=False, **kwargs).outputs_match


def test_serving_flags_match_the_shape():
    from tandem.speculative.export.recommendation import serving_flags

    chain = serving_flags(DecodingShape.parse("chain 3"))
    assert chain["sglang"] == ["--speculative-num-steps", "3", "--speculative-eagle-topk", "1",
                               "--speculative-num-draft-tokens", "4"]  # SGLang counts the committed token too
    assert chain["vllm"] == {"num_speculative_tokens": 3}
    tree = serving_flags(DecodingShape.parse("tree 3,8,24"))
    assert tree["sglang"][1::2] == ["3", "8", "25"] and tree["vllm"] == {"num_speculative_tokens": 3}
    assert serving_flags(DecodingShape.parse("plain")) == {"sglang": [], "vllm": None}
    with pytest.raises(ValueError, match="decoding shape"):
        DecodingShape.parse("chain two")


def test_eval_auto_prints_the_choice_and_records_it_beside_the_draft(tmp_path, capsys):
    import json

    from tandem.cli import main
    from tandem.models import load_target
    from tandem.speculative.drafts.eagle3 import Eagle3DraftConfig, Eagle3DraftModel
    from tandem.speculative.export.eagle3 import export_draft
    from tandem.speculative.export.recommendation import read_recommendation
    from tests.conftest import write_chat_data
    from tests.speculative.remote.remote_utils import save_tiny_target

    target_dir = save_tiny_target(tmp_path / "target")
    model, _ = load_target(str(target_dir))
    torch.manual_seed(0)
    export_draft(Eagle3DraftModel(Eagle3DraftConfig.from_target_config(model.config, 320)), tmp_path / "draft")
    prompts = write_chat_data(tmp_path / "prompts.jsonl", count=3)
    common = ["--log-level", "WARNING", "eval", "--draft", str(tmp_path / "draft"), "--model", str(target_dir),
              "--prompts", str(prompts), "--limit", "2", "--calibration-prompts", "1", "--max-new-tokens", "8"]
    assert main(common + ["--tree", "auto"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out[captured.out.index("{"):])
    assert report["outputs_match"] and report["decoded_shape"] == report["shape_choice"]["candidates"][0]["shape"]
    assert "cost of verifying n tokens" in captured.err and "note:" in captured.err
    record = read_recommendation(tmp_path / "draft")
    assert record["shape"] == report["shape"] and record["machine"]["cores"] >= 1 and record["dtype"] == "float32"
    if report["shape"] == "plain":  # tandem decodes plainly: 1.00x by definition, and serves without the draft
        assert report["speedup"] == 1.0 and record["serving_flags"]["sglang"] == []
    else:  # the best shape cleared the margin: it is what was decoded and measured
        assert report["shape"] == report["decoded_shape"] and report["predicted_speedup"] >= 1.05
        assert report["speedup"] == pytest.approx(report["decoded_shape_measured_speedup"], abs=1e-3)
        assert record["serving_flags"]["sglang"]
    assert main(common + ["--draft-tokens", "auto", "--no-record-shape"]) == 0
    report = json.loads((out := capsys.readouterr().out)[out.index("{"):])
    assert all(c["shape"].startswith("chain") for c in report["shape_choice"]["candidates"])


def test_live_evaluation_auto_decodes_with_the_best_shape_it_measured(tmp_path):
    import json

    from tandem.speculative.training.trainer import Trainer
    from tests.conftest import build_tiny_tokenizer, write_chat_data
    from tests.speculative.tiny_runs import peaked_target, tiny_run_config

    prompts_path = write_chat_data(tmp_path / "prompts.jsonl", count=2)
    config = tiny_run_config(tmp_path, eval_every=4, eval_prompts=str(prompts_path), eval_limit=2,
                             eval_max_new_tokens=8, eval_tree="auto")
    trainer = Trainer(config, target=peaked_target(seed=1), tokenizer=build_tiny_tokenizer())
    trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    measured = [r for r in rows if "eval_acceptance_length" in r]
    assert [r["step"] for r in measured] == [4, 8]
    for row in measured:
        decoded = DecodingShape.parse(row["eval_decoded_shape"])
        assert decoded.kind in ("chain", "tree") and row["eval_predicted_speedup"] > 0
        assert row["eval_shape"] in ("plain", row["eval_decoded_shape"]) and row["eval_outputs_match"]
