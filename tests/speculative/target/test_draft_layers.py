"""The capture contract: which layers a draft method reads, how a session declares them, and the records that
refuse supervision (a checkpoint, a cache directory) made for other layers or another method."""

import json

import pytest
import torch

from tandem.speculative.target.draft_layers import (
    MAX_CAPTURED_LAYERS,
    CaptureSpec,
    default_dflash_layer_ids,
    validate_layer_ids,
)
from tandem.speculative.target.identity import TargetMismatchError, check_run_record, run_record
from tandem.speculative.target.model import Eagle3TargetModel
from tandem.speculative.training.supervision_cache import CacheIdentityError, SupervisionCache, cache_identity
from tests.conftest import build_tiny_llama


def test_dflash_default_layers_follow_the_reference_formula():
    assert default_dflash_layer_ids(36, 5) == [1, 9, 17, 25, 33]  # Qwen3-8B's published draft
    assert default_dflash_layer_ids(28, 5) == [1, 7, 13, 19, 25]
    assert default_dflash_layer_ids(30, 1) == [15]
    # A shallow target where the formula repeats a layer: n distinct layers spread over the capturable ones.
    assert default_dflash_layer_ids(4, 2) == [0, 2]
    with pytest.raises(ValueError, match="3 whose output an engine can capture"):
        default_dflash_layer_ids(4, 4)


@pytest.mark.parametrize("method, ids, message", [
    ("medusa", [1], "unknown draft method"),
    ("eagle3", [1, 2], "three distinct"),
    ("dflash", [1, 1], "distinct"),
    ("dflash", [], "1 to"),
    ("dflash", [7], "out of range"),
    ("dflash", [5], "last layer"),
])
def test_layers_a_target_cannot_serve_are_refused(method, ids, message):
    with pytest.raises(ValueError, match=message):
        validate_layer_ids(method, ids, 6)


def test_capture_header_round_trip_and_malformed_values():
    spec = CaptureSpec.resolve("dflash", None, 36, 5)
    assert spec.header_value() == "dflash:1,9,17,25,33"
    assert CaptureSpec.parse_header(spec.header_value(), 36) == spec
    too_many = "dflash:" + ",".join(str(i) for i in range(MAX_CAPTURED_LAYERS + 1))
    for bad in ("dflash", "dflash:", "dflash:1,x", "dflash:-1", "dflash:1,,2", too_many, "eagle3:1,2", "x:1"):
        with pytest.raises(ValueError):
            CaptureSpec.parse_header(bad, 36)


def test_a_forward_captures_the_layers_it_asks_for_then_the_default_again():
    model = build_tiny_llama(model_type="qwen3", num_layers=6)
    target = Eagle3TargetModel(model, draft_method="dflash", num_draft_layers=3)
    assert target.draft_method == "dflash" and target.aux_layer_ids == [1, 2, 3]
    assert target.model_info()["aux_layer_ids"] == [1, 2, 3]
    input_ids = torch.randint(3, 250, (2, 7))
    ones = torch.ones_like(input_ids)
    with torch.no_grad():
        states = model(input_ids=input_ids, attention_mask=ones, output_hidden_states=True).hidden_states
    asked = target.generate_batch(input_ids, ones, ones, layer_ids=[4, 0]).aux_hidden_states
    torch.testing.assert_close(asked, torch.cat([states[5], states[1]], -1), rtol=0, atol=0)
    default = target.generate_batch(input_ids, ones, ones).aux_hidden_states
    torch.testing.assert_close(default, torch.cat([states[2], states[3], states[4]], -1), rtol=0, atol=0)


def test_a_checkpoint_of_another_method_is_refused_naming_both():
    identity = {"weights_digest": "w", "aux_layer_ids": [0, 1, 2], "num_hidden_layers": 4}
    vocab = torch.arange(10)
    saved = run_record(identity, vocab)
    del saved["draft_method"]  # a record written before DFlash existed: EAGLE-3's
    current = run_record(identity, vocab, draft_method="dflash")
    with pytest.raises(TargetMismatchError, match=r"differs in draft_method: recorded a eagle3 draft.*now a dflash"):
        check_run_record(saved, current, what="--resume")
    layers = run_record({**identity, "aux_layer_ids": [0, 2]}, vocab, draft_method="dflash")
    with pytest.raises(TargetMismatchError, match=r"aux layers \[0, 1, 2\].*aux layers \[0, 2\]"):
        check_run_record(current, layers, what="--resume")
    assert check_run_record(current, run_record(identity, vocab, draft_method="dflash"), what="--resume") == []


def test_cache_directories_are_per_method_and_layers(tmp_path):
    model = build_tiny_llama(num_layers=6)
    vocab = torch.arange(model.config.vocab_size)
    eagle = cache_identity(Eagle3TargetModel(model, aux_layer_ids=[0, 2, 3]), vocab)
    assert "draft_method" not in eagle["target"]  # EAGLE-3 caches keep the directories they had
    dflash = cache_identity(Eagle3TargetModel(model, draft_method="dflash", num_draft_layers=2), vocab)
    assert dflash["target"]["draft_method"] == "dflash" and dflash["target"]["aux_layer_ids"] == [1, 3]
    first, second = SupervisionCache(tmp_path, eagle), SupervisionCache(tmp_path, dflash)
    assert first.directory != second.directory
    # A directory whose stamp says another method (copied or edited by hand) is refused, naming both.
    (second.directory / "identity.json").write_text(json.dumps(eagle))
    with pytest.raises(CacheIdentityError, match=r"was filled for .*eagle3|aux_layer_ids.*not for this run's"):
        SupervisionCache(tmp_path, dflash)
