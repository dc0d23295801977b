"""Serving a target across the processes of a node: transformers' tensor parallelism, launched like torchrun.

``tandem serve-target --nproc-per-node N`` starts N processes (``torch.distributed.run``, torchrun's launcher), and
each loads the target with ``tp_plan="auto"``: transformers shards every decoder layer's projections over the ranks
and all-reduces their outputs, so each layer's output (the aux states), the final hidden state and the logits
are whole on every rank. Rank 0 serves HTTP; the others follow, running every forward rank 0 runs (and so its
collectives), in the same order:

- supervision (``/generate``): before each stateless forward rank 0 broadcasts its input ids and attention mask;
- ``/verify``: each rank keeps its own shard of every decode cache (its heads' keys and values). Rank 0's caches
  carry an id and a ``mirror_log`` of what was done to them between forwards (a crop, a kept tree branch:
  ``verification.crop_cache`` / ``select_cache_positions`` record it); before each decoding forward rank 0
  broadcasts the cache's id, that log, the ids, the tree and the captured layers, and the followers replay the log
  on their shard and run the same ``greedy_forward``. Caches rank 0 has freed are dropped on the followers at the
  next forward. The logits come from the model's own (sharded, gathered) output head on every rank, not from
  a float32 copy of it, which rank 0 alone would hold whole.

The compact encoding (the output head's rows) is not offered under tensor parallelism.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import weakref

import torch
import torch.distributed as dist

from tandem.speculative.target.model import Eagle3TargetModel

logger = logging.getLogger(__name__)

FORWARD, STOP, VERIFY = 1, 0, 2
"""What rank 0 announces to the followers: a stateless forward, a decoding forward, or the end."""
HEADER = 8
"""Longs in an announcement's header: ``[op, ...]`` (see ``announce_forwards`` and ``TensorParallelTarget``)."""

HIDDEN_FROM_THE_LEADER = ("forward_cached", "decode_session", "supervise_compact", "draft_lm_head")
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


class Announcer:
    """On rank 0: broadcasts each top-level forward's ``input_ids`` and ``attention_mask`` ``[B, S]`` to the
    followers before it runs (a forward pre-hook), except inside ``paused`` (a decoding forward, announced
    otherwise)."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.device, self.paused = device, False
        self.handle = model.register_forward_pre_hook(self._announce, with_kwargs=True)

    def _announce(self, _module, args, kwargs) -> None:
        if self.paused:
            return
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        mask = torch.ones_like(input_ids) if mask is None else mask
        broadcast_header([FORWARD, *input_ids.shape], self.device)
        dist.broadcast(input_ids.to(self.device, torch.long).contiguous(), 0)
        dist.broadcast(mask.to(self.device, torch.long).contiguous(), 0)


def broadcast_header(fields: list[int], device: torch.device) -> None:
    dist.broadcast(torch.tensor(fields + [0] * (HEADER - len(fields)), dtype=torch.long, device=device), 0)


def _broadcast_longs(values: list[int], device: torch.device) -> None:
    if values:
        dist.broadcast(torch.tensor(values, dtype=torch.long, device=device), 0)


def _receive_longs(count: int, device: torch.device) -> list[int]:
    if count <= 0:
        return []
    values = torch.empty(count, dtype=torch.long, device=device)
    dist.broadcast(values, 0)
    return values.tolist()


def stop_followers(device: torch.device) -> None:
    """On rank 0, at exit: end the followers' loops."""
    broadcast_header([STOP], device)


def _encode_log(log: list[tuple]) -> list[int]:
    """A cache's ``mirror_log`` as longs: ``[0, keep_length]`` a crop, ``[1, past, m, *keep]`` a kept branch."""
    out: list[int] = []
    for operation in log:
        if operation[0] == "crop":
            out += [0, int(operation[1])]
        else:
            out += [1, int(operation[1]), len(operation[2]), *operation[2]]
    return out


def _replay_log(cache, flat: list[int]) -> None:
    from tandem.speculative.decoding.verification import crop_cache, select_cache_positions

    i = 0
    while i < len(flat):
        if flat[i] == 0:
            crop_cache(cache, flat[i + 1])
            i += 2
        else:
            past, count = flat[i + 1], flat[i + 2]
            select_cache_positions(cache, past, torch.tensor(flat[i + 3 : i + 3 + count], dtype=torch.long))
            i += 3 + count


