"""Soak: one target server, two training clients, faults on a schedule; nothing lost, nothing repeated.

    .venv/bin/python -m bench.soak --steps 40 --save-every 5          # the long run (a few minutes on CPU)

Every process is real (``tandem serve-target``, ``tandem train --target-url``) on loopback, with the tiny
random Llama of the tests as the target. Faults, each fired when a client's metrics reach a step:

- ``kill_server``: SIGKILL the server, restart it on the same port; the clients ride it out on retries
  and teach the new server the draft vocabulary again;
- ``kill_client``: SIGKILL a client, start it again with ``--resume`` (it continues from its last
  checkpoint and redoes the steps after it);
- ``teardown_pg``: tear down a client's process-group data plane mid-transfer: the server runs with the
  data plane on and ``--enable-fault-injection``, and SIGUSR1 makes its next data-plane send stop after
  the first tensor and tear the group down; the client falls back to HTTP and asks for that batch again.
  Clients never set a group up again with a server that lost theirs (or with a restarted one), so this
  fault comes first in the default schedule.

At the end every client must have applied every step exactly once: its metrics, keeping the last row of
a step a resumed run redid, hold steps 1..N once each with the very losses of a fault-free run (a lost or
repeated batch would shift every later loss), and its exported draft equals the fault-free one bit for bit.
The fault-free run is the same training with the target in-process (remote training is bit-identical to
it, tests/speculative/remote/test_remote_training.py). Prints requests served, faults injected, recoveries and the final
loss difference (0 on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from tandem.speculative.remote.launch import TargetServerProcess
from tests.speculative.remote.remote_utils import save_tiny_target, start_tiny_server

CLIENTS = ("a", "b")


@dataclass(kw_only=True)
class Fault:
    """Fire ``kind`` once client ``watch`` has logged step ``at_step`` (``target`` names the client to kill)."""

    kind: str
    watch: str
    at_step: int
    target: str = ""
    outcome: str = "pending"


@dataclass(kw_only=True)
class SoakReport:
    steps: int
    requests_served: int = 0
    faults: list[Fault] = field(default_factory=list)
    recoveries: int = 0
    final_loss_diff: float = float("nan")
    weights_equal: bool = False
    exactly_once: bool = False
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.exactly_once and self.weights_equal and self.final_loss_diff == 0.0 and not self.problems

    def summary(self) -> str:
        injected = [f for f in self.faults if f.outcome.startswith("injected")]
        lines = [
            f"soak: {self.steps} steps x {len(CLIENTS)} clients; requests served {self.requests_served}; "
            f"faults injected {len(injected)}; recoveries {self.recoveries}",
            *(f"  {f.kind:<12} at {f.watch} step {f.at_step}: {f.outcome}" for f in self.faults),
            f"  every step applied exactly once: {self.exactly_once}; final weights equal the fault-free run: "
            f"{self.weights_equal}; final loss difference: {self.final_loss_diff:g}",
            *(f"  PROBLEM: {p}" for p in self.problems),
            f"soak: {'PASS' if self.ok else 'FAIL'}",
        ]
        return "\n".join(lines)


def default_schedule(steps: int, save_every: int) -> list[Fault]:
    """Group teardown (while the data plane is up), server kill, client kill + resume, spread over the run."""
    s = max(save_every + 1, 2)
    return [
        Fault(kind="teardown_pg", watch="a", at_step=max(min(s // 2, steps - 2), 1)),
        Fault(kind="kill_server", watch="a", at_step=min(s, steps - 2)),
        Fault(kind="kill_client", watch="b", at_step=min(s + save_every, steps - 2), target="b"),
        *([Fault(kind="kill_client", watch="a", at_step=steps - save_every // 2 - 1, target="a")]
          if steps >= 4 * save_every else []),
    ]


# ---------------------------------------------------------------- runs


def write_chat_data(path: Path, count: int = 24) -> Path:
    with open(path, "w") as handle:
        for i in range(count):
            answer = " ".join(str((i * 7 + j) % 13) for j in range(10))
            handle.write(json.dumps({"messages": [{"role": "user", "content": f"go {i}"},
                                                  {"role": "assistant", "content": answer}]}) + "\n")
    return path


def train_command(root: Path, name: str, target_dir: Path, steps: int, save_every: int, *,
                  target_url: str | None = None, resume: bool = False) -> list[str]:
    """``tandem train`` on the tiny target: in-process, or against ``target_url``."""
    cmd = [sys.executable, "-m", "tandem.cli", "--log-level", "WARNING", "train", "--data", str(root / "data.jsonl"),
           "--output-dir", str(root / name), "--target", str(target_dir), "--total-steps", str(steps),
           "--batch-size", "4", "--max-seq-len", "48", "--draft-vocab-size", "120", "--warmup-steps", "1",
           "--ttt-steps", "2", "--save-every", str(save_every), "--keep-checkpoints", "2",
           "--learning-rate", "3e-3", "--no-show-progress",
           # The fault-free reference loads the target in-process; the server loads it in float32
           # (start_tiny_server), so the reference must too, or "auto" (bf16 on AMX CPUs) makes them differ.
           "--dtype", "float32"]
    if target_url:
        cmd += ["--target-url", target_url]
    if resume:
        cmd.append("--resume")
    return cmd


def read_metrics(output_dir: Path) -> list[dict]:
    """Rows of ``metrics.jsonl``; a last line cut short by SIGKILL is skipped (it was never complete)."""
    path = output_dir / "metrics.jsonl"
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def last_step(output_dir: Path) -> int:
    rows = read_metrics(output_dir)
    return rows[-1]["step"] if rows else 0


def effective_history(rows: list[dict]) -> tuple[list[dict], list[str]]:
    """The steps that count, in order: a resumed run redoes the steps after its checkpoint, whose first
    rows died with the killed process, so the later row of a step replaces the earlier. Problems: a
    resumed run that does not continue right after an earlier step (a gap), or steps out of order."""
    kept: dict[int, dict] = {}
    problems, previous = [], 0
    for row in rows:
        step = row["step"]
        if step > previous + 1:
            problems.append(f"step {step} follows step {previous}: steps {previous + 1}..{step - 1} were never applied")
        if step <= previous:  # a resume: drop what the killed run did from here on
            kept = {s: r for s, r in kept.items() if s < step}
        kept[step] = row
        previous = step
    return [kept[s] for s in sorted(kept)], problems


def exported(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(output_dir / "eagle3-draft" / "model.safetensors"))


def check_client(output_dir: Path, reference_dir: Path, steps: int) -> tuple[bool, bool, float, list[str]]:
    """``(exactly_once, weights_equal, final_loss_diff, problems)`` of one client against the reference."""
    history, problems = effective_history(read_metrics(output_dir))
    want = read_metrics(reference_dir)
    exactly_once = [r["step"] for r in history] == list(range(1, steps + 1)) and not problems
    if exactly_once and [r["loss"] for r in history] != [r["loss"] for r in want]:
        problems.append(f"{output_dir.name}: losses differ from the fault-free run (a batch lost or repeated)")
        exactly_once = False
    got, ref = exported(output_dir), exported(reference_dir)
    weights_equal = sorted(got) == sorted(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    loss_diff = abs(history[-1]["loss"] - want[-1]["loss"]) if history and want else float("inf")
    return exactly_once, weights_equal, loss_diff, [f"{output_dir.name}: {p}" for p in problems]


def count_requests(log_paths: list[Path]) -> int:
    """Requests answered, from every server incarnation's DEBUG request lines (a killed one logs no summary)."""
    pattern = re.compile(r"client=\S+ status=\d+")
    return sum(len(pattern.findall(p.read_text(errors="replace"))) for p in log_paths if p.exists())


