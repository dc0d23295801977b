"""Serving a target across the processes of a node: transformers' tensor parallelism, launched like torchrun.

``tandem serve-target --nproc-per-node N`` starts N processes (``torch.distributed.run``, torchrun's launcher), and
each loads the target with ``tp_plan="auto"``: transformers shards every decoder layer's projections over the ranks
and all-reduces their outputs, so each layer's output (the aux states), the final hidden state and the logits
are whole on every rank. Rank 0 serves HTTP; the others follow: before each forward the server runs, rank 0
broadcasts its input ids and attention mask, and every rank runs the same forward (and its collectives). Only the
stateless forward of supervision is mirrored; ``/verify`` (per-client KV caches) and the compact encoding (the
output head's rows) are not offered under tensor parallelism.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

FORWARD, STOP = 1, 0
"""What rank 0 announces to the followers: a forward (then its ids and mask), or the end."""

HIDDEN_FROM_THE_LEADER = ("greedy_forward", "forward_cached", "decode_session", "supervise_compact", "draft_lm_head")
"""The target methods a tensor-parallel server does not offer (their state or weights are not mirrored)."""


def launched_world_size() -> int:
    """``WORLD_SIZE`` when this process was started by a torchrun-style launcher, else 1."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def relaunch_argv(nproc_per_node: int, argv: list[str]) -> list[str]:
    """``torch.distributed.run`` arguments that start ``tandem <argv>`` on ``nproc_per_node`` local ranks."""
    return ["--standalone", f"--nproc-per-node={nproc_per_node}", "-m", "tandem.cli", *argv]


def init_group(device: str) -> torch.device:
    """Join the launcher's process group (gloo on CPU, NCCL on GPUs); the device this rank computes on."""
    if device.startswith("cuda"):
        local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=local)
        return local
    dist.init_process_group("gloo")
    return torch.device("cpu")


def announce_forwards(model: torch.nn.Module, device: torch.device):
    """On rank 0: broadcast each top-level forward's ``input_ids`` and ``attention_mask`` ``[B, S]`` to the
    followers before it runs; returns the hook handle."""

    def announce(_module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        mask = torch.ones_like(input_ids) if mask is None else mask
        dist.broadcast(torch.tensor([FORWARD, *input_ids.shape], dtype=torch.long, device=device), 0)
        dist.broadcast(input_ids.to(device, torch.long).contiguous(), 0)
        dist.broadcast(mask.to(device, torch.long).contiguous(), 0)

    return model.register_forward_pre_hook(announce, with_kwargs=True)


def stop_followers(device: torch.device) -> None:
    """On rank 0, at exit: end the followers' loops."""
    dist.broadcast(torch.tensor([STOP, 0, 0], dtype=torch.long, device=device), 0)


@torch.no_grad()
def follow(model: torch.nn.Module, device: torch.device) -> int:
    """On ranks > 0: run every forward rank 0 announces until it says stop; the number of forwards run."""
    forwards = 0
    while True:
        header = torch.empty(3, dtype=torch.long, device=device)
        dist.broadcast(header, 0)
        op, batch, seq = header.tolist()
        if op == STOP:
            return forwards
        input_ids = torch.empty(batch, seq, dtype=torch.long, device=device)
        mask = torch.empty(batch, seq, dtype=torch.long, device=device)
        dist.broadcast(input_ids, 0)
        dist.broadcast(mask, 0)
        model(input_ids=input_ids, attention_mask=mask, use_cache=False)
        forwards += 1


class SupervisionOnlyTarget:
    """An ``Eagle3TargetModel`` as a tensor-parallel rank 0 serves it: supervision only (see the module docstring).

    Everything but ``HIDDEN_FROM_THE_LEADER`` is the wrapped target's; ``model`` is None, so the server offers the
    full encoding only.
    """

    model = None

    def __init__(self, target):
        self._target = target

    def __getattr__(self, name: str):
        if name in HIDDEN_FROM_THE_LEADER:
            raise AttributeError(f"{name} is not served under tensor parallelism")
        return getattr(self._target, name)

    def get_input_embeddings(self) -> torch.Tensor:
        """``[V, H]`` the token embedding, whole (a replicated DTensor's local copy)."""
        weight = self._target.get_input_embeddings()
        return weight.full_tensor() if hasattr(weight, "full_tensor") else weight
