"""Drafts are exported in the target checkpoint's dtype, whatever dtype the training computed in."""

import json

import torch
from safetensors import safe_open

from tandem.cli import main
from tandem.speculative.export.eagle3 import read_export_record
from tests.conftest import build_tiny_llama, build_tiny_tokenizer, write_chat_data


def _weights_dtype(export) -> torch.dtype:
    with safe_open(str(export / "model.safetensors"), "pt") as handle:
        return handle.get_tensor("fc.weight").dtype


def _exported_dtype(export) -> str:
    return json.loads((export / "config.json").read_text())["torch_dtype"]


def test_a_bf16_checkpoint_trained_in_float32_is_exported_in_bf16(tmp_path):
    target = tmp_path / "target"
    build_tiny_llama().to(torch.bfloat16).save_pretrained(target)
    build_tiny_tokenizer().save_pretrained(target)
    assert json.loads((target / "config.json").read_text())["dtype"] == "bfloat16"
    data, out = write_chat_data(tmp_path / "data.jsonl"), tmp_path / "out"
    common = ["--target", str(target), "--data", str(data), "--total-steps", "2", "--batch-size", "4",
              "--max-seq-len", "64", "--draft-vocab-size", "120", "--ttt-steps", "2", "--warmup-steps", "1",
              "--dtype", "float32", "--no-show-progress"]
    assert main(["train", *common, "--output-dir", str(out)]) == 0

    export = out / "eagle3-draft"
    record = read_export_record(export)["target"]
    assert (record["dtype"], record["checkpoint_dtype"]) == ("float32", "bfloat16")  # computed in fp32, stored bf16
    assert _exported_dtype(export) == "bfloat16" and _weights_dtype(export) == torch.bfloat16
    # Written again, the export follows the recorded checkpoint dtype; --export-dtype still overrides either way.
    assert main(["export", "--draft", str(export), "--output", str(tmp_path / "again")]) == 0
    assert _weights_dtype(tmp_path / "again") == torch.bfloat16
    fp32 = tmp_path / "fp32"
    assert main(["export", "--draft", str(export), "--output", str(fp32), "--export-dtype", "float32"]) == 0
    assert _exported_dtype(tmp_path / "fp32") == "float32" and _weights_dtype(tmp_path / "fp32") == torch.float32
    assert main(["train", *common, "--output-dir", str(tmp_path / "fp16"), "--export-dtype", "float16"]) == 0
    assert _weights_dtype(tmp_path / "fp16" / "eagle3-draft") == torch.float16


def test_a_float32_checkpoint_is_exported_in_float32(tmp_path):
    from tandem.models import checkpoint_dtype, load_target

    target = tmp_path / "target"
    build_tiny_llama().save_pretrained(target)
    build_tiny_tokenizer().save_pretrained(target)
    assert checkpoint_dtype(str(target)) == "float32"
    model, _ = load_target(str(target), dtype="bfloat16")
    assert model.tandem_checkpoint_dtype == "float32"  # run in bf16, stored in fp32: the export follows the store
