"""Eagle3TargetModel: aux capture, shifting, layer selection, vocab mapping checks."""

import pytest
import torch

from tandem.speculative.target.model import (
    Eagle3TargetModel,
    VocabMappingMissingError,
    capturable_layers,
    default_aux_layer_ids,
)
from tandem.speculative.target.supervision import shift_left
from tests.conftest import build_tiny_llama


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "mistral"])
def test_aux_capture_equals_transformers_hidden_states(model_type):
    model = build_tiny_llama(model_type=model_type, num_layers=5)
    target = Eagle3TargetModel(model, aux_layer_ids=[0, 2, 3])
    input_ids = torch.randint(3, 250, (2, 9))
    attention_mask = torch.ones_like(input_ids)
    batch = target.generate_batch(input_ids, attention_mask, torch.ones_like(input_ids))
    with torch.no_grad():
        reference = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    hidden = model.config.hidden_size
    assert batch.aux_hidden_states.shape == (2, 9, 3 * hidden)
    for slot, layer in enumerate([0, 2, 3]):
        torch.testing.assert_close(batch.aux_hidden_states[..., slot * hidden:(slot + 1) * hidden],
                                   reference.hidden_states[layer + 1], rtol=0, atol=0)


def test_shifting_rules():
    model = build_tiny_llama()
    target = Eagle3TargetModel(model, aux_layer_ids=[0, 1, 2])
    input_ids = torch.randint(3, 250, (2, 7))
    attention_mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    loss_mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 0, 0]])
    batch = target.generate_batch(input_ids, attention_mask, loss_mask)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(batch.logits[:, :-1], logits[:, 1:])
    assert torch.equal(batch.logits[:, -1], torch.zeros_like(batch.logits[:, -1]))
    assert torch.equal(batch.input_ids, torch.cat([input_ids[:, 1:], torch.zeros(2, 1, dtype=torch.long)], 1))
    assert torch.equal(batch.loss_mask, torch.cat([loss_mask[:, 1:], torch.zeros(2, 1, dtype=torch.long)], 1))
    assert torch.equal(batch.attention_mask, attention_mask)  # not shifted
    assert not batch.aux_hidden_states.requires_grad


def test_shift_left_keeps_trailing_dims():
    x = torch.arange(12.0).view(1, 4, 3)
    out = shift_left(x)
    assert torch.equal(out[0, :3], x[0, 1:]) and torch.equal(out[0, 3], torch.zeros(3))


def test_default_aux_layer_ids():
    assert default_aux_layer_ids(30) == [1, 14, 26]
    assert default_aux_layer_ids(32) == [1, 15, 28]
    assert default_aux_layer_ids(7) == [1, 2, 3]


@pytest.mark.parametrize("num_layers", [4, 5, 6])
def test_shallow_targets_get_three_layers_every_engine_captures(num_layers):
    # Engines record layer inputs inside their decoder loop: the last layer's output is never captured.
    ids = default_aux_layer_ids(num_layers)
    assert len(set(ids)) == 3 and all(i in capturable_layers(num_layers) for i in ids)
    assert max(ids) == num_layers - 2


def test_targets_too_shallow_for_three_capturable_layers_are_refused():
    for num_layers in (2, 3):
        with pytest.raises(ValueError, match="three distinct aux layers whose outputs a serving engine can capture"):
            default_aux_layer_ids(num_layers)


def test_the_last_layer_is_refused_as_an_aux_layer():
    with pytest.raises(ValueError, match="last layer: no serving engine captures its output"):
        Eagle3TargetModel(build_tiny_llama(), aux_layer_ids=[0, 1, 3])


def test_bad_aux_layer_ids_are_refused():
    model = build_tiny_llama()
    with pytest.raises(ValueError, match="out of range"):
        Eagle3TargetModel(model, aux_layer_ids=[0, 1, 9])
    with pytest.raises(ValueError, match="distinct"):
        Eagle3TargetModel(model, aux_layer_ids=[1, 1, 2])


def test_supervise_needs_vocab_mapping_and_checks_it():
    target = Eagle3TargetModel(build_tiny_llama(), aux_layer_ids=[0, 1, 2])
    ids = torch.randint(3, 250, (1, 5))
    with pytest.raises(VocabMappingMissingError):
        target.supervise(ids, torch.ones_like(ids), torch.ones_like(ids))
    with pytest.raises(ValueError, match="shape"):
        target.set_vocab_mapping(torch.arange(10), torch.ones(5, dtype=torch.bool))
    info = target.model_info()
    assert info == {"num_hidden_layers": 4, "hidden_size": 64, "vocab_size": 320, "aux_layer_ids": [0, 1, 2]}
