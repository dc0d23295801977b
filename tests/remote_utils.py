"""Real target-server processes for the remote tests.

``python -m tests.remote_utils --port 0 --seed 0`` builds the tiny random Llama of ``conftest`` with a
fixed seed (so the server and an in-process reference hold identical weights), serves it, and prints
``READY <port>`` once it accepts connections. :class:`ServerProcess` starts and stops such a process.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
READY_PREFIX = "READY "


def build_tiny_target(seed: int = 0):
    """The tiny Llama of ``conftest.build_tiny_llama(seed)`` as an ``Eagle3TargetModel``."""
    from tandem.speculative.eagle.target import Eagle3TargetModel
    from tests.conftest import build_tiny_llama

    return Eagle3TargetModel(build_tiny_llama(seed=seed))


def tiny_vocab_mapping(vocab_size: int = 320, draft_size: int = 200, seed: int = 0):
    """A valid draft vocabulary: ``(selected_token_ids [Vd] long, selected_token_mask [V] bool)``."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randperm(vocab_size, generator=generator)[:draft_size].sort().values
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    mask[ids] = True
    return ids, mask


def tiny_batch(batch: int = 2, seq: int = 16, seed: int = 0, vocab_size: int = 320):
    """``(input_ids, attention_mask, loss_mask)``, each ``[batch, seq]``, with padding at the end of row 0."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (batch, seq), generator=generator)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    attention_mask[0, seq - 3 :] = 0
    loss_mask = attention_mask.clone()
    loss_mask[:, : seq // 4] = 0
    return input_ids, attention_mask, loss_mask


class ServerProcess:
    """A target server in its own process, on loopback.

    Arguments:
        port: 0 for a free port (the child binds it and reports it back), or a fixed one (a restart).
        extra: more arguments for ``tests.remote_utils`` (``--token``, ``--exit-when-idle``).
    """

    def __init__(self, port: int = 0, seed: int = 0, extra: tuple[str, ...] = (), startup_timeout_s: float = 60.0):
        cmd = [sys.executable, "-m", "tests.remote_utils", "--port", str(port), "--seed", str(seed), *extra]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.stderr_lines: list[str] = []
        # Drain stderr continuously: a full pipe would block the server's logging.
        self._stderr_thread = threading.Thread(target=self._drain_stderr, daemon=True)
        self._stderr_thread.start()
        self.port = self._wait_ready(startup_timeout_s)
        self.url = f"http://127.0.0.1:{self.port}"

    def _drain_stderr(self) -> None:
        for line in self.proc.stderr:
            self.stderr_lines.append(line)

    def _wait_ready(self, timeout_s: float) -> int:
        deadline = time.monotonic() + timeout_s
        result: list[str] = []
        reader = threading.Thread(target=lambda: result.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(max(0.0, deadline - time.monotonic()))
        line = result[0] if result else ""
        if not line.startswith(READY_PREFIX):
            self.kill()
            raise RuntimeError(f"target server did not start: {line!r}\n{''.join(self.stderr_lines)[-3000:]}")
        return int(line[len(READY_PREFIX) :])

    @property
    def stderr(self) -> str:
        return "".join(self.stderr_lines)

    def stop(self, timeout_s: float = 15.0) -> int:
        """SIGTERM (a graceful stop: the summary is logged), then wait; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.terminate()
        code = self.proc.wait(timeout_s)
        self._stderr_thread.join(5)
        return code

    def kill(self) -> None:
        """SIGKILL: the crash of a server mid-training."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(15)
        self._stderr_thread.join(5)

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc_info) -> None:
        if self.proc.poll() is None:
            self.stop()


def main(argv: list[str] | None = None) -> None:
    from tandem.speculative.eagle.remote.server import TargetModelServer, serve

    parser = argparse.ArgumentParser(description="serve the tiny test target")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--token", default=None)
    parser.add_argument("--exit-when-idle", action="store_true")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(name)s: %(message)s")
    logic = TargetModelServer(
        build_tiny_target(args.seed),
        nccl_port=0,
        token=args.token,
        max_body_bytes=args.max_body_bytes,
        exit_when_idle=args.exit_when_idle,
    )
    serve(logic, "127.0.0.1", args.port, on_ready=lambda host, port: print(f"{READY_PREFIX}{port}", flush=True))


if __name__ == "__main__":
    main()
