"""Expert parallelism on two CPU processes with DeepEP's V2 API: no GPU, no DeepEP install.

    python -m tandem.moe.example                      # spawns 2 gloo ranks on this machine
    torchrun --nproc-per-node 2 -m tandem.moe.example # the same ranks started by torchrun

Part 1 drives `ElasticBuffer` by hand: every rank routes its tokens to top-2 of 8 experts (4 per rank),
the experts scale their rows, weighted outputs go home with `combine`, and each rank checks the result
against the same computation done locally. Part 2 trains an expert-parallel `MoELayer` on a toy
regression for a few steps; its gradients come back through combine and cached dispatch.
"""

from __future__ import annotations

import argparse
import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tandem.moe.dispatcher import MoELayer
from tandem.moe.ep import ElasticBuffer

HIDDEN, NUM_EXPERTS, TOP_K = 64, 8, 2


def route_by_hand(rank: int, world: int) -> float:
    """Dispatch, expert work, weighted combine; returns the largest difference from the local result."""
    torch.manual_seed(rank)
    buffer = ElasticBuffer(dist.group.WORLD, num_max_tokens_per_rank=64, hidden=HIDDEN, num_topk=TOP_K)
    x = torch.randn(16 + 8 * rank, HIDDEN)
    topk_weights, topk_idx = torch.rand(x.size(0), NUM_EXPERTS).softmax(-1).topk(TOP_K, dim=-1)

    recv_x, recv_topk_idx, recv_topk_weights, handle, _ = buffer.dispatch(
        x, topk_idx=topk_idx, topk_weights=topk_weights, num_experts=NUM_EXPERTS)
    # The experts here are "multiply by (global expert id + 1)"; -1 marks selections held by another rank.
    first_expert = rank * (NUM_EXPERTS // world)
    scale = torch.where(recv_topk_idx >= 0, recv_topk_idx + first_expert + 1, 0).float()
    expert_out = recv_x * (recv_topk_weights * scale).sum(dim=1, keepdim=True)  # weight before combine
    combined, _, _ = buffer.combine(expert_out, handle)

    local = x * (topk_weights * (topk_idx + 1).float()).sum(dim=1, keepdim=True)
    print(f"[rank {rank}] received {recv_x.size(0)} rows from {world} ranks "
          f"(per local expert: {handle.num_recv_tokens_per_expert_list}); "
          f"combine vs local: max |diff| = {(combined - local).abs().max():.2e}")
    return float((combined - local).abs().max())


def train(rank: int, world: int, steps: int) -> list:
    """A few Adam steps of an expert-parallel MoE layer fitting a fixed random linear map."""
    torch.manual_seed(0)  # same router and target on every rank; experts differ by rank below
    layer = MoELayer(HIDDEN, 96, NUM_EXPERTS, TOP_K, group=dist.group.WORLD, api="v2")
    target = torch.randn(HIDDEN, HIDDEN) / HIDDEN**0.5
    torch.manual_seed(1 + rank)
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-2)
    x = torch.randn(64, HIDDEN)  # this rank's batch, seen every step
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(layer(x), x @ target)
        optimizer.zero_grad()
        loss.backward()
        dist.all_reduce(layer.router.weight.grad)  # the router is replicated: average it like DDP would
        layer.router.weight.grad /= world
        optimizer.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(float(mean) / world)
    if rank == 0:
        print("MoELayer(api='v2') training loss: " + " ".join(f"{v:.4f}" for v in losses))
    return losses


def main_rank(rank: int, world: int, steps: int) -> None:
    torch.set_num_threads(1)  # several ranks share a few cores
    diff = route_by_hand(rank, world)
    losses = train(rank, world, steps)
    if rank == 0:
        ok = diff < 1e-4 and losses[-1] < losses[0]
        print("example finished: " + ("dispatch/combine match and the loss went down" if ok else "FAILED"))


def _spawned(rank: int, world: int, port: int, steps: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        main_rank(rank, world, steps)
    finally:
        dist.destroy_process_group()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, default=2, help="ranks to spawn without torchrun (default: 2)")
    parser.add_argument("--steps", type=int, default=20, help="training steps (default: 20)")
    args = parser.parse_args(argv)
    if "RANK" in os.environ:  # started by torchrun: one process per rank already
        dist.init_process_group("gloo", timeout=timedelta(seconds=60))
        try:
            main_rank(dist.get_rank(), dist.get_world_size(), args.steps)
        finally:
            dist.destroy_process_group()
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # forkserver: torch is imported once, in the server, and each rank is a fork of it (a plain spawn
    # imports torch again in every rank, seconds each on a small machine).
    mp.set_forkserver_preload(["torch", "torch.distributed", "tandem.moe.example"])
    mp.start_processes(_spawned, args=(args.ranks, port, args.steps), nprocs=args.ranks, start_method="forkserver")


if __name__ == "__main__":
    main()
