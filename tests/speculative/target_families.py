"""Tiny random targets of the model families users serve, built from a config (seconds, no download).

Every family gets the same geometry (hidden 64, 4 heads, 6 layers at most, the byte-level vocabulary of
``conftest``) plus the few fields its architecture needs; ``build_family_target`` gives the model in eval
mode with a peaked output head (a draft has something to learn).
"""

from __future__ import annotations

from pathlib import Path

import torch

from tests.conftest import TINY_VOCAB_SIZE, build_tiny_tokenizer

NUM_LAYERS = 6
HIDDEN = 64

COMMON = dict(vocab_size=TINY_VOCAB_SIZE, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
              num_hidden_layers=NUM_LAYERS, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2)
SMALL_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
DEEPSEEK_MOE = dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1,
                    n_group=1, topk_group=1, n_shared_experts=1)

FAMILIES: dict[str, dict] = {
    "llama": {},
    "qwen2": {},
    "qwen3": dict(head_dim=16),
    "mistral": {},
    "gemma2": dict(head_dim=16),
    "gemma3_text": dict(head_dim=16),
    "phi3": {},
    "olmo2": {},
    "smollm3": {},
    "glm4": dict(head_dim=16),
    "qwen3_moe": dict(head_dim=16, **SMALL_MOE),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "gpt_oss": dict(head_dim=16, num_local_experts=4, num_experts_per_tok=2),
    # MLA: keys and values come from a low-rank latent, every head its own (no GQA), rope on 8 of 24 dims.
    "deepseek_v3": dict(num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
                        qk_nope_head_dim=16, v_head_dim=16, **DEEPSEEK_MOE),
    "glm4_moe": dict(head_dim=16, **DEEPSEEK_MOE),
    # Hybrid: gated DeltaNet (linear attention, a recurrent state) and full attention, alternating.
    "qwen3_next": dict(head_dim=16, linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16,
                       linear_value_head_dim=16, shared_expert_intermediate_size=32, full_attention_interval=2,
                       **SMALL_MOE),
    "qwen3_5_text": dict(head_dim=16, linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16,
                         linear_value_head_dim=16, full_attention_interval=2),
}
"""model_type -> the config fields it needs beyond ``COMMON``."""

VISION_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
IMAGE_TOKEN_ID, VIDEO_TOKEN_ID, VISION_START_ID, VISION_END_ID = 259, 260, 261, 262
"""A vision-language target's special tokens, the ids ``build_vision_tokenizer`` gives them (after the 259 of the
byte-level tokenizer)."""


def build_vision_tokenizer():
    """The byte-level tokenizer of ``conftest`` with Qwen2.5-VL's vision special tokens added."""
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": list(VISION_TOKENS)})
    assert tokenizer.convert_tokens_to_ids(list(VISION_TOKENS)) == [IMAGE_TOKEN_ID, VIDEO_TOKEN_ID, VISION_START_ID,
                                                                     VISION_END_ID]
    return tokenizer
VISION_LANGUAGE = {
    # Qwen2.5-VL: a ViT whose 2x2-merged patches enter the language model (a Qwen2 with 3-D "mrope" positions).
    "qwen2_5_vl": dict(
        text_config={**COMMON, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}},
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=HIDDEN,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[1],
                           window_size=56),
        image_token_id=IMAGE_TOKEN_ID, video_token_id=VIDEO_TOKEN_ID, vision_start_token_id=VISION_START_ID,
        vision_end_token_id=VISION_END_ID),
}
"""Vision-language model_type -> its config fields (a text config, a vision config, the special ids)."""


def family_config(model_type: str):
    from transformers import AutoConfig

    if model_type in VISION_LANGUAGE:
        return AutoConfig.for_model(model_type, **VISION_LANGUAGE[model_type])
    return AutoConfig.for_model(model_type, **{**COMMON, **FAMILIES[model_type]})


def build_family_target(model_type: str, seed: int = 0, peak: float = 30.0):
    """A random ``model_type`` model of the tiny geometry (a causal LM, or a vision-language model), eval mode,
    its output head scaled by ``peak``."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    torch.manual_seed(seed)
    auto = AutoModelForImageTextToText if model_type in VISION_LANGUAGE else AutoModelForCausalLM
    model = auto.from_config(family_config(model_type)).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(peak)
    return model


def save_family_target(model_type: str, directory: Path, seed: int = 0) -> Path:
    """``build_family_target`` and the tiny tokenizer written as an HF model directory."""
    directory.mkdir(parents=True, exist_ok=True)
    build_family_target(model_type, seed).save_pretrained(directory)
    build_tiny_tokenizer().save_pretrained(directory)
    return directory


def fitted_draft(target, prompts: list[torch.Tensor], new_tokens: int = 24, steps: int = 40):
    """A draft fitted to ``target``'s own greedy continuations of ``prompts`` (``[1, S]`` long each), so that
    speculative decoding accepts some proposals and rejects others; eval mode."""
    from tandem.speculative.decoding.decode import greedy_decode
    from tandem.speculative.drafts.eagle3 import Eagle3DraftConfig, Eagle3DraftModel
    from tandem.speculative.training.vocab import build_draft_vocab
    from tests.speculative.tiny_runs import fit

    ids = torch.cat([torch.cat([p, torch.tensor([greedy_decode(target, p, new_tokens).tokens])], 1) for p in prompts])
    mask = torch.ones_like(ids)
    vocab = build_draft_vocab(torch.bincount(ids.flatten(), minlength=TINY_VOCAB_SIZE), TINY_VOCAB_SIZE)
    target.set_vocab_mapping(vocab.selected_token_ids, vocab.selected_token_mask)
    torch.manual_seed(0)
    draft = Eagle3DraftModel(Eagle3DraftConfig.from_target_config(target.config, TINY_VOCAB_SIZE))
    draft.seed_from_target(target.get_input_embeddings(), vocab.selected_token_ids, seed_lm_head=True)
    fit(draft, target.supervise(ids, mask, mask), mask, steps=steps, ttt_steps=3)
    return draft.eval()
