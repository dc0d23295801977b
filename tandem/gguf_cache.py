"""A GGUF target converted once to a Hugging Face directory, so that every later process loads it in seconds.

transformers dequantises a GGUF file tensor by tensor on every load (25-35 s for the 135M default target on
two CPU cores), and the demo alone starts three processes that load it. The first load writes the
dequantised weights as they came out (float32 safetensors: loading them in any dtype rounds exactly as
loading the GGUF file in it does), the tokenizer and ``tandem_source.json`` (which file, its size and
modification time, its checkpoint dtype) to ``$TANDEM_TARGET_CACHE`` (default ``~/.cache/tandem/targets``);
a changed file has another key and is converted again. ``TANDEM_TARGET_CACHE=off`` loads the GGUF file
every time. Each conversion takes four bytes a parameter on disk (540 MB for SmolLM2-135M).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

CACHE_ENV = "TANDEM_TARGET_CACHE"
SOURCE_FILE = "tandem_source.json"
GGUF_FILE_TYPES = {0: "float32", 1: "float16", 32: "bfloat16"}
"""llama.cpp's ``general.file_type`` of unquantised GGUF files (ALL_F32, MOSTLY_F16, MOSTLY_BF16)."""
QUANTISED_GGUF_DTYPE = "bfloat16"
"""The checkpoint dtype taken for a quantised GGUF file, which holds no float dtype of its own: the 16-bit dtype
Hugging Face LLM checkpoints (SmolLM2's among them) are published in, and in which engines serve them."""


def cache_root() -> Path | None:
    """Where conversions live; None when ``$TANDEM_TARGET_CACHE`` is ``off`` (or ``0``)."""
    value = os.environ.get(CACHE_ENV, "")
    if value.lower() in ("off", "0", "none"):
        return None
    if value:
        return Path(value)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tandem" / "targets"


def enabled() -> bool:
    return cache_root() is not None


def _source(gguf: Path) -> dict:
    """What identifies a GGUF file's conversion: its resolved path, size and modification time."""
    stat = gguf.stat()
    return {"gguf": str(gguf.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def directory_for(gguf: Path) -> Path | None:
    """The conversion directory of ``gguf`` (whether written yet or not); None with the cache off."""
    root = cache_root()
    if root is None:
        return None
    key = hashlib.sha256(json.dumps(_source(gguf), sort_keys=True).encode()).hexdigest()[:12]
    return root / f"{gguf.stem}-{key}"


def _record(directory: Path | None) -> dict | None:
    path = None if directory is None else directory / SOURCE_FILE
    return json.loads(path.read_text()) if path is not None and path.is_file() else None


def converted_directory(gguf: Path) -> Path | None:
    """The finished conversion of ``gguf`` (the same file, unchanged since), or None."""
    directory = directory_for(gguf)
    record = _record(directory)
    if record is None or any(record.get(k) != v for k, v in _source(gguf).items()):
        return None
    return directory


def recorded_checkpoint_dtype(gguf: Path) -> str | None:
    """The checkpoint dtype the conversion of ``gguf`` recorded, or None when not converted."""
    directory = converted_directory(gguf)
    return _record(directory)["checkpoint_dtype"] if directory is not None else None


def gguf_checkpoint_dtype(gguf: Path) -> str:
    """The float dtype of a GGUF file's weights (``GGUF_FILE_TYPES``), or ``QUANTISED_GGUF_DTYPE``."""
    from gguf import GGUFReader

    field = GGUFReader(str(gguf)).fields.get("general.file_type")
    file_type = int(field.parts[field.data[0]][0]) if field is not None else None
    return GGUF_FILE_TYPES.get(file_type, QUANTISED_GGUF_DTYPE)


def convert(gguf: Path, model=None, tokenizer=None) -> Path | None:
    """Convert ``gguf`` unless its conversion exists; returns the directory (None with the cache off).

    ``model`` and ``tokenizer``: the file already loaded in float32 (else loaded here). Written to a temporary
    directory beside the final one and renamed into place, so a reader never sees half a conversion and two
    processes converting at once leave one whole copy."""
    final = directory_for(gguf)
    if final is None or converted_directory(gguf) is not None:
        return final
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    logger.info("converting %s to a Hugging Face directory under %s, once: later loads read that", gguf, final.parent)
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if next(model.parameters()).dtype != torch.float32:
        raise ValueError("a GGUF conversion keeps the dequantised values exactly: pass the model loaded in float32")
    # The dequantised model is an ordinary one: drop the GGUF marks that make transformers refuse to save it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        record = {**_source(gguf), "checkpoint_dtype": gguf_checkpoint_dtype(gguf)}
        (staging / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
        try:
            staging.rename(final)
        except OSError:  # another process finished first: keep its copy
            if converted_directory(gguf) is None:
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("converted %s in %.1f s", gguf.name, time.perf_counter() - started)
    return final
