"""The draft: TTT attention against explicit masked attention; cached decoding attention; export format."""

import json

import pytest
import torch

from tandem.speculative.drafts.eagle3 import DraftKVCache, Eagle3DraftConfig, Eagle3DraftModel, ttt_attention
from tandem.speculative.export.eagle3 import EXPORT_WEIGHT_KEYS, export_draft, load_exported_draft
from tandem.speculative.training.checkpoint import latest_checkpoint, load_training_state, save_training_state


def tiny_config(**overrides) -> Eagle3DraftConfig:
    fields = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                  vocab_size=50, draft_vocab_size=20, target_hidden_size=24, max_position_embeddings=128)
    fields.update(overrides)
    return Eagle3DraftConfig(**fields)


def explicit_step_attention(query, keys, values, padding):
    """Attention over every key of every step with an explicit [S, (k+1)S] mask."""
    steps, (batch, _, seq, dim) = len(keys), query.shape
    all_keys, all_values = torch.cat(keys, dim=2), torch.cat(values, dim=2)
    allowed = torch.zeros(batch, seq, steps * seq, dtype=torch.bool)
    for i in range(seq):
        for j in range(i + 1):
            allowed[:, i, j] = padding[:, j]
        for step in range(1, steps):
            allowed[:, i, step * seq + i] = True
    scores = query @ all_keys.transpose(-1, -2) / dim ** 0.5
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return torch.softmax(scores, -1) @ all_values


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_ttt_attention_equals_explicit_per_step_masked_attention(steps):
    torch.manual_seed(steps)
    shape = (2, 3, 6, 8)
    query = torch.randn(shape)
    keys = [torch.randn(shape) for _ in range(steps)]
    values = [torch.randn(shape) for _ in range(steps)]
    padding = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    torch.testing.assert_close(ttt_attention(query, keys, values, padding),
                               explicit_step_attention(query, keys, values, padding), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("steps", [1, 3])
def test_grouped_ttt_attention_equals_attention_over_repeated_key_value_heads(steps):
    torch.manual_seed(steps)
    query = torch.randn(2, 6, 5, 8)  # 6 query heads over 2 key/value heads: head h reads key/value head h // 3
    keys = [torch.randn(2, 2, 5, 8) for _ in range(steps)]
    values = [torch.randn(2, 2, 5, 8) for _ in range(steps)]
    padding = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    repeat = [t.repeat_interleave(3, dim=1) for t in keys], [t.repeat_interleave(3, dim=1) for t in values]
    torch.testing.assert_close(ttt_attention(query, keys, values, padding),
                               explicit_step_attention(query, *repeat, padding), rtol=1e-5, atol=1e-5)


def test_cached_decoding_equals_one_full_causal_forward():
    torch.manual_seed(0)
    draft = Eagle3DraftModel(tiny_config()).eval()
    ids = torch.randint(0, 50, (1, 7))
    hidden = torch.randn(1, 7, 32)
    positions = torch.arange(7).unsqueeze(0)
    full = draft.step(ids, hidden, positions)
    cache = DraftKVCache()
    first = draft.step(ids[:, :4], hidden[:, :4], positions[:, :4], kv_cache=cache)
    rest = [draft.step(ids[:, i:i + 1], hidden[:, i:i + 1], positions[:, i:i + 1], kv_cache=cache) for i in range(4, 7)]
    torch.testing.assert_close(torch.cat([first, *rest], 1), full, rtol=1e-5, atol=1e-5)
    assert cache.length == 7
    cache.crop(5)
    assert cache.length == 5


def test_ttt_step_zero_equals_plain_causal_forward():
    torch.manual_seed(1)
    draft = Eagle3DraftModel(tiny_config()).eval()
    ids = torch.randint(0, 50, (2, 5))
    hidden = torch.randn(2, 5, 32)
    positions = torch.arange(5).expand(2, 5)
    torch.testing.assert_close(draft.step(ids, hidden, positions, ttt_cache=[],
                                          key_padding_mask=torch.ones(2, 5, dtype=torch.bool)),
                               draft.step(ids, hidden, positions), rtol=1e-5, atol=1e-5)


def test_export_keys_config_and_round_trip(tmp_path):
    torch.manual_seed(0)
    draft = Eagle3DraftModel(tiny_config(extra={"bos_token_id": 1, "eos_token_id": 2}))
    d2t = torch.arange(20) * 2 - torch.arange(20)
    t2d = torch.zeros(50, dtype=torch.bool)
    t2d[torch.arange(20) * 2] = True
    draft.set_vocab(d2t, t2d)
    out = export_draft(draft, tmp_path / "draft", aux_layer_ids=[1, 5, 9])
    from safetensors.torch import load_file

    tensors = load_file(str(out / "model.safetensors"))
    assert sorted(tensors) == sorted(EXPORT_WEIGHT_KEYS)
    assert tensors["fc.weight"].shape == (32, 72)
    assert tensors["midlayer.self_attn.q_proj.weight"].shape == (32, 64)
    assert tensors["lm_head.weight"].shape == (20, 32)
    assert tensors["d2t"].dtype == torch.int64 and tensors["t2d"].dtype == torch.bool
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"]
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "rms_norm_eps",
                "rope_theta", "max_position_embeddings"):
        assert key in config
    assert config["vocab_size"] == 50 and config["draft_vocab_size"] == 20 and config["target_hidden_size"] == 24
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 5, 9]  # SGLang's numbering
    assert config["eagle_aux_hidden_state_layer_ids"] == [2, 6, 10]  # vLLM's: id k is the input of layer k
    assert config["torch_dtype"] == "float32"
    loaded = load_exported_draft(out)
    for key, value in draft.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert not loaded.embed_tokens.weight.requires_grad


