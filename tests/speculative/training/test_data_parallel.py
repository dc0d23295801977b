"""Data-parallel draft training on real gloo ranks, against one process at the same global batch.

Two ranks at ``batch_size`` 2 (global batch 4) must give the losses and final weights of one process at
``batch_size`` 4 (within 1e-5 relative): with in-process targets, with both ranks on one remote server,
and with one server each. Only rank 0 writes files. A torchrun job killed after a checkpoint and resumed
with ``tandem train --nproc-per-node 2 --resume`` ends bit-identical to the uninterrupted two-rank run.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from tandem.speculative.training.config import TrainConfig
from tandem.speculative.training.distributed import target_urls_for_rank, throughput_summary
from tandem.speculative.training.trainer import Trainer, train
from tests.conftest import REPO_ROOT
from tests.moe.dist_utils import run_ranks
from tests.speculative.remote.remote_utils import load_tiny_target, save_tiny_target

pytestmark = pytest.mark.timeout(240)

REPO = REPO_ROOT
STEPS = 4
GLOBAL_BATCH = 4
ACCUM = 2  # micro-batches per step: DDP's no_sync path is part of every run
# Summation-order noise after AdamW (see assert_close_relative): measured up to 1.8e-6 (v_proj) with the
# tiny 4-layer target's aux layers [0, 1, 2] (every engine captures them; the earlier [0, 2, 3] gave < 1e-6).
RTOL = 1e-5


def write_chat_data(path: Path, count: int = 16) -> Path:
    """Conversations of different lengths, so ranks hold different numbers of valid positions."""
    with open(path, "w") as handle:
        for i in range(count):
            answer = " ".join(str((i * 7 + j) % 13) for j in range(4 + (i * 5) % 11))
            messages = [{"role": "user", "content": f"go {i}"}, {"role": "assistant", "content": answer}]
            handle.write(json.dumps({"messages": messages}) + "\n")
    return path


def run_fields(root: Path, name: str, **overrides) -> dict:
    fields = dict(data=str(root / "data.jsonl"), output_dir=str(root / name), target=str(root / "target"),
                  total_steps=STEPS, batch_size=GLOBAL_BATCH, max_seq_len=48, draft_vocab_size=120, warmup_steps=1,
                  ttt_steps=2, grad_accum_steps=ACCUM, save_every=2, show_progress=False, learning_rate=3e-3,
                  dtype="float32")
    fields.update(overrides)
    return fields


def cli_flags(fields: dict) -> list[str]:
    flags = []
    for key, value in fields.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else f"--no-{flag[2:]}")
        else:
            flags += [flag, str(value)]
    return flags


def losses(output_dir: Path) -> dict[int, float]:
    """Loss by step; a resumed run's repeated steps keep their last value."""
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows}


def assert_close_relative(got: dict, want: dict) -> None:
    """Each weight tensor within ``RTOL`` in relative L2 norm; the vocabulary maps equal.

    Per tensor, not per element: the ranks sum gradients in another order than one process (float noise
    of ~1e-7), and AdamW divides each element's update by that element's own gradient scale, so an
    element whose gradient is near zero turns the noise into an update ~1e-5 of the largest weight.
    """
    assert sorted(got) == sorted(want)
    for key in want:
        if not want[key].is_floating_point():
            assert torch.equal(got[key], want[key]), key
            continue
        error = (got[key] - want[key]).norm() / want[key].norm().clamp(min=1e-12)
        assert error <= RTOL, f"{key}: relative error {error:.2e}"


