"""Start ``tandem serve-target`` as a child process and wait until it serves (``tandem demo``, tests).

    server = start_target_server("default", log_path="runs/demo/serve-target.log")
    ...  # tandem train --target-url server.url
    server.stop()
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

logger = logging.getLogger(__name__)

READY_PREFIX = "tandem serve-target: listening on "


class TargetServerProcess:
    """A running ``tandem serve-target`` child: its ``url``, ``port``, log, ``stop()`` and ``kill()``."""

    def __init__(self, proc: subprocess.Popen, log_path: Path, startup_timeout_s: float):
        self.proc = proc
        self.log_path = log_path
        self.url = self._wait_ready(startup_timeout_s)
        self.port = int(self.url.rsplit(":", 1)[1])
        # Keep draining stdout so the child never blocks on a full pipe.
        threading.Thread(target=self._drain, daemon=True).start()

    def _wait_ready(self, timeout_s: float) -> str:
        lines: list[str] = []

        def read_until_ready():
            for line in self.proc.stdout:
                lines.append(line)
                if line.startswith(READY_PREFIX):
                    return

        reader = threading.Thread(target=read_until_ready, daemon=True)
        reader.start()
        reader.join(timeout_s)
        if lines and lines[-1].startswith(READY_PREFIX):
            return lines[-1][len(READY_PREFIX) :].strip()
        self.kill()
        raise RuntimeError(f"tandem serve-target did not start within {timeout_s:.0f} s; log tail:\n{self.log_tail()}")

    def _drain(self) -> None:
        for _ in self.proc.stdout:
            pass

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM (graceful: the server logs its summary), then wait; SIGKILL if it hangs."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


def start_target_server(
    spec: str = "default",
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    token: Optional[str] = None,
    log_path: Optional[str | Path] = None,
    log_level: str = "INFO",
    extra_args: Sequence[str] = (),
    startup_timeout_s: float = 300.0,
) -> TargetServerProcess:
    """Launch ``tandem serve-target --model spec`` and return once it accepts connections.

    Arguments:
        spec: the target (``default``, an HF directory, a .gguf file).
        port: 0 lets the server pick a free port (read back from its ready line).
        log_path: the server's log file (default: a temporary file).
        extra_args: more ``serve-target`` flags (``--exit-when-idle``, ``--aux-layer-ids``...).
    """
    if log_path is None:
        import tempfile

        log_path = Path(tempfile.mkstemp(prefix="tandem-serve-target-", suffix=".log")[1])
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "tandem.cli", "--log-level", log_level, "serve-target",
           "--model", spec, "--host", host, "--port", str(port), *extra_args]
    env = dict(os.environ)
    if token:
        env["TANDEM_TOKEN"] = token  # not --token: the command line is visible to every user in ps
    started = time.perf_counter()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, bufsize=1, env=env)
    server = TargetServerProcess(proc, log_path, startup_timeout_s)
    logger.info("target server %s up in %.1f s (log: %s)", server.url, time.perf_counter() - started, log_path)
    return server