def test_whole_vocabulary_draft_is_exported_without_d2t_t2d_and_loads_back(tmp_path):
    # vLLM keeps no draft-to-target map when Vd == V and refuses a d2t then; tandem's loader takes its absence.
    torch.manual_seed(0)
    draft = Eagle3DraftModel(tiny_config(draft_vocab_size=50))
    out = export_draft(draft, tmp_path / "d", aux_layer_ids=[0, 1, 2])
    from safetensors.torch import load_file

    assert not {"d2t", "t2d"} & set(load_file(str(out / "model.safetensors")))
    loaded = load_exported_draft(out)
    assert torch.equal(loaded.d2t, torch.zeros(50, dtype=torch.long)) and bool(loaded.t2d.all())
    assert torch.equal(loaded.lm_head.weight, draft.lm_head.weight)


def test_reduced_vocabulary_without_d2t_is_refused(tmp_path):
    out = export_draft(Eagle3DraftModel(tiny_config()), tmp_path / "d", aux_layer_ids=[0, 1, 2])
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(out / "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if k not in ("d2t", "t2d")}, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match="no d2t but its draft vocabulary"):
        load_exported_draft(out)


def test_export_in_bfloat16_keeps_a_bfloat16_embedding_bit_exact(tmp_path):
    torch.manual_seed(0)
    draft = Eagle3DraftModel(tiny_config())
    embedding = torch.randn(50, 32).to(torch.bfloat16)  # a bf16 target's embedding, as the draft is seeded
    draft.seed_from_target(embedding)
    out = export_draft(draft, tmp_path / "d", torch.bfloat16, aux_layer_ids=[0, 1, 2])
    from safetensors.torch import load_file

    tensors = load_file(str(out / "model.safetensors"))
    assert tensors["fc.weight"].dtype == torch.bfloat16 and tensors["d2t"].dtype == torch.int64
    assert torch.equal(tensors["embed_tokens.weight"], embedding)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_speculators_format_round_trips_and_names_layers_the_vllm_way(tmp_path):
    torch.manual_seed(0)
    draft = Eagle3DraftModel(tiny_config())
    out = export_draft(draft, tmp_path / "s", aux_layer_ids=[1, 5, 9], export_format="speculators",
                       verifier="org/target", verifier_architectures=["LlamaForCausalLM"], speculative_tokens=4)
    config = json.loads((out / "config.json").read_text())
    assert config["speculators_model_type"] == "eagle3" and config["norm_before_residual"] is False
    assert config["eagle_aux_hidden_state_layer_ids"] == [2, 6, 10]
    assert config["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 4
    assert config["transformer_layer_config"]["num_hidden_layers"] == 1
    from safetensors.torch import load_file

    assert any(k.startswith("layers.0.") for k in load_file(str(out / "model.safetensors")))
    loaded = load_exported_draft(out)
    for key, value in draft.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    from tandem.speculative.export.eagle3 import exported_aux_layer_ids

    assert exported_aux_layer_ids(out) == [1, 5, 9]
    with pytest.raises(ValueError, match="needs the aux layer ids and the verifier"):
        export_draft(draft, tmp_path / "t", aux_layer_ids=[1, 5, 9], export_format="speculators")


def test_export_omits_target_hidden_size_when_equal(tmp_path):
    out = export_draft(Eagle3DraftModel(tiny_config(target_hidden_size=32)), tmp_path / "d")
    assert "target_hidden_size" not in json.loads((out / "config.json").read_text())


def test_load_exported_draft_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_exported_draft(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="not an EAGLE-3 draft"):
        load_exported_draft(tmp_path)


def test_training_state_is_atomic_and_latest_is_found(tmp_path):
    save_training_state({"step": 3, "w": torch.ones(2)}, tmp_path / "step_3.pt")
    save_training_state({"step": 12, "w": torch.zeros(2)}, tmp_path / "step_12.pt")
    (tmp_path / "step_x.pt").write_bytes(b"junk")
    assert latest_checkpoint(tmp_path).name == "step_12.pt"
    assert load_training_state(tmp_path / "step_12.pt")["step"] == 12
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind
