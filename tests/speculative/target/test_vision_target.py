"""A vision-language target (a tiny random Qwen2.5-VL): the draft trains on a conversation with an image.

The image reaches the language model (its aux states after the image depend on the pixels), its positions are
never trained (loss mask zero there, whatever the data says), a text-only conversation goes through the same
target, and a draft trained on both learns (its loss falls).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tandem.speculative.drafts.eagle3 import Eagle3DraftConfig, Eagle3DraftModel
from tandem.speculative.target.model import Eagle3TargetModel, UnsupportedTargetError
from tandem.speculative.target.vision import (
    image_positions,
    image_token_types,
    mrope_positions,
    tokenize_image_conversation,
)
from tandem.speculative.training.eagle3_loss import ttt_loss
from tandem.speculative.training.vocab import build_draft_vocab
from tests.conftest import TINY_VOCAB_SIZE
from tests.speculative.target_families import IMAGE_TOKEN_ID, build_family_target, build_vision_tokenizer

MERGE = 2


def _patches(seed: int):
    """An 56x56 RGB image through Qwen2-VL's image processor (the PIL one: no torchvision here):
    ``(pixel_values [16, 1176] float, image_grid_thw [1, 3] long)``."""
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    pixels = (np.random.RandomState(seed).rand(56, 56, 3) * 255).astype("uint8")
    processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 56, patch_size=14, merge_size=MERGE,
                                         temporal_patch_size=2)
    out = processor(images=[Image.fromarray(pixels)], return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


CONVERSATION = [{"role": "user", "content": "<|vision_start|><|image_pad|><|vision_end|>what colour is it"},
                {"role": "assistant", "content": "mostly red, some blue"}]


@pytest.fixture(scope="module")
def vlm():
    return Eagle3TargetModel(build_family_target("qwen2_5_vl", seed=2), aux_layer_ids=[0, 2, 3])


def test_an_image_conversation_is_expanded_to_its_patches_and_its_positions_are_never_trained(vlm):
    pixels, grid = _patches(0)
    ids, loss_mask = tokenize_image_conversation(build_vision_tokenizer(), CONVERSATION, grid, IMAGE_TOKEN_ID, MERGE)
    image = ids == IMAGE_TOKEN_ID
    assert int(image.sum()) == image_positions(grid, MERGE)[0] == 4 and int(loss_mask.sum()) > 0
    everything = torch.ones_like(loss_mask)[None]  # data that claims every position is trained
    with vlm.with_images(pixels, grid):
        batch = vlm.generate_batch(ids[None], torch.ones_like(ids)[None], everything)
    trained = torch.cat([torch.ones(1, 1, dtype=torch.long), batch.loss_mask[:, :-1]], 1)  # undo the shift
    assert not bool(trained[0][image].any())  # the image's tokens (and the other vision tokens) never trained
    assert bool(trained[0][~image].any())


def test_the_language_model_reads_the_pixels(vlm):
    _pixels, grid = _patches(0)
    ids, loss_mask = tokenize_image_conversation(build_vision_tokenizer(), CONVERSATION, grid, IMAGE_TOKEN_ID, MERGE)
    first = int((ids == IMAGE_TOKEN_ID).nonzero()[0])
    aux = []
    for seed in (0, 1):
        with vlm.with_images(*_patches(seed)):
            aux.append(vlm.generate_batch(ids[None], torch.ones_like(ids)[None], loss_mask[None]).aux_hidden_states)
    torch.testing.assert_close(aux[0][:, :first], aux[1][:, :first], rtol=0, atol=0)  # causal: before it, the same
    assert not torch.allclose(aux[0][:, first:], aux[1][:, first:], atol=1e-4)  # from it on, another image


def test_a_draft_trains_on_image_and_text_only_conversations(vlm):
    tokenizer = build_vision_tokenizer()
    pixels, grid = _patches(3)
    image_ids, image_mask = tokenize_image_conversation(tokenizer, CONVERSATION, grid, IMAGE_TOKEN_ID, MERGE)
    text = [{"role": "user", "content": "what colour is the sky"}, {"role": "assistant", "content": "blue, mostly"}]
    text_ids, text_mask = tokenize_image_conversation(tokenizer, text, grid[:0], IMAGE_TOKEN_ID, MERGE)
    counts = torch.bincount(torch.cat([image_ids, text_ids]), minlength=TINY_VOCAB_SIZE)
    vocab = build_draft_vocab(counts, TINY_VOCAB_SIZE)
    vlm.set_vocab_mapping(vocab.selected_token_ids, vocab.selected_token_mask)
    with vlm.with_images(pixels, grid):
        with_image = vlm.supervise(image_ids[None], torch.ones_like(image_ids)[None], image_mask[None])
    text_only = vlm.supervise(text_ids[None], torch.ones_like(text_ids)[None], text_mask[None])
    torch.manual_seed(0)
    draft = Eagle3DraftModel(Eagle3DraftConfig.from_target_config(vlm.model.config, TINY_VOCAB_SIZE))
    draft.seed_from_target(vlm.get_input_embeddings(), vocab.selected_token_ids, seed_lm_head=True)
    optimizer = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(12):
        loss = sum(ttt_loss(draft, s, s["loss_mask"], ttt_steps=2).loss for s in (with_image, text_only))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0], losses


def test_images_for_a_text_only_target_are_refused():
    target = Eagle3TargetModel(build_family_target("qwen3", seed=0), aux_layer_ids=[0, 2, 3])
    with pytest.raises(UnsupportedTargetError, match="not a vision-language model"):
        with target.with_images(*_patches(0)):
            pass


def _two_rows():
    """A batch of two image conversations (a 56 x 56 image, and a 112 x 56 one in a shorter row, right-padded):
    ``(input_ids [2, S], attention_mask [2, S], loss_mask [2, S], pixel_values, image_grid_thw [2, 3])``."""
    tokenizer = build_vision_tokenizer()
    first_pixels, first_grid = _patches(0)
    wide = [{"role": "user", "content": "<|vision_start|><|image_pad|><|vision_end|>hm"},
            {"role": "assistant", "content": "wide"}]
    wide_pixels, wide_grid = _wide_patches()
    rows = [tokenize_image_conversation(tokenizer, CONVERSATION, first_grid, IMAGE_TOKEN_ID, MERGE),
            tokenize_image_conversation(tokenizer, wide, wide_grid, IMAGE_TOKEN_ID, MERGE)]
    seq = max(len(ids) for ids, _ in rows)
    ids, attention, loss = (torch.zeros(2, seq, dtype=torch.long) for _ in range(3))
    for b, (row_ids, row_loss) in enumerate(rows):
        ids[b, :len(row_ids)], attention[b, :len(row_ids)], loss[b, :len(row_ids)] = row_ids, 1, row_loss
    return ids, attention, loss, torch.cat([first_pixels, wide_pixels]), torch.cat([first_grid, wide_grid])


def _wide_patches():
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    pixels = (np.random.RandomState(7).rand(56, 112, 3) * 255).astype("uint8")
    processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, merge_size=MERGE,
                                         temporal_patch_size=2)
    out = processor(images=[Image.fromarray(pixels)], return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def test_mrope_positions_are_transformers_get_rope_index(vlm):
    ids, attention, _loss, _pixels, grid = _two_rows()
    want, _deltas = vlm.model.model.get_rope_index(ids, image_token_types(ids, IMAGE_TOKEN_ID), grid,
                                                   attention_mask=attention)
    got = mrope_positions(ids, attention, grid, IMAGE_TOKEN_ID, MERGE)
    assert torch.equal(got[:, attention.bool()], want[:, attention.bool()])
    after = int((ids[1] == IMAGE_TOKEN_ID).nonzero()[-1]) + 1  # the text after the wide image (grid 1 x 2 x 4)
    assert int(got[0, 1, after]) == after - (8 - 4)  # 8 image tokens advance the positions by max(2, 4) = 4


def test_the_language_model_runs_on_mrope_positions_with_an_image(vlm):
    ids, attention, loss, pixels, grid = _two_rows()
    with vlm.with_images(pixels, grid):
        aux = vlm.generate_batch(ids, attention, loss).aux_hidden_states
    assert getattr(vlm.model.model, "rope_deltas", None) is None  # no offset left for a later decode
    with torch.no_grad():
        states = vlm.model(input_ids=ids, attention_mask=attention, pixel_values=pixels, image_grid_thw=grid,
                           mm_token_type_ids=image_token_types(ids, IMAGE_TOKEN_ID),
                           output_hidden_states=True).hidden_states
        one_d = vlm.model(input_ids=ids, attention_mask=attention, pixel_values=pixels, image_grid_thw=grid,
                          output_hidden_states=True).hidden_states  # no token types: 1-D positions
    vlm.model.model.rope_deltas = None
    real = attention.bool()
    want = torch.cat([states[i + 1] for i in vlm.aux_layer_ids], -1)
    torch.testing.assert_close(aux[real], want[real], rtol=0, atol=0)
    first = int((ids[0] == IMAGE_TOKEN_ID).nonzero()[0])
    assert not torch.allclose(one_d[-1][0, first + 4:], states[-1][0, first + 4:], atol=1e-5)  # 1-D: another model
