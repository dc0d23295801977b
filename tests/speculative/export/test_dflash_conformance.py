"""DFlash engine conformance: SGLang and vLLM (native format) and vLLM's speculators adapter read tandem's DFlash
export exactly as it was trained.

Each engine's reading rules are data (``ENGINES``), every rule with the source it was read from. The tests apply
them to tandem's real export of a tiny trained DFlash draft and check that

- the target layers each engine captures are the ones the draft was trained on: by index, and by value on a tiny
  target, where an engine's capture (a decoder layer's *input*, i.e. transformers' ``hidden_states[id]``) is
  compared with tandem's own context states (the layer's *output*, ``hidden_states[i + 1]``). vLLM adds one to
  ``dflash_config.target_layer_ids``; before its PR #40727 it did not, and a draft then read the layer below the
  one it was trained on;
- every exported weight lands on an engine parameter of the right shape (q/k/v and gate/up into the fused shards),
  every parameter is filled once, and the draft carries no embedding or head (both engines use the target's);
- the export carries tandem's record of the target it was trained against.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file

from tandem.speculative.drafts.dflash import DFlashDraftConfig, DFlashDraftModel
from tandem.speculative.export.dflash import (
    dflash_config_from,
    export_dflash_draft,
    load_dflash_draft,
    read_dflash_record,
)
from tandem.speculative.target import identity
from tandem.speculative.target.model import Eagle3TargetModel
from tests.conftest import build_tiny_llama


@dataclass(frozen=True)
class Source:
    repo: str
    path: str
    commit: str
    where: str


@dataclass(frozen=True)
class EngineRules:
    """How one engine reads a DFlash draft directory."""

    name: str
    export_format: str
    capture_inputs: Callable[[dict], list[int]]
    """config.json -> the decoder layers whose *input* the engine captures, in ``fc``'s order."""
    fused: dict
    """Checkpoint weight suffix -> (engine parameter suffix, shard): q/k/v and gate/up go into fused parameters."""
    sources: tuple[Source, ...]


def _sglang_inputs(config: dict) -> list[int]:
    # DFlashDraftConfig.resolve_target_layer_ids reads dflash_config.target_layer_ids (layer outputs, HF numbering);
    # SGLang records the input of layer id + 1 (its capture runs "before layer i").
    return [i + 1 for i in config["dflash_config"]["target_layer_ids"]]


def _vllm_inputs(config: dict) -> list[int]:
    # get_eagle3_aux_layers_from_config: eagle_aux_hidden_state_layer_ids verbatim, else dflash_config
    # target_layer_ids + 1; the runner's aux id k is the input of decoder layer k.
    if config.get("eagle_aux_hidden_state_layer_ids"):
        return list(config["eagle_aux_hidden_state_layer_ids"])
    return [i + 1 for i in config["dflash_config"]["target_layer_ids"]]


def _speculators_inputs(config: dict) -> list[int]:
    # vLLM's speculators adapter (update_dflash): aux_hidden_state_layer_ids become the runner's
    # eagle_aux_hidden_state_layer_ids verbatim, and dflash_config.target_layer_ids = aux - 1 (#40727).
    runner = {"eagle_aux_hidden_state_layer_ids": list(config["aux_hidden_state_layer_ids"]),
              "dflash_config": {"target_layer_ids": [i - 1 for i in config["aux_hidden_state_layer_ids"]]}}
    return _vllm_inputs(runner)


FUSED = {"self_attn.q_proj.weight": ("self_attn.qkv_proj.weight", 0), "self_attn.k_proj.weight":
         ("self_attn.qkv_proj.weight", 1), "self_attn.v_proj.weight": ("self_attn.qkv_proj.weight", 2),
         "mlp.gate_proj.weight": ("mlp.gate_up_proj.weight", 0), "mlp.up_proj.weight": ("mlp.gate_up_proj.weight", 1)}

ENGINES = (
    EngineRules("sglang", "native", _sglang_inputs, FUSED, (
        Source("sgl-project/sglang", "python/sglang/srt/models/dflash.py", "003b23d7388eabdfbfecd2610c7e228f9f6a2734",
               "DFlashDraftModel.__init__ (layers.*, fc, hidden_norm, norm; no embedding or lm_head), DFlashAttention "
               "(QKVParallelLinear), DFlashMLP (MergedColumnParallelLinear)"),
        Source("sgl-project/sglang", "python/sglang/srt/speculative/dflash_utils.py",
               "7f151c5ebdb3af4467c2a5d3ccc5f54e71d2ba35",
               "build_target_layer_ids docstring (captures before layer i: +1), "
               "DFlashDraftConfig.resolve_target_layer_ids"),
    )),
    EngineRules("vllm", "native", _vllm_inputs, FUSED, (
        Source("vllm-project/vllm", "vllm/v1/worker/gpu/spec_decode/eagle/eagle3_utils.py",
               "0cfdd2e15d6991f354c6e22fd7f7e7577afe0424", "get_eagle3_aux_layers_from_config (dflash: +1)"),
        Source("vllm-project/vllm", "vllm/model_executor/models/qwen3_dflash.py",
               "036a00d1f5d00d449d02dce9babdd15a5b4d06c9",
               "DFlashQwen3Model.hf_to_vllm_mapper (stacked q/k/v, gate/up), _get_dflash_fc_input_size"),
    )),
    EngineRules("vllm-speculators", "speculators", _speculators_inputs, FUSED, (
        Source("vllm-project/vllm", "vllm/transformers_utils/configs/speculators/algos.py", "not pinned (code index)",
               "update_dflash: aux_hidden_state_layer_ids -> eagle_aux_hidden_state_layer_ids verbatim"),
        Source("vllm-project/speculators", "src/speculators/models/dflash/config.py",
               "0a09610f3bb2be27929668268d4144fce45446b1", "DFlashSpeculatorConfig fields"),
    )),
)

