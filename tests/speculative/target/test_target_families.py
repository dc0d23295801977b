"""The target families users serve, each a tiny random model built from a config (see ``target_families.py``).

For every family: a draft trains two steps on chosen aux layers, is exported in both formats, each serving
engine's reading of the export captures exactly the layers trained on (by index and by value, with the rules of
``test_engine_conformance.py``), and speculative decoding equals greedy decoding. What a family needs beyond a
Llama (MLA's head geometry, a VLM's text config, a hybrid's recurrent state) is handled where it belongs; a
model tandem cannot serve is refused with a one-line error that names what it lacks.
"""

from __future__ import annotations

import pytest
import torch

from tandem.speculative.decoding.decode import for_decoding, greedy_decode, speculative_decode
from tandem.speculative.export import eagle3 as draft_export
from tandem.speculative.target.model import Eagle3TargetModel, UnsupportedTargetError
from tandem.speculative.training.config import TrainConfig
from tandem.speculative.training.trainer import Trainer
from tests.conftest import build_tiny_tokenizer, write_chat_data
from tests.speculative.export.test_engine_conformance import ENGINES, engine_aux_inputs, engine_config
from tests.speculative.target_families import FAMILIES, NUM_LAYERS, VISION_LANGUAGE, build_family_target

pytestmark = pytest.mark.timeout(300)

TRAINED_LAYERS = [0, 2, 3]  # no engine's default for 6 layers ([2, 3, 3] as inputs): a fallback would be caught


def _train_and_export(model_type: str, root):
    model = build_family_target(model_type, seed=3)
    target = Eagle3TargetModel(model, aux_layer_ids=TRAINED_LAYERS)
    config = TrainConfig(data=str(write_chat_data(root / "data.jsonl", count=8, answer_words=6)),
                         output_dir=str(root / "out"), total_steps=2, batch_size=4, max_seq_len=40,
                         draft_vocab_size=120, warmup_steps=1, ttt_steps=2, save_every=2, show_progress=False,
                         learning_rate=3e-2, dtype="float32")
    trainer = Trainer(config, target=target, tokenizer=build_tiny_tokenizer())
    trainer.train()
    exports = {"sglang": root / "out" / draft_export.EXPORT_DIRNAME, "speculators": root / "speculators"}
    draft_export.export_draft(trainer.draft, exports["speculators"], aux_layer_ids=TRAINED_LAYERS,
                              export_format="speculators", verifier="tiny-target")
    return model, target, trainer.draft, exports


@pytest.mark.parametrize("model_type", list(FAMILIES) + list(VISION_LANGUAGE))
def test_family_trains_exports_is_read_by_every_engine_and_decodes_equal_to_greedy(model_type, tmp_path):
    model, target, draft, exports = _train_and_export(model_type, tmp_path)
    ids = torch.randint(3, 250, (1, 9))
    with torch.no_grad():
        states = model(input_ids=ids, output_hidden_states=True).hidden_states  # [j]: the input of layer j
    trained_aux = target.generate_batch(ids, torch.ones_like(ids), torch.ones_like(ids)).aux_hidden_states
    for rules in ENGINES:
        inputs = engine_aux_inputs(rules, engine_config(rules, exports[rules.export_format]), NUM_LAYERS)
        assert inputs == [i + 1 for i in TRAINED_LAYERS], f"{rules.name} captures the inputs of layers {inputs}"
        torch.testing.assert_close(torch.cat([states[i] for i in inputs], -1), trained_aux, rtol=0, atol=0)
    shape = draft.config
    assert shape.num_attention_heads % shape.num_key_value_heads == 0 and shape.hidden_size == target.config.hidden_size
    prompt = torch.randint(3, 250, (1, 6))
    greedy = greedy_decode(target, prompt, 12)
    assert speculative_decode(target, for_decoding(draft, target.dtype), prompt, 12, 3).tokens == greedy.tokens


def test_mla_targets_get_the_documented_draft_attention_not_their_latent_heads():
    from transformers import AutoConfig

    from tandem.speculative.drafts.eagle3 import MLA_DRAFT_HEAD_DIM, MLA_DRAFT_KV_HEADS, Eagle3DraftConfig

    deepseek = AutoConfig.for_model("deepseek_v3")  # the released geometry: hidden 7168, 128 latent heads
    shape = Eagle3DraftConfig.from_target_config(deepseek, 32000)
    assert (shape.num_attention_heads, shape.num_key_value_heads, shape.head_dim) == (
        deepseek.hidden_size // MLA_DRAFT_HEAD_DIM, MLA_DRAFT_KV_HEADS, MLA_DRAFT_HEAD_DIM)
    assert shape.head_dim != deepseek.qk_rope_head_dim + deepseek.qk_nope_head_dim


def test_a_model_without_decoder_layers_is_refused_by_name():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("gpt2", vocab_size=320, n_embd=64, n_layer=4, n_head=4, n_positions=64)
    with pytest.raises(UnsupportedTargetError, match="GPT2LMHeadModel.*model.layers") as refused:
        Eagle3TargetModel(AutoModelForCausalLM.from_config(config))
    assert "\n" not in str(refused.value)
