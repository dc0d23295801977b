"""Resume guarantees: a ``tandem train`` run SIGKILLed at a random step and started again with
``--resume`` ends with the very weights of an uninterrupted run; a crash while a checkpoint is being
written never leaves a checkpoint that loads half-written."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from bench.soak import effective_history, exported, last_step, read_metrics, train_command, write_chat_data
from tandem.speculative.training import checkpoint
from tests.speculative.remote.remote_utils import save_tiny_target

pytestmark = pytest.mark.timeout(300)

STEPS, SAVE_EVERY = 10, 2


def test_sigkill_at_a_random_step_then_resume_matches_the_uninterrupted_run(tmp_path):
    seed = int(time.time())
    kill_at = random.Random(seed).randint(SAVE_EVERY + 1, STEPS - 5)  # after a checkpoint, before the end
    context = f"(random seed {seed}: SIGKILL at step {kill_at})"
    write_chat_data(tmp_path / "data.jsonl")
    target_dir = save_tiny_target(tmp_path / "target")
    uninterrupted = subprocess.Popen(train_command(tmp_path, "uninterrupted", target_dir, STEPS, SAVE_EVERY),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    victim = subprocess.Popen(train_command(tmp_path, "victim", target_dir, STEPS, SAVE_EVERY),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while last_step(tmp_path / "victim") < kill_at and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(30) == -signal.SIGKILL, f"the run ended before it could be killed {context}"
    killed_at = last_step(tmp_path / "victim")
    assert killed_at < STEPS and checkpoint.latest_checkpoint(tmp_path / "victim" / "checkpoints") is not None, context
    resumed = subprocess.run(train_command(tmp_path, "victim", target_dir, STEPS, SAVE_EVERY, resume=True),
                             capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert uninterrupted.wait(180) == 0
    history, problems = effective_history(read_metrics(tmp_path / "victim"))
    assert not problems and [r["step"] for r in history] == list(range(1, STEPS + 1)), context
    assert [r["loss"] for r in history] == [r["loss"] for r in read_metrics(tmp_path / "uninterrupted")], context
    got, want = exported(tmp_path / "victim"), exported(tmp_path / "uninterrupted")
    assert sorted(got) == sorted(want)
    for key in want:
        assert torch.equal(got[key], want[key]), f"{key} {context}"


WRITER = """
import sys, torch
from tandem.speculative.training.checkpoint import save_training_state
path = sys.argv[1]
for version in range(1, 400):  # bounded: the parent kills it long before
    save_training_state({"step": version, "weights": torch.full((1 << 21,), float(version))}, path)
    print(version, flush=True)
"""


def test_sigkill_while_writing_a_checkpoint_leaves_the_old_one_or_the_new_one_whole(tmp_path):
    path = tmp_path / "checkpoints" / "step_1.pt"
    rng = random.Random(int(time.time()))
    for _ in range(2):  # bounded: two kills at random moments of the write loop
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
        assert writer.stdout.readline().strip()  # at least one whole checkpoint exists
        time.sleep(rng.uniform(0.0, 0.5))
        writer.send_signal(signal.SIGKILL)
        writer.wait(30)
        writer.stdout.close()
        state = checkpoint.load_training_state(path)  # never half-written: it loads, and is all one version
        assert state["weights"].shape == (1 << 21,)
        assert torch.equal(state["weights"], torch.full((1 << 21,), float(state["step"])))
    # A temporary file a kill left behind is never taken for a checkpoint.
    assert checkpoint.latest_checkpoint(tmp_path / "checkpoints") == path


def test_a_failed_write_keeps_the_previous_checkpoint_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "step_3.pt"
    checkpoint.save_training_state({"step": 3, "w": torch.ones(4)}, path)

    def crash_half_way(state, tmp):
        with open(tmp, "wb") as handle:
            handle.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_half_way)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_training_state({"step": 4, "w": torch.zeros(4)}, path)
    assert checkpoint.load_training_state(path)["step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_3.pt"]
