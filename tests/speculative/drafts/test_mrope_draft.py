"""The EAGLE-3 draft of an M-RoPE target (Qwen2.5-VL) turns its attention with the target's 3-D positions.

SGLang and vLLM give the draft of such a target the target's M-RoPE positions (docs/design.md, section 8), so
tandem trains it on them: the draft's RoPE of 3-D positions is transformers' Qwen2.5-VL rotary embedding, that
of 1-D positions is it with the three axes equal (text), and the export carries the ``mrope_section`` that
switches SGLang to those positions (and that vLLM's ``MRotaryEmbedding`` needs), read back as it was written.
"""

from __future__ import annotations

import json

import torch

from tandem.speculative.drafts.eagle3 import Eagle3DraftConfig, Eagle3DraftModel, rope_cos_sin
from tandem.speculative.export import eagle3 as draft_export
from tests.conftest import TINY_VOCAB_SIZE
from tests.speculative.target_families import family_config


def _text_config():
    return family_config("qwen2_5_vl").get_text_config(decoder=True)


def test_the_draft_of_a_qwen2_5_vl_target_takes_its_mrope_section():
    config = Eagle3DraftConfig.from_target_config(family_config("qwen2_5_vl"), TINY_VOCAB_SIZE)
    assert config.mrope_section == [2, 3, 3] and 2 * sum(config.mrope_section) == config.head_dim
    assert Eagle3DraftConfig.from_target_config(family_config("qwen3"), TINY_VOCAB_SIZE).mrope_section is None


def test_3d_positions_turn_as_transformers_qwen2_5_vl_rotary_embedding():
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRotaryEmbedding

    text = _text_config()
    draft = Eagle3DraftConfig.from_target_config(text, TINY_VOCAB_SIZE)
    positions = torch.stack([torch.tensor([[0, 1, 2, 2, 2, 2, 4, 5]]),    # temporal
                             torch.tensor([[0, 1, 2, 2, 3, 3, 4, 5]]),    # height
                             torch.tensor([[0, 1, 2, 3, 2, 3, 4, 5]])])   # width: a 2 x 2 image at 2..5
    want_cos, want_sin = Qwen2_5_VLRotaryEmbedding(text)(torch.zeros(1, dtype=torch.float32), positions)
    cos, sin = rope_cos_sin(positions, draft.head_dim, draft.rope_theta, torch.float32, draft.mrope_section)
    torch.testing.assert_close(cos[:, 0], want_cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin[:, 0], want_sin, rtol=0, atol=1e-6)
    text_only = positions[0]  # three equal axes are 1-D RoPE: a text conversation trains as before
    one_d = rope_cos_sin(text_only, draft.head_dim, draft.rope_theta, torch.float32)
    three_d = rope_cos_sin(text_only.expand(3, -1, -1), draft.head_dim, draft.rope_theta, torch.float32,
                           draft.mrope_section)
    assert all(torch.equal(a, b) for a, b in zip(one_d, three_d))


def test_the_export_carries_the_mrope_section_and_reads_it_back(tmp_path):
    config = Eagle3DraftConfig.from_target_config(family_config("qwen2_5_vl"), 120)
    draft = Eagle3DraftModel(config)
    for export_format in ("sglang", "speculators"):
        out = draft_export.export_draft(draft, tmp_path / export_format, torch.float32, [0, 2, 3],
                                        export_format=export_format, verifier="tiny-vlm")
        raw = json.loads((out / "config.json").read_text())
        layer = raw.get("transformer_layer_config", raw)
        assert layer["rope_scaling"] == {"type": "mrope", "mrope_section": [2, 3, 3]}  # SpecForge's own form
    loaded = draft_export.load_exported_draft(tmp_path / "sglang")
    assert loaded.config.mrope_section == [2, 3, 3]
