"""The demo's final evaluation runs in a fresh process on the exported drafts: it must report what evaluating the
in-memory drafts reports."""

import json
from dataclasses import asdict

import torch

from tandem.demo import DemoConfig, _answer_evaluation_request, _evaluate
from tandem.models import load_target
from tandem.speculative.drafts.eagle3 import Eagle3DraftConfig, Eagle3DraftModel
from tandem.speculative.export.eagle3 import export_draft, load_exported_draft
from tandem.speculative.target.model import Eagle3TargetModel
from tests.speculative.remote.remote_utils import save_tiny_target


def test_the_evaluation_request_answers_what_the_in_memory_drafts_measure(tmp_path):
    directory = save_tiny_target(tmp_path / "target")
    model, tokenizer = load_target(str(directory), dtype="float32")
    target = Eagle3TargetModel(model)
    torch.manual_seed(0)
    draft = Eagle3DraftModel(Eagle3DraftConfig.from_target_config(model.config, 64))
    selected = torch.arange(64)
    t2d = torch.zeros(model.config.vocab_size, dtype=torch.bool)
    t2d[selected] = True
    draft.set_vocab(torch.zeros(64, dtype=torch.long), t2d)
    draft.seed_from_target(target.get_input_embeddings(), selected, seed_lm_head=True)
    export_draft(draft, tmp_path / "draft", dtype=torch.float32)
    config = DemoConfig(target=str(directory), dtype="float32", eval_prompts=2, eval_max_new_tokens=6,
                        generalisation_prompts=1, draft_tokens=2, tree="")
    request = {"config": asdict(config), "answer": str(tmp_path / "evaluation.json"),
               "drafts": {"untrained": str(tmp_path / "draft"), "trained": str(tmp_path / "draft")}}
    (tmp_path / "request.json").write_text(json.dumps(request))

    _answer_evaluation_request(str(tmp_path / "request.json"))
    answer = json.loads((tmp_path / "evaluation.json").read_text())

    reloaded = load_exported_draft(tmp_path / "draft")
    results, generalisation, _ = _evaluate(config, target, tokenizer, {"untrained": reloaded, "trained": reloaded})
    for name, summary in results.items():
        got = answer["results"][name]
        for key in ("prompts", "new_tokens", "acceptance_length", "outputs_match", "diverged", "exact_up_to_ties"):
            assert got[key] == summary.to_dict()[key], (name, key)
        assert got["outputs_match"]  # float32: speculative == greedy outright
    assert answer["generalisation"]["heldout_step0_accuracy"] == generalisation["heldout_step0_accuracy"]


def test_a_past_deadline_decodes_only_the_minimum_of_prompts(tmp_path):
    import time

    from tandem.speculative.decoding.evaluation import evaluate_drafts

    model, _ = load_target(str(save_tiny_target(tmp_path / "target")), dtype="float32")
    target = Eagle3TargetModel(model)
    torch.manual_seed(0)
    draft = Eagle3DraftModel(Eagle3DraftConfig.from_target_config(model.config, model.config.vocab_size))
    prompts = [torch.randint(3, 200, (1, 5)) for _ in range(4)]
    results = evaluate_drafts(target, {"d": draft}, prompts, 4, num_draft_tokens=2, progress=False,
                              deadline=time.perf_counter() - 1, min_prompts=2)
    assert results["d"].prompts == 2
    assert evaluate_drafts(target, {"d": draft}, prompts, 4, num_draft_tokens=2, progress=False)["d"].prompts == 4