# ---------------------------------------------------------------- the soak

# What the server logs when an armed fault cuts a data-plane send short (server.flush_nccl_send).
_TEARDOWN_LINE = "fault injection: tearing down client"


def start_server(target_dir: Path, log_path: Path, port: int = 0) -> TargetServerProcess:
    """The tiny target with the process-group data plane on and fault injection enabled (SIGUSR1)."""
    return start_tiny_server(target_dir, log_path, "--enable-fault-injection", port=port, nccl_timeout_s=30)


@dataclass
class _Cluster:
    """The live processes of a soak: the server (restarted in place) and one trainer per client."""

    root: Path
    target_dir: Path
    steps: int
    save_every: int
    server: TargetServerProcess
    server_logs: list[Path]
    clients: dict[str, subprocess.Popen] = field(default_factory=dict)

    def launch(self, name: str, resume: bool = False) -> None:
        log = open(self.root / f"client-{name}.log", "a")
        cmd = train_command(self.root, name, self.target_dir, self.steps, self.save_every,
                            target_url=self.server.url, resume=resume)
        # Each trainer is rank 0 of its own job, so both would propose the same data-plane port, and the
        # second one's rendezvous can break the first's group: give each client a port of its own.
        env = {**os.environ, "TANDEM_NCCL_PORT": str(self.server.port + 100 + CLIENTS.index(name))}
        self.clients[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()

    def restart_server(self) -> float:
        started = time.monotonic()
        self.server.kill()
        self.server_logs.append(self.root / f"server-{len(self.server_logs)}.log")
        self.server = start_server(self.target_dir, self.server_logs[-1], port=self.server.port)
        return time.monotonic() - started

    def stop(self) -> None:
        for proc in self.clients.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
        self.server.stop()


def _fire(fault: Fault, cluster: _Cluster) -> None:
    if fault.kind == "kill_server":
        took = cluster.restart_server()
        fault.outcome = f"injected: SIGKILL, restarted on port {cluster.server.port} in {took:.1f} s"
    elif fault.kind == "kill_client":
        proc = cluster.clients[fault.target]
        if proc.poll() is not None:
            fault.outcome = "missed: the client had already finished"
            return
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        killed_at = last_step(cluster.root / fault.target)
        cluster.launch(fault.target, resume=True)
        fault.outcome = f"injected: SIGKILL at step {killed_at}, started again with --resume"
    elif fault.kind == "teardown_pg":
        cluster.server.proc.send_signal(signal.SIGUSR1)  # armed: the next data-plane send is cut short
        fault.outcome = "armed: no data-plane send followed"  # refined once the server logs are read
    else:
        raise ValueError(f"unknown fault kind {fault.kind!r}")


def _drive(cluster: _Cluster, faults: list[Fault], deadline: float) -> list[str]:
    """Fire the faults as the clients reach their steps; wait for every client to finish. Problems back."""
    pending = list(faults)
    while time.monotonic() < deadline:
        while pending and last_step(cluster.root / pending[0].watch) >= pending[0].at_step:
            _fire(pending.pop(0), cluster)
        if all(proc.poll() is not None for proc in cluster.clients.values()):
            break
        time.sleep(0.05)
    else:
        return [f"the soak ran past its time limit with faults {[f.kind for f in pending]} pending"]
    for fault in pending:
        fault.outcome = "missed: the watched client finished first"
    return [f"client {name} exited with {proc.returncode} (log: {cluster.root / f'client-{name}.log'})"
            for name, proc in cluster.clients.items() if proc.returncode != 0]


def _account(report: SoakReport, cluster: _Cluster) -> None:
    """Requests, recoveries and the teardown_pg verdict from the server logs and the client exits."""
    report.requests_served = count_requests(cluster.server_logs)
    logs = [p.read_text(errors="replace") for p in cluster.server_logs if p.exists()]
    torn_down = [line for text in logs for line in text.splitlines() if _TEARDOWN_LINE in line]
    fell_back = [name for name in CLIENTS
                 if "data plane lost" in (cluster.root / f"client-{name}.log").read_text(errors="replace")]
    for index, fault in enumerate(report.faults):
        if fault.kind == "teardown_pg":
            if torn_down:
                client = re.search(r"client (\S+)'s", torn_down.pop(0))
                fault.outcome = f"injected: client {client.group(1) if client else '?'}'s group torn down mid-send"
                # Recovered: a client lost its group, went on over HTTP and finished.
                report.recoveries += bool(fell_back) and all(cluster.clients[n].returncode == 0 for n in fell_back)
            elif not any("data plane up" in text for text in logs):
                fault.outcome = "missed: no client had a data-plane group"
        elif fault.outcome.startswith("injected"):
            if fault.kind == "kill_server":
                # Recovered: the restarted server (log index+1 of the kills so far) supervised batches.
                restarted = cluster.server_logs[1 + sum(f.kind == "kill_server" for f in report.faults[:index])]
                report.recoveries += "POST /generate" in restarted.read_text(errors="replace")
            else:
                report.recoveries += cluster.clients[fault.target].returncode == 0


def run_soak(root: Path, steps: int = 12, save_every: int = 3, schedule: list[Fault] | None = None,
             time_limit_s: float = 600.0) -> SoakReport:
    """Run the fault-free reference and the faulted cluster under ``root``; returns the report."""
    root.mkdir(parents=True, exist_ok=True)
    write_chat_data(root / "data.jsonl")
    target_dir = save_tiny_target(root / "target")
    report = SoakReport(steps=steps, faults=schedule if schedule is not None else default_schedule(steps, save_every))
    deadline = time.monotonic() + time_limit_s
    with open(root / "fault_free.log", "w") as log:
        reference = subprocess.Popen(train_command(root, "fault_free", target_dir, steps, save_every),
                                     stdout=log, stderr=subprocess.STDOUT)
    cluster = _Cluster(root, target_dir, steps, save_every, start_server(target_dir, root / "server-0.log"),
                       [root / "server-0.log"])
    try:
        for name in CLIENTS:
            cluster.launch(name)
        report.problems += _drive(cluster, report.faults, deadline)
        if reference.wait(max(deadline - time.monotonic(), 1)) != 0:
            report.problems.append(f"the fault-free run failed (log: {root / 'fault_free.log'})")
    finally:
        cluster.stop()
        if reference.poll() is None:
            reference.kill()
    _account(report, cluster)
    if report.problems:
        return report
    results = [check_client(root / name, root / "fault_free", steps) for name in CLIENTS]
    report.exactly_once = all(r[0] for r in results)
    report.weights_equal = all(r[1] for r in results)
    report.final_loss_diff = max(r[2] for r in results)
    report.problems += [p for r in results for p in r[3]]
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per client (default: 40)")
    parser.add_argument("--save-every", type=int, default=5, help="checkpoint interval (default: 5)")
    parser.add_argument("--root", default=None, help="work directory (default: a fresh temporary one)")
    parser.add_argument("--time-limit", type=float, default=900.0, help="seconds before the soak gives up")
    args = parser.parse_args(argv)
    import tempfile

    root = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="tandem-soak-"))
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # three processes share the cores; no oversubscription
    report = run_soak(root, args.steps, args.save_every, time_limit_s=args.time_limit)
    print(report.summary())
    print(f"(work directory: {root})")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