def output_files(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


# ---------------------------------------------------------------- the ranks (spawned processes)


def _audit_writes(root: str, seen: list) -> None:
    """Record every file write, directory creation or rename under ``root`` this process makes."""
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def hook(event, args):
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            mode, flags = args[1], args[2]
            writes = ((isinstance(mode, str) and any(c in mode for c in "wax+"))
                      or (isinstance(flags, int) and flags & write_flags))
            if writes and os.fsdecode(args[0]).startswith(root):
                seen.append(f"open {args[0]} {mode!r}")
        elif event in ("os.mkdir", "os.rename", "os.remove", "os.replace") and os.fsdecode(args[0]).startswith(root):
            seen.append(f"{event} {args[0]}")

    sys.addaudithook(hook)


def _rank_runs(root: str, urls: list[str], rank: int, world_size: int) -> dict:
    """Three two-rank runs in one process group: in-process targets, one shared server, a server each."""
    writes: list[str] = []
    if rank != 0:
        _audit_writes(root, writes)
    per_rank = GLOBAL_BATCH // world_size
    # The shared-server run also measures the real acceptance every 2 steps (--eval-every): rank 0 alone, through
    # the server's /verify, and the run must still match one process.
    live_eval = {"eval_every": 2, "eval_prompts": str(Path(root) / "data.jsonl"), "eval_limit": 2,
                 "eval_max_new_tokens": 4, "eval_draft_tokens": 2}
    plans = {"dp_in_process": {}, "dp_shared_server": {"target_urls": urls[:1], **live_eval},
             "dp_server_each": {"target_urls": urls}}
    out = {}
    for name, extra in plans.items():
        trainer = train(TrainConfig(**run_fields(Path(root), name, batch_size=per_rank, **extra)))
        # numpy: torch tensors would cross the result queue as shared memory the exiting rank takes along.
        out[name] = {"step": trainer.step, "vocab": trainer.vocab.selected_token_ids.numpy(),
                     "weights": {k: v.numpy().copy() for k, v in trainer.draft.state_dict().items()}}
    out["writes"] = writes
    return out


# ---------------------------------------------------------------- fixtures


class ThreadServer:
    """A real ``serve()`` HTTP server on loopback, in a thread of this process (no start-up cost)."""

    def __init__(self, target_dir: Path):
        from tandem.speculative.remote.server import TargetModelServer
        from tandem.speculative.remote.serving.http import serve

        self.logic = TargetModelServer(load_tiny_target(target_dir), nccl_port=0)
        ready = threading.Event()
        address = {}

        def on_ready(host, port):
            address.update(host=host, port=port)
            ready.set()

        self.thread = threading.Thread(target=serve, args=(self.logic, "127.0.0.1", 0), kwargs={"on_ready": on_ready},
                                       daemon=True)
        self.thread.start()
        assert ready.wait(30)
        self.url = f"http://{address['host']}:{address['port']}"

    def stop(self) -> None:
        self.logic.shutdown_event.set()
        self.thread.join(10)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data_parallel")
    write_chat_data(root / "data.jsonl")
    save_tiny_target(root / "target")
    return root


@pytest.fixture(scope="module")
def servers(root):
    started = [ThreadServer(root / "target"), ThreadServer(root / "target")]
    yield started
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def reference(root) -> Trainer:
    """One process at the global batch: what every two-rank run must reproduce."""
    trainer = train(TrainConfig(**run_fields(root, "one_rank")))
    assert trainer.step == STEPS
    return trainer


@pytest.fixture(scope="module")
def two_ranks(root, servers, reference) -> list[dict]:
    return run_ranks(2, functools.partial(_rank_runs, str(root), [s.url for s in servers]), timeout=200)


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("run", ["dp_in_process", "dp_shared_server", "dp_server_each"])
def test_two_ranks_match_one_process_at_the_global_batch(root, reference, two_ranks, run):
    want = {k: v for k, v in reference.draft.state_dict().items()}
    for rank_out in two_ranks:
        assert rank_out[run]["step"] == STEPS
        # The vocabulary from all-reduced shard counts is the one-process vocabulary.
        assert torch.equal(torch.from_numpy(rank_out[run]["vocab"]), reference.vocab.selected_token_ids)
        assert_close_relative({k: torch.from_numpy(v) for k, v in rank_out[run]["weights"].items()}, want)
    got, expected = losses(root / run), losses(root / "one_rank")
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=RTOL), step


def test_rank_zero_measures_acceptance_during_a_data_parallel_run(root, two_ranks):
    rows = [json.loads(line) for line in (root / "dp_shared_server" / "metrics.jsonl").read_text().splitlines()]
    measured = [row["step"] for row in rows if "eval_acceptance_length" in row]
    assert measured == list(range(2, STEPS + 1, 2))
    assert all(row["eval_outputs_match"] and row["eval_prompts"] == 2 for row in rows if "eval_prompts" in row)


def test_only_rank_zero_writes_files(root, two_ranks):
    assert two_ranks[1]["writes"] == []
    assert two_ranks[0]["writes"] == []  # rank 0 is not audited: the list stays empty by construction
    files = output_files(root / "dp_in_process")
    assert files == ["checkpoints/step_2.pt", "checkpoints/step_4.pt", "draft_vocab.safetensors",
                     "eagle3-draft/config.json", "eagle3-draft/model.safetensors", "metrics.jsonl"]
    assert len((root / "dp_in_process" / "metrics.jsonl").read_text().splitlines()) == STEPS


def test_servers_count_batches_per_rank(servers, two_ranks):
    shared, other = (server.logic.summary() for server in servers)
    # Shared run: both ranks on server 0, a session each. Server-each run: rank r on server r.
    assert "rank0" in shared and "rank1" in shared and "rank1" in other
    per_rank = f": {STEPS * ACCUM}"  # supervised micro-batches of one rank's run
    assert shared.count(per_rank) == 3 and other.count(per_rank) == 1, (shared, other)


