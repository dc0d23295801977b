"""Engine conformance: SGLang and vLLM read tandem's exported draft exactly as it was trained.

Each engine's reading rules are data (``ENGINES``), every rule with the source it was read from:
repository, file, the commit read, and the function (and line, where counted). The tests apply those
rules to tandem's real export of a tiny trained draft and check that

- the layers each engine captures are the layers tandem trained on: by index, and by value on a real
  (tiny) target, where the engine's capture (a decoder layer's *input*) is taken from transformers'
  ``hidden_states`` and compared with tandem's own aux states;
- every exported weight lands on an engine parameter of the right shape (q/k/v and gate/up into the
  engine's fused shards), every parameter is filled once, and nothing is left that an engine refuses;
- a draft forward rebuilt from the engine's rules alone (fused weights, residual convention, RoPE,
  ``d2t`` mapping) equals tandem's own draft forward, and proposes the same target tokens.

When an engine changes a rule, one line of data changes here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file

from tandem.speculative.export import eagle3 as draft_export
from tandem.speculative.target.model import Eagle3TargetModel
from tandem.speculative.training.config import TrainConfig
from tandem.speculative.training.trainer import Trainer
from tests.conftest import build_tiny_llama, build_tiny_tokenizer, write_chat_data

SGLANG = "sgl-project/sglang"
VLLM = "vllm-project/vllm"
SPECULATORS = "vllm-project/speculators"


@dataclass(frozen=True)
class Source:
    """Where a rule was read: ``repo/path`` at ``commit``, in ``where`` (function, line if counted)."""

    repo: str
    path: str
    commit: str
    where: str


def _layer_output_default(num_layers: int) -> list[int]:
    """The decoder inputs both engines capture when a draft names no layers: ``[2, L//2, L-3]``."""
    return [2, num_layers // 2, num_layers - 3]


@dataclass(frozen=True)
class EngineRules:
    """How one engine (and model runner) reads an EAGLE-3 draft directory."""

    name: str
    export_format: str
    """The tandem export format this engine is pointed at."""
    aux_keys: tuple[tuple[str, ...], ...]
    """Config key paths tried in order for the aux layer ids; the first non-empty one wins."""
    aux_offset: int
    """The engine captures the *input* of decoder layer ``id + aux_offset`` (the output of the one before)."""
    default_inputs: Callable[[int], list[int]]
    """Decoder inputs captured when no key is found (``L`` -> layers)."""
    decoder: str
    """Parameter path of the draft's decoder layer."""
    renames: tuple[tuple[str, str], ...]
    """Substring renames applied to a weight's name before lookup."""
    prefix_rule: str
    """``unless_param``: ``model.`` is prefixed when the bare name is no parameter (SGLang);
    ``unless_lm_head``: prefixed unless the name holds ``lm_head`` (vLLM)."""
    skipped: tuple[str, ...]
    """Weight names (substrings) the loader drops."""
    d2t_as: str
    """``hot_token_id``: ``target = arange(Vd) + d2t`` kept aside (SGLang); else the parameter ``d2t`` loads into."""
    d2t_param_only_when_reduced: bool
    """vLLM keeps no mapping parameter when ``Vd == V``, and its loader raises on a ``d2t`` then."""
    strict: bool
    """The loader raises on a weight with no parameter (vLLM) instead of dropping it (SGLang)."""
    residual_default: bool
    """``norm_before_residual`` when the config does not say (the residual taken after ``hidden_norm``)."""
    adapter: Callable[[dict], dict] | None
    """Config translation before the model is built (vLLM's speculators adapter), or None."""
    sources: tuple[Source, ...]


STACKED = ((".qkv_proj", ".q_proj", "q"), (".qkv_proj", ".k_proj", "k"), (".qkv_proj", ".v_proj", "v"),
           (".gate_up_proj", ".gate_proj", 0), (".gate_up_proj", ".up_proj", 1))
"""Both engines' ``stacked_params_mapping`` (param, shard name, shard id): the same five lines in each loader."""


def speculators_adapter(config: dict) -> dict:
    """vLLM's ``SpeculatorsConfig``: validate, start from ``transformer_layer_config``, apply ``update_eagle3``."""
    spec = config["speculators_config"]
    assert config["speculators_model_type"] in ("eagle3",), "vLLM: Expected one of SUPPORTED_SPECULATORS_TYPES"
    assert spec["proposal_methods"][0]["speculative_tokens"] >= 1 and spec["verifier"]["name_or_path"]
    assert isinstance(config["transformer_layer_config"], dict), "vLLM: Must provide transformer_layer_config"
    hf = dict(config["transformer_layer_config"])
    hf["draft_vocab_size"] = config.get("draft_vocab_size")
    if config.get("target_hidden_size") is not None:
        hf["target_hidden_size"] = config["target_hidden_size"]
    hf["norm_before_residual"] = config.get("norm_before_residual", True)
    hf["architectures"] = ["Eagle3LlamaForCausalLM"]
    if config.get("eagle_aux_hidden_state_layer_ids"):
        hf["eagle_aux_hidden_state_layer_ids"] = config["eagle_aux_hidden_state_layer_ids"]
    hf["method"] = config["speculators_model_type"]  # build_vllm_speculative_config: method from the config
    return hf


SGLANG_SOURCES = (
    Source(SGLANG, "python/sglang/srt/model_executor/model_runner.py", "0005834cdb2a5b7472789ccbf0d3361b5cf853b8",
           "ModelRunner.__init__: eagle_config['eagle_aux_hidden_state_layer_ids'], None on any error"),
    Source(SGLANG, "python/sglang/srt/models/*.py", "not pinned: the same lines in every target model read",
           "set_eagle3_layers_to_capture: layers_to_capture = [val + 1 for val in layer_ids], "
           "default [2, L//2, L-3]; the decoder loop appends hidden_states + residual before layer i"),
    Source(SGLANG, "python/sglang/srt/models/llama_eagle3.py", "03d5a7771f6082e7737a5f19cae7d1e863087013",
           "LlamaForCausalLMEagle3.load_weights: d2t -> hot_token_id = d2t + arange, t2d skipped, stacked qkv/gate_up, "
           "'model.' prefixed unless a parameter, unknown names dropped; LlamaDecoderLayer.forward: residual = "
           "hidden_states before hidden_norm; lm_head = embed_tokens when tie_word_embeddings"),
    Source(SGLANG, "python/sglang/srt/speculative/", "not pinned: the file was not identified",
           "draft input width: num_aux = num_aux_hidden_states, else len(eagle_config ids), else len(top-level "
           "ids), else 3"),
)
VLLM_LOADER_SOURCES = (
    Source(VLLM, "vllm/model_executor/models/llama_eagle3.py", "00bd1493b3e82d6c13c68ee8a0e1c5a96707e190",
           "Eagle3LlamaForCausalLM.load_weights: t2d skipped, d2t -> draft_id_to_target_id, 'model.' prefixed unless "
           "lm_head; LlamaModel.load_weights: midlayer. -> layers.0., params_dict[name] (KeyError on unknown); "
           "LlamaDecoderLayer: norm_before_residual = getattr(config, 'norm_before_residual', False)"),
    Source(VLLM, "vllm/model_executor/models/llama_eagle3.py", "0.33.0 (as the issue reads it)",
           "draft_id_to_target_id is None when draft_vocab_size == the target's vocab: an unexpected d2t raises"),
    Source(VLLM, "vllm/model_executor/models/*.py", "not pinned: the same lines in every target model read",
           "LlamaModel.forward: aux_hidden_states.append(hidden_states + residual) when idx in "
           "aux_hidden_state_layers, before layer idx runs; default (2, L//2, L-3)"),
)
VLLM_V1_SOURCE = Source(VLLM, "vllm/v1/worker/gpu_model_runner.py", "not pinned: as the issue and the copies read",
                        "GPUModelRunner._get_eagle3_aux_layers_from_config: top-level "
                        "eagle_aux_hidden_state_layer_ids, else eagle_config['eagle_aux_hidden_state_layer_ids'], "
                        "used as-is")
VLLM_V2_SOURCE = Source(VLLM, "vllm/v1/worker/gpu/spec_decode/eagle/eagle3_utils.py",
                        "0cfdd2e15d6991f354c6e22fd7f7e7577afe0424",
                        "get_eagle3_aux_layers_from_config: line 112 top-level key; "
                        "lines 135-138 eagle_config['layer_ids']; "
                        "set_eagle3_aux_hidden_state_layers line 29: the model's default otherwise")
SPECULATORS_SOURCES = (
    Source(VLLM, "vllm/transformers_utils/configs/speculators/algos.py", "cfb173ab8e1b8e44dd35f8b5188255b6a03e13ec",
           "update_eagle3 lines 30-38: draft_vocab_size, target_hidden_size, norm_before_residual default True "
           "(line 33), top-level eagle_aux_hidden_state_layer_ids"),
    Source(VLLM, "vllm/transformers_utils/configs/speculators/base.py", "052316aeab2a1b2a9076518f20fe776052b947c9",
           "extract_transformers_pre_trained_config (transformer_layer_config first), validate_speculators_config, "
           "build_vllm_speculative_config: method = speculators_model_type"),
    Source(SPECULATORS, "src/speculators/models/eagle3.py", "03a7c1497cdbb0cf6a3cdffc86aead090034c285",
           "Eagle3Speculator: embed_tokens, fc, layers.0.*, norm, lm_head, d2t, t2d"),
)


def _vllm(name: str, export_format: str, aux_keys, runner_source: Source, adapter=None, residual_default=False,
          extra_sources=()) -> EngineRules:
    return EngineRules(
        name=name, export_format=export_format, aux_keys=aux_keys, aux_offset=0, default_inputs=_layer_output_default,
        decoder="model.layers.0.", renames=(("midlayer.", "layers.0."),), prefix_rule="unless_lm_head",
        skipped=("t2d",), d2t_as="draft_id_to_target_id", d2t_param_only_when_reduced=True, strict=True,
        residual_default=residual_default, adapter=adapter,
        sources=(runner_source, *VLLM_LOADER_SOURCES, *extra_sources),
    )


TOP_LEVEL = ("eagle_aux_hidden_state_layer_ids",)
ENGINES = [
    EngineRules(
        name="sglang", export_format="sglang", aux_keys=(("eagle_config", "eagle_aux_hidden_state_layer_ids"),),
        aux_offset=1, default_inputs=_layer_output_default, decoder="model.midlayer.", renames=(),
        prefix_rule="unless_param", skipped=("t2d",), d2t_as="hot_token_id", d2t_param_only_when_reduced=False,
        strict=False, residual_default=False, adapter=None, sources=SGLANG_SOURCES,
    ),
    _vllm("vllm-v1", "sglang", (TOP_LEVEL, ("eagle_config", "eagle_aux_hidden_state_layer_ids")), VLLM_V1_SOURCE),
    _vllm("vllm-v2", "sglang", (TOP_LEVEL, ("eagle_config", "layer_ids")), VLLM_V2_SOURCE),
    _vllm("vllm-v1-speculators", "speculators", (TOP_LEVEL, ("eagle_config", "eagle_aux_hidden_state_layer_ids")),
          VLLM_V1_SOURCE, adapter=speculators_adapter, residual_default=True, extra_sources=SPECULATORS_SOURCES),
    _vllm("vllm-v2-speculators", "speculators", (TOP_LEVEL, ("eagle_config", "layer_ids")), VLLM_V2_SOURCE,
          adapter=speculators_adapter, residual_default=True, extra_sources=SPECULATORS_SOURCES),
]


# ---------------------------------------------------------------- applying the rules

def engine_config(rules: EngineRules, export_dir) -> dict:
    """The config the engine builds the draft from (after its adapter, if any)."""
    raw = json.loads((export_dir / "config.json").read_text())
    return rules.adapter(raw) if rules.adapter else raw


def _lookup(config: dict, path: tuple[str, ...]):
    value = config
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def engine_aux_inputs(rules: EngineRules, config: dict, num_layers: int) -> list[int]:
    """The decoder layers whose input the engine captures for the target, from the draft's config."""
    for path in rules.aux_keys:
        ids = _lookup(config, path)
        if ids:
            return [int(i) + rules.aux_offset for i in ids]
    return rules.default_inputs(num_layers)


def engine_parameters(rules: EngineRules, config: dict) -> dict[str, dict]:
    """``{parameter name: {shard: shape}}`` of the engine's draft, built from the config fields it reads."""
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    head_dim = config.get("head_dim") or hidden // heads
    inter, vocab = config["intermediate_size"], config["vocab_size"]
    draft_vocab = config.get("draft_vocab_size") or vocab
    target_hidden = config.get("target_hidden_size") or hidden
    assert not config.get("tie_word_embeddings", False), "SGLang would make lm_head the embedding"
    layer = rules.decoder
    params = {
        "model.embed_tokens.weight": {None: (vocab, hidden)},
        "model.fc.weight": {None: (hidden, 3 * target_hidden)},
        f"{layer}input_layernorm.weight": {None: (hidden,)},
        f"{layer}hidden_norm.weight": {None: (hidden,)},
        f"{layer}post_attention_layernorm.weight": {None: (hidden,)},
        f"{layer}self_attn.qkv_proj.weight": {"q": (heads * head_dim, 2 * hidden),
                                              "k": (kv_heads * head_dim, 2 * hidden),
                                              "v": (kv_heads * head_dim, 2 * hidden)},
        f"{layer}self_attn.o_proj.weight": {None: (hidden, heads * head_dim)},
        f"{layer}mlp.gate_up_proj.weight": {0: (inter, hidden), 1: (inter, hidden)},
        f"{layer}mlp.down_proj.weight": {None: (hidden, inter)},
        "model.norm.weight": {None: (hidden,)},
        "lm_head.weight": {None: (draft_vocab, hidden)},
    }
    if rules.d2t_as != "hot_token_id" and not (rules.d2t_param_only_when_reduced and draft_vocab == vocab):
        params[rules.d2t_as] = {None: (draft_vocab,)}
    return params


def engine_load(rules: EngineRules, config: dict, tensors: dict[str, torch.Tensor]):
    """Load ``tensors`` by the engine's rules: ``({(param, shard): tensor}, hot_token_id or None)``."""
    params = engine_parameters(rules, config)
    filled: dict[tuple[str, object], torch.Tensor] = {}
    hot_token_id = None
    for name, weight in tensors.items():
        if any(s in name for s in rules.skipped):
            continue
        if "d2t" in name and rules.d2t_as == "hot_token_id":
            hot_token_id = weight + torch.arange(weight.shape[0])
            continue
        name = name.replace("d2t", rules.d2t_as)
        for old, new in rules.renames:
            name = name.replace(old, new)
        shard = None
        for param, shard_name, shard_id in STACKED:
            if shard_name in name:
                name, shard = name.replace(shard_name, param), shard_id
                break
        if rules.prefix_rule == "unless_lm_head":
            full = name if "lm_head" in name or name == rules.d2t_as else "model." + name
        else:
            full = name if name in params else "model." + name
        if full not in params:
            assert not rules.strict, f"{rules.name} refuses weight {name!r}: no such parameter"
            raise AssertionError(f"{rules.name} silently drops weight {name!r}: it would not be served")
        assert shard in params[full], f"{rules.name}: {full} has no shard {shard}"
        assert tuple(weight.shape) == params[full][shard], (rules.name, full, shard, tuple(weight.shape))
        assert (full, shard) not in filled, f"{rules.name}: {full}[{shard}] loaded twice"
        filled[(full, shard)] = weight.float()
    unfilled = [(p, s) for p, shards in params.items() for s in shards if (p, s) not in filled]
    assert not unfilled, f"{rules.name}: parameters left at their initial values: {unfilled}"
    return filled, hot_token_id


# ---------------------------------------------------------------- the engine's forward, rebuilt from its rules

def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _neox_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """``x [B, heads, S, D]`` rotated by halves (the neox layout Llama uses in both engines)."""
    dim = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    angles = positions.float()[:, None, :, None] * inv_freq
    cos, sin = angles.cos(), angles.sin()
    first, second = x[..., : dim // 2], x[..., dim // 2:]
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)


def engine_forward(rules: EngineRules, config: dict, weights: dict, hot_token_id, aux: torch.Tensor,
                   input_ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One draft step as the engine computes it: ``(draft-vocabulary logits [B, S, Vd], proposed target ids
    [B, S])``."""
    w = {(name if shard is None else f"{name}[{shard}]"): value for (name, shard), value in weights.items()}
    layer, eps = rules.decoder, config["rms_norm_eps"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    qkv = torch.cat([w[f"{layer}self_attn.qkv_proj.weight[{s}]"] for s in "qkv"])
    gate_up = torch.cat([w[f"{layer}mlp.gate_up_proj.weight[{s}]"] for s in (0, 1)])
    embeds = w["model.embed_tokens.weight"][input_ids]
    hidden = aux.float() @ w["model.fc.weight"].T  # the aux width differs from the embedding's: fc applies
    normed = _rms(hidden, w[f"{layer}hidden_norm.weight"], eps)
    residual = normed if config.get("norm_before_residual", rules.residual_default) else hidden
    x = torch.cat([_rms(embeds, w[f"{layer}input_layernorm.weight"], eps), normed], dim=-1)
    q, k, v = (x @ qkv.T).split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    batch, seq, _ = x.shape
    q, k, v = (t.view(batch, seq, -1, head_dim).transpose(1, 2) for t in (q, k, v))
    theta = config.get("rope_theta", 10000.0)
    q, k = _neox_rope(q, positions, theta), _neox_rope(k, positions, theta)
    k, v = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(head_dim)
    scores = scores.masked_fill(~torch.ones(seq, seq, dtype=torch.bool).tril(), float("-inf"))
    attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, seq, -1) @ w[f"{layer}self_attn.o_proj.weight"].T
    hidden = attn + residual
    gate, up = (_rms(hidden, w[f"{layer}post_attention_layernorm.weight"], eps) @ gate_up.T).chunk(2, dim=-1)
    hidden = hidden + (torch.nn.functional.silu(gate) * up) @ w[f"{layer}mlp.down_proj.weight"].T
    logits = _rms(hidden, w["model.norm.weight"], eps) @ w["lm_head.weight"].T
    best = logits.argmax(-1)
    if rules.d2t_as == "hot_token_id":
        proposed = best if hot_token_id is None else hot_token_id[best]
    else:
        mapping = w.get(rules.d2t_as)
        full = logits
        if mapping is not None:  # scatter the draft logits into the target vocabulary, -inf elsewhere
            full = logits.new_full((*logits.shape[:-1], config["vocab_size"]), float("-inf"))
            full[..., torch.arange(logits.shape[-1]) + mapping.long()] = logits
        proposed = full.argmax(-1)
    return logits, proposed


# ---------------------------------------------------------------- real exports of tiny trained drafts

NUM_LAYERS = 6
TRAINED_LAYERS = [0, 1, 3]  # not either engine's default for 6 layers: an engine that fell back would be caught


def _train_and_export(root, draft_vocab_size: int):
    model = build_tiny_llama(seed=3, num_layers=NUM_LAYERS)
    target = Eagle3TargetModel(model, aux_layer_ids=TRAINED_LAYERS)
    config = TrainConfig(data=str(write_chat_data(root / "data.jsonl", count=8)), output_dir=str(root / "out"),
                         total_steps=2, batch_size=4, max_seq_len=48, draft_vocab_size=draft_vocab_size, warmup_steps=1,
                         ttt_steps=2, save_every=2, show_progress=False, learning_rate=3e-2)
    trainer = Trainer(config, target=target, tokenizer=build_tiny_tokenizer())
    trainer.train()
    exports = {"sglang": root / "out" / draft_export.EXPORT_DIRNAME}
    from tandem.cli import main

    exports["speculators"] = root / "speculators"
    assert main(["--log-level", "WARNING", "export", "--draft", str(exports["sglang"]), "--format", "speculators",
                 "--output", str(exports["speculators"]), "--verifier", "tiny-target"]) == 0
    return model, target, trainer.draft, exports


@pytest.fixture(scope="module", params=[120, 320], ids=["reduced-vocab", "whole-vocab"])
def trained(request, tmp_path_factory):
    return _train_and_export(tmp_path_factory.mktemp(f"vocab{request.param}"), request.param)


@pytest.mark.parametrize("rules", ENGINES, ids=[r.name for r in ENGINES])
def test_engine_captures_the_layers_tandem_trained_on(rules, trained):
    model, target, _draft, exports = trained
    config = engine_config(rules, exports[rules.export_format])
    inputs = engine_aux_inputs(rules, config, NUM_LAYERS)
    assert inputs == [i + 1 for i in TRAINED_LAYERS], f"{rules.name} captures the inputs of layers {inputs}"
    assert all(0 <= i < NUM_LAYERS for i in inputs), "the engine's decoder loop never reaches a layer input >= L"
    ids = torch.randint(3, 250, (2, 11))
    with torch.no_grad():
        states = model(input_ids=ids, output_hidden_states=True).hidden_states  # [j]: the input of layer j (j < L)
    engine_aux = torch.cat([states[i] for i in inputs], dim=-1)
    trained_aux = target.generate_batch(ids, torch.ones_like(ids), torch.ones_like(ids)).aux_hidden_states
    torch.testing.assert_close(engine_aux, trained_aux, rtol=0, atol=0)


def test_sglang_counts_three_aux_states_whichever_key_it_reads(trained):
    # SGLang sizes the draft's input by counting ids (num_aux_hidden_states, the nested key, the top-level
    # key): the top-level key written for vLLM must count the same three.
    config = json.loads((trained[3]["sglang"] / "config.json").read_text())
    counted = [len(ids) for ids in (config["eagle_config"]["eagle_aux_hidden_state_layer_ids"],
                                    config["eagle_aux_hidden_state_layer_ids"])]
    assert counted == [3, 3] and "num_aux_hidden_states" not in config


@pytest.mark.parametrize("rules", ENGINES, ids=[r.name for r in ENGINES])
def test_every_weight_lands_on_an_engine_parameter_of_the_right_shape(rules, trained):
    _model, _target, draft, exports = trained
    export_dir = exports[rules.export_format]
    config = engine_config(rules, export_dir)
    tensors = load_file(str(export_dir / "model.safetensors"))
    whole_vocab = draft.config.draft_vocab_size == draft.config.vocab_size
    assert ("d2t" in tensors) != whole_vocab and ("t2d" in tensors) != whole_vocab
    weights, _ = engine_load(rules, config, tensors)  # asserts each landing, and that nothing is left unfilled
    assert len(weights) == sum(len(shards) for shards in engine_parameters(rules, config).values())


@pytest.mark.parametrize("rules", ENGINES, ids=[r.name for r in ENGINES])
def test_forward_rebuilt_from_the_engine_rules_equals_tandems_draft(rules, trained):
    _model, target, draft, exports = trained
    export_dir = exports[rules.export_format]
    config = engine_config(rules, export_dir)
    weights, hot_token_id = engine_load(rules, config, load_file(str(export_dir / "model.safetensors")))
    ids = torch.randint(3, 250, (2, 9))
    positions = torch.arange(9).expand(2, 9)
    aux = target.generate_batch(ids, torch.ones_like(ids), torch.ones_like(ids)).aux_hidden_states
    logits, proposed = engine_forward(rules, config, weights, hot_token_id, aux, ids, positions)
    with torch.no_grad():
        draft = draft.float().eval()
        expected = draft.logits(draft.step(ids, draft.project_aux(aux), positions))
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(proposed, draft.draft_to_target(expected.argmax(-1)))


def test_speculators_residual_flag_is_what_keeps_the_forward_equal(trained):
    # vLLM's speculators adapter defaults norm_before_residual to true; tandem writes false. Without the
    # key the rebuilt forward is another function: the flag is load-bearing, not decoration.
    _model, target, _draft, exports = trained
    rules = next(r for r in ENGINES if r.name == "vllm-v2-speculators")
    config = engine_config(rules, exports["speculators"])
    weights, hot = engine_load(rules, config, load_file(str(exports["speculators"] / "model.safetensors")))
    ids = torch.randint(3, 250, (1, 7))
    aux = target.generate_batch(ids, torch.ones_like(ids), torch.ones_like(ids)).aux_hidden_states
    positions = torch.arange(7)[None]
    written, _ = engine_forward(rules, config, weights, hot, aux, ids, positions)
    defaulted, _ = engine_forward(rules, {**config, "norm_before_residual": True}, weights, hot, aux, ids, positions)
    assert config["norm_before_residual"] is False and not torch.allclose(written, defaulted, atol=1e-3)


def test_speculators_config_carries_what_vllm_validates(trained):
    config = json.loads((trained[3]["speculators"] / "config.json").read_text())
    assert "model_type" not in config  # vLLM maps a config with speculators_config and no model_type to speculators
    hf = speculators_adapter(config)
    assert hf["method"] == "eagle3" and hf["architectures"] == ["Eagle3LlamaForCausalLM"]
    assert config["speculators_config"]["verifier"]["name_or_path"] == "tiny-target"


def test_rules_name_their_sources():
    for rules in ENGINES:
        assert rules.sources and all(s.repo and s.path and s.commit and s.where for s in rules.sources), rules.name
