"""An exported DFlash draft from elsewhere is checked before anything is allocated (issue 24's rows 8, 10 and 11,
held for the DFlash loader): a config.json with absurd sizes, malformed fields or a weights file of integers ends
in one line naming the file and the field, through ``load_dflash_draft`` and ``tandem eval``; a sound draft loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tandem.cli import main
from tandem.speculative.drafts.dflash import DFlashDraftConfig, DFlashDraftModel
from tandem.speculative.export.dflash import export_dflash_draft, load_dflash_draft
from tests.conftest import REPO_ROOT

VOCAB, HIDDEN = 50, 32


def tiny_draft() -> DFlashDraftModel:
    torch.manual_seed(0)
    config = DFlashDraftConfig(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=8, vocab_size=VOCAB, block_size=4,
                               target_layer_ids=[0, 2], num_target_layers=4, mask_token_id=49)
    draft = DFlashDraftModel(config)
    draft.set_target_weights(torch.randn(VOCAB, HIDDEN), torch.randn(VOCAB, HIDDEN))
    return draft


@pytest.fixture(params=["native", "speculators"])
def exported(request, tmp_path) -> Path:
    return export_dflash_draft(tiny_draft(), tmp_path / request.param, export_format=request.param,
                               verifier="tiny")


def load(directory: Path):
    draft = tiny_draft()
    return load_dflash_draft(directory, draft.embed_tokens.weight, draft.lm_head.weight)


def refusal(directory: Path) -> str:
    with pytest.raises(ValueError) as caught:
        load(directory)
    message = str(caught.value)
    assert "\n" not in message and str(directory) in message, message
    return message


def edit_config(directory: Path, change) -> None:
    path = directory / "config.json"
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


def layer(raw: dict) -> dict:
    """The decoder fields: top level (native) or ``transformer_layer_config`` (speculators)."""
    return raw.get("transformer_layer_config", raw)


def set_layer_field(key, value):
    def change(raw):
        layer(raw)[key] = value
        return raw
    return change


def set_dflash_field(key, value):
    """The field in its format's place: ``dflash_config`` (native) or the top level (speculators)."""
    speculators_key = {"target_layer_ids": "aux_hidden_state_layer_ids"}.get(key, key)

    def change(raw):
        if "speculators_model_type" in raw:
            raw[speculators_key] = value
        else:
            raw["dflash_config"][key] = value
        return raw
    return change


def test_a_sound_draft_loads_back_exactly(exported):
    loaded = load(exported)
    for (name, a), b in zip(tiny_draft().state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


MALFORMED = {
    "vocab 2**31": (set_layer_field("vocab_size", 1 << 31), "vocab_size"),
    "intermediate 2**30": (set_layer_field("intermediate_size", 1 << 30), "(intermediate_size, hidden_size)"),
    "a million layers": (set_layer_field("num_hidden_layers", 10 ** 6), "num_hidden_layers"),
    "layers a string": (set_layer_field("num_hidden_layers", "2"), "'num_hidden_layers' must be a positive integer"),
    "hidden missing": (lambda raw: {**raw, **({"transformer_layer_config": {
        k: v for k, v in layer(raw).items() if k != "hidden_size"}} if "transformer_layer_config" in raw else {}),
        **({} if "transformer_layer_config" in raw else {"hidden_size": None})}, "'hidden_size' is missing"),
    "eps negative": (set_layer_field("rms_norm_eps", -1.0), "'rms_norm_eps' must be a positive number"),
    "block 2**31": (lambda raw: {**raw, "block_size": 1 << 31, **({"dflash_config": {
        **raw["dflash_config"], "block_size": 1 << 31}} if "dflash_config" in raw else {})}, "block_size"),
    "layer ids strings": (set_dflash_field("target_layer_ids", ["a", 2]), "must be a list of 1 to 64 integers"),
    "layer ids repeated": (set_dflash_field("target_layer_ids", [2, 2]), "names a layer twice"),
    "mask a string": (set_dflash_field("mask_token_id", "49"), "must be a token id"),
    "mask past the vocabulary": (set_dflash_field("mask_token_id", 50), "outside the vocabulary [0, 50)"),
    "a list": (lambda raw: [raw], "must be a JSON object, got list"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_a_malformed_or_absurd_config_is_one_line_naming_the_field(exported, name):
    change, says = MALFORMED[name]
    edit_config(exported, change)
    assert says in refusal(exported)


def test_native_only_fields_a_layer_past_the_target_a_dflash_config_not_an_object_invalid_json(tmp_path):
    native = export_dflash_draft(tiny_draft(), tmp_path / "native")
    edit_config(native, set_dflash_field("target_layer_ids", [0, 9]))
    assert "target layer 9 is past the target's 4 layers" in refusal(native)
    edit_config(native, lambda raw: {**raw, "dflash_config": [1, 2]})
    assert "'dflash_config' must be an object" in refusal(native)
    (native / "config.json").write_text('{"architectures": ["DFlashDraftModel"],')
    assert "not valid JSON" in refusal(native)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_integer_or_bool_weights_are_refused(exported, dtype):
    path = exported / "model.safetensors"
    tensors = load_file(path)
    tensors["fc.weight"] = (tensors["fc.weight"] * 100).to(dtype)
    save_file(tensors, path, metadata={"format": "pt"})
    message = refusal(exported)
    assert "'fc.weight'" in message and "floating-point" in message


def test_tandem_eval_of_an_absurd_draft_exits_2_in_one_line_without_allocating_it(tmp_path):
    native = export_dflash_draft(tiny_draft(), tmp_path / "native")
    # 2**20 layers of 2**30-wide MLPs: petabytes, were the config trusted.
    edit_config(native, lambda raw: {**raw, "num_hidden_layers": 1 << 20, "intermediate_size": 1 << 30})
    script = ("import resource, sys; from tandem.cli import main; rc = main(sys.argv[1:]); "
              "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", script, "eval", "--draft", str(native), "--model", "unused"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "num_hidden_layers" in out.stderr
    assert int(out.stdout.split()[-1]) < 1 << 20  # KiB: under 1 GiB peak
    assert main(["eval", "--draft", str(native), "--model", "unused"]) == 2