@torch.no_grad()
def follow(target, device: torch.device) -> int:
    """On ranks > 0: run every forward rank 0 announces, on ``target`` (this rank's ``TensorParallelEagle3Target``)
    and this rank's shards of the decode caches, until it says stop; the number of forwards run."""
    forwards, caches = 0, {}
    while True:
        header = torch.empty(HEADER, dtype=torch.long, device=device)
        dist.broadcast(header, 0)
        op, *fields = header.tolist()
        if op == STOP:
            return forwards
        if op == FORWARD:
            batch, seq = fields[:2]
            input_ids = torch.empty(batch, seq, dtype=torch.long, device=device)
            mask = torch.empty(batch, seq, dtype=torch.long, device=device)
            dist.broadcast(input_ids, 0)
            dist.broadcast(mask, 0)
            target.generate_batch(input_ids, mask, torch.zeros_like(mask))
        else:
            cache_id, log_length, batch, new, tree_length, layer_count, drops = fields
            for dropped in _receive_longs(drops, device):
                caches.pop(dropped, None)
            log = _receive_longs(log_length, device)
            input_ids = torch.empty(batch, new, dtype=torch.long, device=device)
            dist.broadcast(input_ids, 0)
            tree = _receive_longs(tree_length, device) if tree_length >= 0 else None
            layers = _receive_longs(layer_count, device) if layer_count >= 0 else None
            cache = caches.setdefault(cache_id, target.new_decode_cache())
            _replay_log(cache, log)
            target.greedy_forward(input_ids, cache, tree, layers)
        forwards += 1


class TensorParallelTarget:
    """An ``Eagle3TargetModel`` as a tensor-parallel rank 0 serves it (see the module docstring): supervision and
    ``/verify``, each forward announced to the followers first.

    Everything but ``HIDDEN_FROM_THE_LEADER`` is the wrapped target's; ``model`` is None, so the server offers the
    full encoding only.
    """

    model = None

    def __init__(self, target, announcer: Announcer):
        self._target, self._announcer = target, announcer
        self._ids = itertools.count()
        self._freed: collections.deque[int] = collections.deque()  # appended by finalizers, from any thread

    def __getattr__(self, name: str):
        if name in HIDDEN_FROM_THE_LEADER:
            raise AttributeError(f"{name} is not served under tensor parallelism")
        return getattr(self._target, name)

    def get_input_embeddings(self) -> torch.Tensor:
        """``[V, H]`` the token embedding, whole (a replicated DTensor's local copy)."""
        weight = self._target.get_input_embeddings()
        return weight.full_tensor() if hasattr(weight, "full_tensor") else weight

    def new_decode_cache(self):
        """The target's decode cache, with an id and a ``mirror_log`` for the followers' shards of it."""
        cache = self._target.new_decode_cache()
        cache.mirror_id, cache.mirror_log = next(self._ids), []
        weakref.finalize(cache, self._freed.append, cache.mirror_id)
        return cache

    def greedy_forward(self, input_ids: torch.Tensor, cache, tree_parents: list[int] | None = None,
                       layer_ids: list[int] | None = None):
        """``Eagle3TargetModel.greedy_forward`` on every rank: announced (the cache's id and changes since its
        last forward, ``input_ids [B, n]`` long, the tree, the layers), then run here."""
        device = self._announcer.device
        freed = [self._freed.popleft() for _ in range(len(self._freed))]
        log, cache.mirror_log = _encode_log(cache.mirror_log), []
        batch, new = input_ids.shape
        broadcast_header([VERIFY, cache.mirror_id, len(log), batch, new,
                          -1 if tree_parents is None else len(tree_parents),
                          -1 if layer_ids is None else len(layer_ids), len(freed)], device)
        _broadcast_longs(freed, device)
        _broadcast_longs(log, device)
        dist.broadcast(input_ids.to(device, torch.long).contiguous(), 0)
        _broadcast_longs(list(tree_parents or []), device)
        _broadcast_longs(list(layer_ids or []), device)
        self._announcer.paused = True
        try:
            return self._target.greedy_forward(input_ids, cache, tree_parents, layer_ids)
        finally:
            self._announcer.paused = False


class TensorParallelEagle3Target(Eagle3TargetModel):
    """An ``Eagle3TargetModel`` over a tensor-parallel model, on every rank: its decoding logits come from the model's
    own output head (sharded, its outputs gathered by a collective every rank runs), not from the float32 copy of
    the head that ``greedy_forward`` uses on one process (each rank holds only its shard of the weight)."""

    def _output_head(self):
        return None

    def _float32_head(self):
        return None
