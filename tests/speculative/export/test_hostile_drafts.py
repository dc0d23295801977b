"""``tandem export`` and ``tandem eval`` of drafts that came from elsewhere: checked before anything is allocated.

Rows 8-11 of issue 24's red team: a config.json that claims absurd sizes for a few hundred KiB of weights, a
``d2t`` that points past the target vocabulary, malformed configs and records, and integer or bool weights.
Each must end in one line that names the file and the field (or tensor), and a sound draft must still load.
"""

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
from tandem.speculative.drafts.eagle3 import Eagle3DraftConfig, Eagle3DraftModel
from tandem.speculative.export import eagle3 as draft_export
from tests.conftest import REPO_ROOT, save_tiny_target

CONFIG = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=512, vocab_size=320,
              draft_vocab_size=200, target_hidden_size=64)


def tiny_draft(reduced: bool = True) -> Eagle3DraftModel:
    torch.manual_seed(0)
    config = Eagle3DraftConfig(**{**CONFIG, "draft_vocab_size": 200 if reduced else 320})
    draft = Eagle3DraftModel(config)
    if reduced:  # draft id i -> target id 3 + i (distinct, in range)
        d2t = torch.full((200,), 3, dtype=torch.long)
        t2d = torch.zeros(320, dtype=torch.bool)
        t2d[3:203] = True
        draft.set_vocab(d2t, t2d)
    return draft


@pytest.fixture
def exported(tmp_path) -> Path:
    return draft_export.export_draft(tiny_draft(), tmp_path / "draft", aux_layer_ids=[1, 1, 0])


def edit_config(directory: Path, change) -> Path:
    path = directory / "config.json"
    raw = json.loads(path.read_text())
    path.write_text(json.dumps(change(raw)))
    return path


def edit_weights(directory: Path, change, metadata: dict | None = None) -> Path:
    path = directory / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata=metadata or {"format": "pt"})
    return path


def refusal(directory: Path) -> str:
    """The one-line ValueError ``load_exported_draft`` raises for ``directory``."""
    with pytest.raises(ValueError) as caught:
        draft_export.load_exported_draft(directory)
    message = str(caught.value)
    assert "\n" not in message, message
    return message


def test_a_sound_draft_loads_and_exports_again(exported, tmp_path):
    loaded = draft_export.load_exported_draft(exported)
    for key, value in tiny_draft().state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert main(["export", "--draft", str(exported), "--output", str(tmp_path / "again")]) == 0


def test_row8_absurd_config_sizes_are_refused_from_the_weights_header_before_allocating(exported):
    # 2**31 tokens x 64 would be 512 GiB of embedding; the weights present hold 320 x 64.
    edit_config(exported, lambda raw: {**raw, "vocab_size": 1 << 31})
    message = refusal(exported)
    assert str(exported / "model.safetensors") in message and "(vocab_size" in message and "[2147483648" in message
    # The same through the command line, in a process whose peak memory is read back: one line, no traceback.
    script = ("import resource, sys; from tandem.cli import main; rc = main(sys.argv[1:]); "
              "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", script, "export", "--draft", str(exported), "--output",
                          str(exported.parent / "out")], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "vocab_size" in out.stderr
    assert int(out.stdout.split()[-1]) < 1 << 20  # KiB: under 1 GiB peak (torch alone is a few hundred MiB)
    assert not (exported.parent / "out").exists()


@pytest.mark.parametrize("stored_t2d", [True, False])
def test_row9_d2t_pointing_past_the_target_vocabulary_is_refused(exported, stored_t2d):
    def change(tensors):
        tensors["d2t"][-1] = 500  # draft id 199 -> target id 699, past the 320 of the target
        if not stored_t2d:
            del tensors["t2d"]
    edit_weights(exported, change)
    message = refusal(exported)
    assert "'d2t'" in message and "699" in message and "[0, 320)" in message


def test_row9_a_t2d_that_disagrees_with_d2t_is_refused(exported):
    def change(tensors):
        tensors["t2d"][250] = True
    edit_weights(exported, change)
    assert "'t2d'" in refusal(exported)


