"""Spawn real gloo ranks for the MoE tests and collect what each returns.

Each test module runs all its multi-rank scenarios in one spawn per world size (process start-up and
`import torch` dominate on a 2-core machine), records per-scenario outcomes, and lets one pytest test per
behaviour assert on its own outcome.
"""

from __future__ import annotations

import functools
import os
import queue
import socket
import traceback
from datetime import timedelta
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, results, backend: str = "gloo") -> None:
    # Two ranks per core here: keep each one single-threaded so they do not fight over the cores.
    import torch

    torch.set_num_threads(1)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)  # one GPU per rank, as the native EP kernels need
        dist.init_process_group(
            backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
            timeout=timedelta(seconds=30),
        )
        out = fn(rank, world_size)
        results.put((rank, out, None))
    except BaseException:  # noqa: BLE001 - the parent reports it
        results.put((rank, None, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        # Interpreter teardown with torch loaded takes seconds; the result is already flushed.
        results.close()
        results.join_thread()
        os._exit(0)


def run_ranks(world_size: int, fn: Callable, timeout: float = 120.0, backend: str = "gloo") -> List[object]:
    """
    Run `fn(rank, world_size)` on `world_size` spawned processes joined in one group (gloo on CPU; "nccl"
    puts rank `r` on GPU `r`).

    Returns:
        outputs: what each rank's `fn` returned, indexed by rank. Raises if a rank failed or hung.
    """
    # forkserver: one server process imports torch once, then every rank is a cheap fork of it (a
    # fresh `spawn` per rank re-imports torch, seconds each on two cores). The server never ran torch
    # work, so forking it is safe where forking pytest itself would not be.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "tandem.moe.ep", __name__])
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, results, backend),
                         daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    outputs: Dict[int, object] = {}
    errors: Dict[int, str] = {}
    try:
        for _ in range(world_size):
            rank, out, err = results.get(timeout=timeout)
            if err is not None:
                errors[rank] = err
            else:
                outputs[rank] = out
    except queue.Empty:
        errors[-1] = f"timed out after {timeout}s waiting for ranks {sorted(set(range(world_size)) - set(outputs))}"
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("rank failures:\n" + "\n".join(f"[rank {r}]\n{e}" for r, e in sorted(errors.items())))
    return [outputs[r] for r in range(world_size)]


def run_scenarios(scenarios: Dict[str, Callable], rank: int, world_size: int) -> Dict[str, Optional[str]]:
    """Run each scenario in order on this rank; map its name to None (passed) or the failure text."""
    outcome: Dict[str, Optional[str]] = {}
    for name, scenario in scenarios.items():
        try:
            scenario(rank, world_size)
            outcome[name] = None
        except BaseException:  # noqa: BLE001 - reported per scenario
            outcome[name] = traceback.format_exc()
        # Keep ranks in step: a scenario that failed on one rank must not leave another waiting inside
        # the next scenario's collectives with mismatched shapes.
        dist.barrier()
    return outcome


def scenario_fixtures(
    scenarios: Dict[str, Callable], world_sizes: Sequence[int] = (2, 4)
) -> Tuple[Callable, Callable]:
    """
    The two fixtures a module's one-test-per-scenario test takes: `outcomes`, every rank's outcomes of all
    `scenarios` run in one spawn per world size (module scope, so each world size spawns once), and
    `scenario`, each scenario's name in turn. Assign them to those names in the module:

        outcomes, scenario = scenario_fixtures(SCENARIOS)

        def test_buffer_behaviour(outcomes, scenario):
            assert_scenario(outcomes, scenario)
    """
    # A partial of module-level functions pickles by reference, so the spawned ranks can receive it.
    run_all = functools.partial(run_scenarios, scenarios)

    @pytest.fixture(scope="module", params=list(world_sizes), ids=lambda n: f"{n}ranks")
    def outcomes(request):
        return run_ranks(request.param, run_all)

    @pytest.fixture(params=sorted(scenarios))
    def scenario(request):
        return request.param

    return outcomes, scenario


def assert_scenario(outcomes: List[Dict[str, Optional[str]]], name: str) -> None:
    failures = {rank: o[name] for rank, o in enumerate(outcomes) if o.get(name, "missing") is not None}
    assert not failures, "\n".join(f"[rank {r}] {name}:\n{msg}" for r, msg in failures.items())
