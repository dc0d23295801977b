"""Helpers for the remote-target tests: a tiny target on disk, batches, vocabularies, server processes.

The tiny random Llama of ``conftest`` is saved as an HF directory, so the server (a real
``tandem serve-target`` process) and the in-process reference load identical weights the same way.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable

import torch

from tandem.speculative.remote.launch import TargetServerProcess, start_target_server
from tests.conftest import TINY_VOCAB_SIZE, build_tiny_llama, build_tiny_tokenizer, save_tiny_target  # noqa: F401 (re-exported)


def load_tiny_target(directory: Path, dtype: str = "float32"):
    """The in-process reference: ``Eagle3TargetModel`` over the saved tiny target, in ``dtype``."""
    from tandem.models import load_target
    from tandem.speculative.target.model import Eagle3TargetModel

    model, _ = load_target(str(directory), dtype=dtype)
    return Eagle3TargetModel(model)


def start_tiny_server(
    directory: Path, log_path: Path, *extra: str, port: int = 0, token: str | None = None,
    nccl_timeout_s: float | None = None,
    dtype: str = "float32", any_nccl_port: bool = True,
) -> TargetServerProcess:
    """``tandem serve-target --model directory --dtype dtype`` on loopback, logging at DEBUG to ``log_path``.

    The process-group data plane is off (``--no-nccl``: the tests of the HTTP body path stay on it)
    unless ``nccl_timeout_s`` is given, which turns it on with that group timeout; its clients may then
    propose any unprivileged port (the tests pick free ones), or with ``any_nccl_port=False`` only those of
    the server's default range.
    """
    nccl = ("--no-nccl",) if nccl_timeout_s is None else ("--nccl", "--nccl-timeout", str(nccl_timeout_s))
    if nccl_timeout_s is not None and any_nccl_port:
        nccl += ("--nccl-port-range", "1024-65535")
    return start_target_server(
        str(directory), port=port, token=token, log_path=log_path, log_level="DEBUG",
        extra_args=("--device", "cpu", "--dtype", dtype, *nccl, *extra), startup_timeout_s=90,
    )


def restart_on_call(client, holder: dict, call: int, restart: Callable[[], TargetServerProcess]) -> threading.Event:
    """Make ``client``'s ``call``-th ``supervise_async`` SIGKILL ``holder["process"]`` and put ``restart()`` in
    its place, started in a thread while the run goes on (a crash mid-run); the event is set once it serves."""
    original, calls, restarted = client.supervise_async, {"n": 0}, threading.Event()

    def start() -> None:
        holder["process"] = restart()
        restarted.set()

    def crashing(*args):
        calls["n"] += 1
        if calls["n"] == call:
            holder["process"].kill()
            threading.Thread(target=start, daemon=True).start()
        return original(*args)

    client.supervise_async = crashing
    return restarted


def tiny_vocab_mapping(draft_size: int = 200, seed: int = 0, vocab_size: int = TINY_VOCAB_SIZE):
    """A valid draft vocabulary: ``(selected_token_ids [Vd] long, selected_token_mask [V] bool)``."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randperm(vocab_size, generator=generator)[:draft_size].sort().values
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    mask[ids] = True
    return ids, mask


def tiny_batch(batch: int = 2, seq: int = 16, seed: int = 0, vocab_size: int = TINY_VOCAB_SIZE):
    """``(input_ids, attention_mask, loss_mask)``, each ``[batch, seq]`` long, row 0 padded at the end."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (batch, seq), generator=generator)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    attention_mask[0, seq - 3 :] = 0
    loss_mask = attention_mask.clone()
    loss_mask[:, : seq // 4] = 0
    return input_ids, attention_mask, loss_mask


def assert_same_supervision(actual: dict, expected: dict) -> None:
    """Bit-identical: same keys, dtypes, shapes and values."""
    assert list(actual) == list(expected)
    for key in expected:
        assert actual[key].dtype == expected[key].dtype, key
        assert actual[key].shape == expected[key].shape, key
        assert torch.equal(actual[key], expected[key]), key