def test_row9_two_draft_ids_on_one_target_id_are_refused(exported):
    def change(tensors):
        tensors["d2t"][1] = 2  # draft 1 -> target 3, as draft 0
    edit_weights(exported, change)
    assert "same target id" in refusal(exported)


def _set_layer(key, value):
    return lambda raw: {**raw, key: value}


def _without(key):
    return lambda raw: {k: v for k, v in raw.items() if k != key}


MALFORMED = {
    "missing hidden_size": (_without("hidden_size"), "'hidden_size' is missing"),
    "a list": (lambda raw: [raw], "must be a JSON object, got list"),
    "hidden_size a string": (_set_layer("hidden_size", "64"), "'hidden_size' must be a positive integer"),
    "hidden_size negative": (_set_layer("hidden_size", -64), "'hidden_size' must be a positive integer"),
    "vocab_size a float": (_set_layer("vocab_size", 320.5), "'vocab_size' must be a positive integer"),
    "vocab_size a bool": (_set_layer("vocab_size", True), "'vocab_size' must be a positive integer"),
    "heads not dividing": (lambda raw: {**_without("head_dim")(raw), "num_attention_heads": 6},
                           "'num_attention_heads' (6) must divide hidden_size (64)"),
    "kv heads not dividing": (_set_layer("num_key_value_heads", 3), "'num_key_value_heads' (3) must divide"),
    "eps a string": (_set_layer("rms_norm_eps", "tiny"), "'rms_norm_eps' must be a positive number"),
    "draft vocab too large": (_set_layer("draft_vocab_size", 400), "'draft_vocab_size' (400) exceeds vocab_size"),
    "aux layer ids not integers": (_set_layer("eagle_aux_hidden_state_layer_ids", ["a", 2, 3]),
                                   "'eagle_aux_hidden_state_layer_ids' must be a list of integers"),
}


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory) -> Path:
    return save_tiny_target(tmp_path_factory.mktemp("hostile_drafts") / "target")


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_row10_a_malformed_config_is_one_line_naming_the_file_and_the_field(exported, tmp_path, target_dir, name,
                                                                            caplog):
    change, says = MALFORMED[name]
    config_path = edit_config(exported, change)
    with pytest.raises(ValueError) as caught:
        draft_export.load_exported_draft(exported)
        draft_export.exported_aux_layer_ids(exported)
    assert str(config_path) in str(caught.value) and says in str(caught.value), caught.value
    assert "\n" not in str(caught.value)
    # tandem export and tandem eval log that line and exit 2 (no traceback)
    assert main(["export", "--draft", str(exported), "--output", str(tmp_path / "out")]) == 2
    assert main(["eval", "--draft", str(exported), "--model", str(target_dir), "--dtype", "float32"]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 2 and all(says in e and "\n" not in e for e in errors), errors


def test_row10_invalid_json_and_a_record_that_is_a_list_are_one_line(exported, tmp_path):
    (exported / "config.json").write_text('{"hidden_size": 64,')
    assert "not valid JSON" in refusal(exported)
    fresh = draft_export.export_draft(tiny_draft(), tmp_path / "fresh", aux_layer_ids=[1, 1, 0])
    edit_weights(fresh, lambda tensors: None, {"format": "pt", draft_export.RECORD_METADATA_KEY: json.dumps([1, 2])})
    with pytest.raises(ValueError, match="tandem_record.*must be a JSON object"):
        draft_export.read_export_record(fresh)
    assert main(["export", "--draft", str(fresh), "--output", str(tmp_path / "out")]) == 2


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_row11_integer_or_bool_weights_are_refused_not_exported_as_float(exported, tmp_path, dtype):
    def change(tensors):
        tensors["fc.weight"] = (tensors["fc.weight"] * 100).to(dtype)
    edit_weights(exported, change)
    message = refusal(exported)
    assert "'fc.weight'" in message and "floating-point" in message
    assert main(["export", "--draft", str(exported), "--output", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()