LAYERS = [1, 3]


@pytest.fixture(scope="module")
def target():
    return Eagle3TargetModel(build_tiny_llama(seed=0, num_layers=6, model_type="qwen3"), LAYERS, draft_method="dflash")


@pytest.fixture(scope="module")
def draft(target):
    torch.manual_seed(0)
    config = DFlashDraftConfig.from_target_config(target.config, num_hidden_layers=2, block_size=8,
                                                  target_layer_ids=LAYERS, mask_token_id=300)
    model = DFlashDraftModel(config)
    model.set_target_weights(target.get_input_embeddings(), target.model.lm_head.weight)
    return model


@pytest.fixture(scope="module")
def exports(tmp_path_factory, target, draft):
    root = tmp_path_factory.mktemp("dflash_exports")
    record = {**identity.run_record(identity.identity_of(target), torch.arange(320)), "draft_method": "dflash"}
    return {fmt: export_dflash_draft(draft, root / fmt, torch.float32, export_format=fmt, record=record,
                                     verifier="tiny-qwen3", verifier_architectures=["Qwen3ForCausalLM"])
            for fmt in ("native", "speculators")}


@pytest.mark.parametrize("engine", ENGINES, ids=lambda e: e.name)
def test_each_engine_captures_the_trained_layers_by_index_and_by_value(engine, exports, target):
    config = json.loads((exports[engine.export_format] / "config.json").read_text())
    captured_inputs = engine.capture_inputs(config)
    assert captured_inputs == [i + 1 for i in LAYERS]  # the input of layer i + 1 is the output of layer i
    ids = torch.randint(3, 250, (1, 7))
    ones = torch.ones_like(ids)
    with torch.no_grad():
        hidden_states = target.model(input_ids=ids, output_hidden_states=True).hidden_states
    engine_context = torch.cat([hidden_states[k] for k in captured_inputs], -1)  # hidden_states[k]: layer k's input
    trained_context = target.generate_batch(ids, ones, ones).aux_hidden_states
    torch.testing.assert_close(engine_context, trained_context, rtol=0, atol=0)


@pytest.mark.parametrize("engine", ENGINES, ids=lambda e: e.name)
def test_every_weight_fills_one_engine_parameter_of_its_shape(engine, exports, draft):
    c = draft.config
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    expected = {"fc.weight": (c.hidden_size, len(c.target_layer_ids) * c.hidden_size),
                "hidden_norm.weight": (c.hidden_size,), "norm.weight": (c.hidden_size,)}
    for i in range(c.num_hidden_layers):
        expected.update({f"layers.{i}.{name}": shape for name, shape in {
            "self_attn.qkv_proj.weight": (q + 2 * kv, c.hidden_size), "self_attn.o_proj.weight": (c.hidden_size, q),
            "self_attn.q_norm.weight": (c.head_dim,), "self_attn.k_norm.weight": (c.head_dim,),
            "mlp.gate_up_proj.weight": (2 * c.intermediate_size, c.hidden_size),
            "mlp.down_proj.weight": (c.hidden_size, c.intermediate_size),
            "input_layernorm.weight": (c.hidden_size,), "post_attention_layernorm.weight": (c.hidden_size,)}.items()})
    shards: dict[str, dict[int, tuple]] = {}
    for name, tensor in load_file(str(exports[engine.export_format] / "model.safetensors")).items():
        assert not name.startswith("model.") and "embed_tokens" not in name and "lm_head" not in name, name
        suffix = next((s for s in engine.fused if name.endswith(s)), None)
        param, shard = (name.replace(suffix, engine.fused[suffix][0]), engine.fused[suffix][1]) if suffix else (name, 0)
        assert shard not in shards.setdefault(param, {}), f"{param} shard {shard} filled twice"
        shards[param][shard] = tuple(tensor.shape)
    assert set(shards) == set(expected)
    for param, parts in shards.items():
        rows = sum(shape[0] for shape in parts.values())
        assert (rows, *next(iter(parts.values()))[1:]) == expected[param], param


def test_the_export_reads_back_as_trained_and_records_its_target(exports, draft, target):
    native = json.loads((exports["native"] / "config.json").read_text())
    assert native["architectures"] == ["DFlashDraftModel"] and native["model_type"] == "qwen3"
    assert native["layer_types"] == ["full_attention"] * 2 and native["block_size"] == 8
    assert native["dflash_config"] == {"mask_token_id": 300, "target_layer_ids": LAYERS, "block_size": 8}
    speculators = json.loads((exports["speculators"] / "config.json").read_text())
    assert speculators["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 7
    for path in exports.values():
        assert dflash_config_from(json.loads((path / "config.json").read_text())).target_layer_ids == LAYERS
        loaded = load_dflash_draft(path, target.get_input_embeddings(), target.model.lm_head.weight)
        for (name, a), b in zip(draft.state_dict().items(), loaded.state_dict().values()):
            assert torch.equal(a, b), name
        record = read_dflash_record(path)
        assert record["draft_method"] == "dflash" and record["target"]["aux_layer_ids"] == LAYERS
