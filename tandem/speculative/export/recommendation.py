"""The decoding shape measured best for an exported draft, kept beside it with the machine it was measured on.

``tandem eval --tree auto`` (and the demo) measure which shape pays on their machine (``decoding/shape_choice``)
and write it to ``decoding_shape.json`` in the export directory, where engines never look: the shape, its
predicted and measured speed-up, the cost curve it was chosen from, the machine and dtype, and the matching
serving flags. A GPU's costs differ from a CPU's (verifying 64 tokens costs about one token there), so the
flags are a measured starting point for this machine, and the note says how to measure on the serving one.
"""

from __future__ import annotations

import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path

import torch

from tandem.speculative.atomic_files import atomic_write
from tandem.speculative.decoding.shape_choice import DecodingShape

RECOMMENDATION_FILE = "decoding_shape.json"
GPU_NOTE = ("measured on the machine above: a GPU verifies dozens of tokens for about the cost of one, so its best "
            "shape is usually deeper and wider; measure on the serving machine with `tandem eval --draft DRAFT "
            "--model TARGET --tree auto` there, or sweep the flags with SGLang's "
            "scripts/playground/bench_speculative.py (--steps, --topk, --num_draft_tokens)")


def serving_flags(shape: DecodingShape) -> dict:
    """The SGLang flags and vLLM ``num_speculative_tokens`` that draft ``shape``; for ``plain`` none (serve the
    target without the draft). SGLang's ``--speculative-num-draft-tokens`` counts the verified positions, the
    committed token included (a chain of 3: 4)."""
    if shape.kind == "plain":
        return {"sglang": [], "vllm": None}
    if shape.kind == "chain":
        steps, top_k, verified = shape.draft_tokens, 1, shape.draft_tokens + 1
    else:
        steps, top_k, verified = shape.tree.depth, shape.tree.top_k, shape.tree.size + 1
    # vLLM's EAGLE-3 drafts a chain: the tree's depth is the chain it can run.
    return {"sglang": ["--speculative-num-steps", str(steps), "--speculative-eagle-topk", str(top_k),
                       "--speculative-num-draft-tokens", str(verified)],
            "vllm": {"num_speculative_tokens": steps}}


def machine() -> dict:
    """What the costs were measured on: CPU model, cores, whether bf16 is native, torch, and the GPU if any."""
    from tandem.models import has_native_bf16

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "native_bf16": has_native_bf16("cpu"), "gpu": gpu,
            "torch": torch.__version__}


def recommendation(choice: dict, dtype: torch.dtype, measured: dict | None = None) -> dict:
    """The record ``write_recommendation`` keeps: the choice (``ShapeChoice.to_dict()``: shape, estimates, cost
    curve), the measured result of decoding with the chosen shape (``EvalSummary.to_dict()``, when there was
    one) and the machine and dtype it was measured on."""
    return {"shape": choice["chosen"], "predicted_speedup": choice["predicted_speedup"],
            "measured_speedup": None if measured is None else round(measured["speedup"], 3),
            "measured_acceptance_length": None if measured is None else round(measured["acceptance_length"], 3),
            "choice": choice, "dtype": str(dtype).removeprefix("torch."), "machine": machine(),
            "measured_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "serving_flags": serving_flags(DecodingShape.parse(choice["chosen"])), "note": GPU_NOTE}


def write_recommendation(export_dir: str | Path, record: dict) -> Path:
    """Write ``record`` (``recommendation()``) as ``decoding_shape.json`` in ``export_dir``; returns its path."""
    path = Path(export_dir) / RECOMMENDATION_FILE
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2) + "\n"))
    return path


def read_recommendation(export_dir: str | Path) -> dict | None:
    """The recorded recommendation of an export directory, or None."""
    path = Path(export_dir) / RECOMMENDATION_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def describe(record: dict) -> str:
    """Lines for a person: the shape, the serving flags, and the note on other machines."""
    flags = record["serving_flags"]
    where = f"{record['machine']['cpu']} ({record['machine']['cores']} cores), {record['dtype']}"
    if not flags["sglang"]:
        serve = "serve the target without the draft here (no shape paid)"
    else:
        tokens = flags["vllm"]["num_speculative_tokens"]
        serve = (f"SGLang: {' '.join(flags['sglang'])}; vLLM: --speculative-config "
                 f"'{{\"method\": \"eagle3\", \"num_speculative_tokens\": {tokens}, ...}}'")
    measured = record.get("measured_speedup")
    speed = f"predicted {record['predicted_speedup']:.2f}x" + (f", measured {measured:.2f}x" if measured else "")
    return f"best shape on {where}: {record['shape']} ({speed})\n  {serve}\n  note: {record['note']}"