def _kill_after_first_checkpoint() -> None:
    """torchrun entry for the kill test: ``tandem train`` whose rank 0 SIGKILLs itself after step_2.pt."""
    original = Trainer.save_checkpoint

    def save_then_die(self):
        path = original(self)
        if path is not None and self.step == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return path

    Trainer.save_checkpoint = save_then_die
    from tandem.train import main

    sys.exit(main(sys.argv[1:]))


def test_torchrun_kill_then_resume_is_exact(root, two_ranks):
    fields = run_fields(root, "killed", batch_size=GLOBAL_BATCH // 2)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    killed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
         "tests.speculative.training.test_data_parallel", "--log-level", "WARNING", *cli_flags(fields)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=150)
    assert killed.returncode != 0, killed.stdout + killed.stderr
    assert output_files(root / "killed" / "checkpoints") == ["step_2.pt"]
    resumed = subprocess.run(
        [sys.executable, "-m", "tandem.cli", "train", "--nproc-per-node", "2", "--resume", *cli_flags(fields)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=150)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from" in resumed.stderr and "[rank 1]" in resumed.stderr
    assert "throughput: 2 trainer(s), in-process target" in resumed.stderr  # rank 0's aggregate line
    from safetensors.torch import load_file

    exported = load_file(str(root / "killed" / "eagle3-draft" / "model.safetensors"))
    uninterrupted = two_ranks[0]["dp_in_process"]["weights"]
    assert "fc.weight" in exported and "midlayer.self_attn.q_proj.weight" in exported
    for key, value in exported.items():
        if key in uninterrupted:
            assert torch.equal(value, torch.from_numpy(uninterrupted[key])), key
    assert losses(root / "killed") == losses(root / "dp_in_process")


def test_one_rank_resumes_a_two_rank_checkpoint_and_says_what_changes(root, reference, two_ranks, caplog):
    def resume_from_two_rank_step_2(name: str, batch_size: int) -> Trainer:
        (root / name / "checkpoints").mkdir(parents=True)
        shutil.copy(root / "dp_in_process" / "checkpoints" / "step_2.pt", root / name / "checkpoints")
        return train(TrainConfig(**run_fields(root, name, batch_size=batch_size, resume=True)))

    # Same global batch (1 rank x 4 = 2 ranks x 2): the run goes on as if nothing changed.
    with caplog.at_level(logging.WARNING):
        same = resume_from_two_rank_step_2("resized_same_global", GLOBAL_BATCH)
    assert "2-rank run on 1 ranks with the same global batch 4" in caplog.text
    assert "the data order (the same samples per step)" in caplog.text
    assert_close_relative(same.draft.state_dict(), reference.draft.state_dict())
    caplog.clear()
    # Half the global batch: said plainly, with the flag that would keep it.
    with caplog.at_level(logging.WARNING):
        resume_from_two_rank_step_2("resized_half_global", GLOBAL_BATCH // 2)
    assert "global batch 4 (2 ranks) at global batch 2 (1 ranks x batch_size 2)" in caplog.text
    assert "pass --batch-size 4" in caplog.text


# ---------------------------------------------------------------- pure helpers


def test_ranks_get_disjoint_server_shares_or_share_round_robin():
    urls = ["a", "b", "c", "d"]
    assert [target_urls_for_rank(urls, r, 2) for r in range(2)] == [["a", "c"], ["b", "d"]]
    assert [target_urls_for_rank(urls[:1], r, 3) for r in range(3)] == [["a"], ["a"], ["a"]]
    assert [target_urls_for_rank(urls[:2], r, 3) for r in range(3)] == [["a"], ["b"], ["a"]]
    assert target_urls_for_rank(urls, 0, 1) == urls


def test_throughput_summary_says_which_side_bounds_the_run():
    # Two trainers on one server waiting half of each 1 s step: target-bound; the server spends 0.5 s per
    # trainer-step against 0.5 s of trainer compute -> 1 server per trainer balances it.
    rows = torch.tensor([[1000.0, 1.0, 0.5, 0.9, 4], [1000.0, 1.0, 0.5, 0.9, 4]], dtype=torch.float64)
    line = throughput_summary(rows, num_servers=1)
    assert "target-bound" in line and "about 1.00 servers per trainer (2 for 2 trainers)" in line
    idle = torch.tensor([[1000.0, 1.0, 0.0, 0.25, 4]], dtype=torch.float64)
    assert "trainer-bound: about 0.25 servers per trainer" in throughput_summary(idle, num_servers=1)


if __name__ == "__main__":
    _kill_after_first_checkpoint()
