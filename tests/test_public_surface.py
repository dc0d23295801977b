"""What users type and store, frozen: every subcommand's flags and defaults, and the on-disk formats.

The snapshot lives in ``public_surface.json`` beside this file. A change to it is a change users see: make it
on purpose, regenerate with ``TANDEM_UPDATE_SURFACE=1 pytest tests/test_public_surface.py`` and say so in the
commit.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

from tandem.cli import build_parser

SNAPSHOT = Path(__file__).with_name("public_surface.json")


def _jsonable(value):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return repr(value)


def _action_record(action: argparse.Action) -> dict:
    kind = getattr(action.type, "__name__", None) if action.type is not None else None
    return {"flags": list(action.option_strings), "dest": action.dest, "default": _jsonable(action.default),
            "nargs": _jsonable(action.nargs), "choices": _jsonable(list(action.choices) if action.choices else None),
            "type": kind, "required": action.required, "action": type(action).__name__}


def cli_surface() -> dict:
    """``{subcommand: [flag records]}`` of the ``tandem`` parser, help texts left out (they may improve)."""
    parser = build_parser()
    surface = {"tandem": [_action_record(a) for a in parser._actions
                          if not isinstance(a, (argparse._SubParsersAction, argparse._HelpAction))]}
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, subparser in sorted(sub.choices.items()):
        surface[name] = [_action_record(a) for a in subparser._actions if not isinstance(a, argparse._HelpAction)]
    return surface


def _tiny_run(tmp_path: Path) -> Path:
    """A two-step ``tandem train`` on a tiny saved target, through the command line only (no internal imports)."""
    from tandem.cli import main
    from tests.conftest import save_tiny_target, write_chat_data

    target = save_tiny_target(tmp_path / "target")
    data = write_chat_data(tmp_path / "data.jsonl")
    out = tmp_path / "out"
    assert main(["train", "--target", str(target), "--data", str(data), "--output-dir", str(out), "--total-steps", "2",
                 "--save-every", "2", "--batch-size", "4", "--max-seq-len", "64", "--draft-vocab-size", "120",
                 "--ttt-steps", "2", "--warmup-steps", "1", "--dtype", "float32", "--no-show-progress"]) == 0
    return out


def storage_surface(tmp_path: Path) -> dict:
    """The names users' files are made of: export config keys and weights, checkpoint and metrics fields."""
    from tandem.cli import main

    out = _tiny_run(tmp_path)
    export = out / "eagle3-draft"
    surface = {"run_files": sorted(p.name for p in out.iterdir() if p.name != "eagle3-draft"),
               "export_files": sorted(p.name for p in export.iterdir())}
    surface["export_config"] = sorted(json.loads((export / "config.json").read_text()))
    with safe_open(str(export / "model.safetensors"), "pt") as handle:
        surface["export_weights"] = sorted(handle.keys())
        surface["export_metadata"] = sorted(handle.metadata() or {})
    speculators = tmp_path / "speculators"
    assert main(["export", "--draft", str(export), "--output", str(speculators), "--format", "speculators"]) == 0
    raw = json.loads((speculators / "config.json").read_text())
    surface["speculators_config"] = sorted(raw)
    surface["speculators_nested"] = {k: sorted(v) for k, v in sorted(raw.items()) if isinstance(v, dict)}
    with safe_open(str(next(speculators.glob("*.safetensors"))), "pt") as handle:
        surface["speculators_weights"] = sorted(handle.keys())
    checkpoint = sorted((out / "checkpoints").glob("step_*.pt"))[-1]
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)  # our own file, written just now
    surface["checkpoint_files"] = sorted(p.name for p in (out / "checkpoints").iterdir())
    surface["checkpoint_state"] = sorted(state)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    surface["metrics_fields"] = sorted(rows[-1])
    return surface


def test_public_surface_is_unchanged(tmp_path):
    current = {"cli": cli_surface(), "storage": storage_surface(tmp_path)}
    if os.environ.get("TANDEM_UPDATE_SURFACE") == "1":
        SNAPSHOT.write_text(json.dumps(current, indent=1, sort_keys=True) + "\n")
    frozen = json.loads(SNAPSHOT.read_text())
    for section in ("cli", "storage"):
        for name in sorted(set(frozen[section]) | set(current[section])):
            assert current[section].get(name) == frozen[section].get(name), (
                f"{section}.{name} changed: users type or store this; regenerate the snapshot only on purpose")
