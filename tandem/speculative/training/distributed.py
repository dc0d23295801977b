"""Data-parallel draft training: this rank's place in the job and the few collectives the trainer needs.

torch.distributed is the engine: torchrun starts the ranks, DDP averages the gradients (gloo on CPU, NCCL on
GPU). This module reads what torchrun set into one :class:`DistributedContext` the trainer holds (no process
group in a module global), and adds what makes W ranks at ``batch_size`` b train exactly as one rank at W*b:
the global batch order, the loss divided by the global valid count, all-reduced vocabulary counts, rank 0
alone writing files, and each rank's share of the ``--target-url`` servers (docs/scaling.md).

    torchrun --nproc-per-node 8 -m tandem.train --data chat.jsonl --output-dir runs/dp --batch-size 4
    tandem train --nproc-per-node 8 --data chat.jsonl --output-dir runs/dp --batch-size 4   # the same
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in the job; a single process is ``world_size == 1`` with no group.

    Every collective helper is a no-op at ``world_size == 1``, so the one-process path runs unchanged.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    group: Optional[dist.ProcessGroup] = None
    owns_group: bool = False
    """True when ``init_distributed`` created the default group (so ``close`` destroys it)."""

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _reduce(self, tensor: torch.Tensor, op) -> torch.Tensor:
        if not self.enabled:
            return tensor
        # NCCL reduces device tensors only; gloo takes them as they are.
        staged = tensor.to(self.device) if self.device.type == "cuda" else tensor
        dist.all_reduce(staged, op=op, group=self.group)
        return staged.to(tensor.device) if staged is not tensor else tensor

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The elementwise sum over ranks (in place on CPU tensors); ``tensor`` as it is at W = 1."""
        return self._reduce(tensor, dist.ReduceOp.SUM)

    def all_agree(self, flag: bool) -> bool:
        """True only if ``flag`` is True on every rank (a host sync)."""
        return bool(self._reduce(torch.tensor([int(flag)]), dist.ReduceOp.MIN).item())

    def broadcast_int(self, value: int) -> int:
        """Rank 0's ``value`` on every rank (a host sync)."""
        if not self.enabled:
            return value
        tensor = torch.tensor([value], dtype=torch.long, device=self.device)
        dist.broadcast(tensor, src=0, group=self.group)
        return int(tensor.item())

    def gather_rows(self, row: torch.Tensor) -> torch.Tensor:
        """``[W, n]``: row r is rank r's ``row [n]`` (every rank gets all rows; a host sync)."""
        rows = torch.zeros(self.world_size, row.numel(), dtype=row.dtype)
        rows[self.rank] = row
        return self.all_reduce_sum(rows)

    def wrap(self, module: nn.Module) -> nn.Module:
        """``module`` in DDP when W > 1 (gradients averaged over ranks during backward), else as is."""
        if not self.enabled:
            return module
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        # The draft's buffers (vocabulary maps) are identical on every rank by construction;
        # re-broadcasting them before every forward would be a wasted collective.
        return nn.parallel.DistributedDataParallel(module, device_ids=device_ids, process_group=self.group,
                                                   forward_sync_buffers=False)

    @staticmethod
    def no_sync(module: nn.Module, sync: bool):
        """Skip DDP's gradient all-reduce for this backward unless ``sync`` (gradient accumulation)."""
        if sync or not isinstance(module, nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext()
        return module.no_sync()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _default_device(local_rank: int) -> torch.device:
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def current_context() -> DistributedContext:
    """The context of an already initialised default group (or a single process); never initialises."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistributedContext(device=_default_device(0))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = _default_device(local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device,
                              group=dist.group.WORLD)


def init_distributed(backend: Optional[str] = None, timeout_s: float = 1800.0) -> DistributedContext:
    """Join the job torchrun started (``WORLD_SIZE`` > 1), or describe a single process.

    Arguments:
        backend: ``nccl`` or ``gloo``; default NCCL when CUDA is available, else gloo.
        timeout_s: how long a collective may wait for a peer before the job fails.
    """
    if dist.is_available() and dist.is_initialized():
        return current_context()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext(device=_default_device(0))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    context = DistributedContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                                 device=device, group=dist.group.WORLD, owns_group=True)
    logger.info("rank %d of %d (%s, %s)", context.rank, context.world_size, backend, device)
    return context


def target_urls_for_rank(urls: list[str], rank: int, world_size: int) -> list[str]:
    """The servers rank ``rank`` sends its requests to (its client round-robins over them).

    With at least as many servers as ranks, each rank gets a disjoint share ``urls[rank::world_size]``
    (every server used, no two ranks on one server); with fewer, ranks share: rank r uses
    ``urls[r % len(urls)]``. One rank gets every URL, as before data parallelism.
    """
    if not urls:
        return []
    if len(urls) >= world_size:
        return urls[rank::world_size]
    return [urls[rank % len(urls)]]


def servers_in_use(urls: list[str], world_size: int) -> int:
    """How many distinct servers the ranks of a ``world_size`` job talk to."""
    return len({u for r in range(world_size) for u in target_urls_for_rank(urls, r, world_size)})


# A remote run whose trainers spend more than this share of step time waiting is limited by its targets.
TARGET_BOUND_WAIT_SHARE = 0.10


@dataclass
class RankThroughput:
    """One rank's totals over a run, in seconds and tokens.

    ``wait_s``: time the step was blocked on supervision; ``latency_s``: summed time from request to
    answer over ``requests`` supervision requests (for the in-process target both equal the target's
    forward time).
    """

    tokens: float = 0.0
    step_s: float = 0.0
    wait_s: float = 0.0
    latency_s: float = 0.0
    requests: float = 0.0

    FIELDS = ("tokens", "step_s", "wait_s", "latency_s", "requests")

    def as_tensor(self) -> torch.Tensor:
        """``[5]`` float64 in ``FIELDS`` order (for ``DistributedContext.gather_rows``)."""
        return torch.tensor([getattr(self, name) for name in self.FIELDS], dtype=torch.float64)

    def line(self, rank: int) -> str:
        tokens_per_s = self.tokens / max(self.step_s, 1e-9)
        return (f"rank {rank}: {tokens_per_s:.0f} tok/s, {self.wait_s / max(self.step_s, 1e-9):.0%} of step time "
                f"waiting for supervision")


def throughput_summary(rows: torch.Tensor, num_servers: int) -> str:
    """The aggregate line rank 0 prints: total speed, and whether targets or trainers limit the run.

    Arguments:
        rows: ``[W, 5]`` float64, one ``RankThroughput.as_tensor()`` per rank.
        num_servers: remote target servers in use; 0 for in-process targets.

    The balance estimate compares the target time one trainer needs per step with the trainer's own
    compute time per step (step time minus waiting). Target-bound remote run: the servers are saturated,
    so a server spends ``servers/trainers x step time`` per trainer-step. Trainer-bound remote run: the
    request latency bounds the server time from above. In-process: the target's forward time.
    """
    world_size = rows.shape[0]
    tokens, step_s, wait_s, latency_s, _ = (rows[:, i] for i in range(5))
    compute_s = (step_s - wait_s).clamp(min=1e-9).mean().item()
    wait_share = (wait_s / step_s.clamp(min=1e-9)).mean().item()
    total = tokens.sum().item() / max(step_s.max().item(), 1e-9)  # the ranks step in lockstep
    head = f"throughput: {world_size} trainer(s), "
    if num_servers == 0:
        target_s = wait_s.mean().item()
        bound = "target-bound" if target_s > compute_s else "trainer-bound"
        head += (f"in-process target: {total:.0f} tok/s ({total / world_size:.0f} per trainer); the target's forward "
                 f"takes {wait_share:.0%} of step time -> {bound}; served remotely, about {target_s / compute_s:.2f} "
                 f"servers per trainer as fast as this device would balance it")
        return head
    target_bound = wait_share > TARGET_BOUND_WAIT_SHARE
    target_s = num_servers / world_size * step_s.mean().item() if target_bound else latency_s.mean().item()
    balance = target_s / compute_s
    head += (f"{num_servers} target server(s): {total:.0f} tok/s ({total / world_size:.0f} per trainer); trainers "
             f"waited {wait_share:.0%} of step time for supervision -> ")
    if target_bound:
        return head + (f"target-bound: about {balance:.2f} servers per trainer ({max(round(balance * world_size), 1)} "
                       f"for {world_size} trainers) would balance it (now {num_servers / world_size:.2f})")
    if balance <= 1.0:
        return head + (f"trainer-bound: about {balance:.2f} servers per trainer would keep up "
                       f"(now {num_servers / world_size:.2f})")
    # Waiting is rare yet a request takes longer than a step: prefetch hides the latency (which includes
    # queueing behind the previous request), so the servers keep up and more of them would only idle.
    return head + (f"trainer-bound: the server(s) keep up, prefetch hiding {latency_s.mean().item():.2f} s of request "
                   f"latency; more servers would not speed this run up")
