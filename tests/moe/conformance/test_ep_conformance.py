"""One conformance suite for every expert-parallel backend: the same cases (`cases.py`), each against the
plain single-process reference, on groups of 2 and 4 ranks.

Spawning ranks is the expensive part, so each group size spawns once per kind of backend (the portable
ones on gloo, the native ones on NCCL with a GPU per rank) and runs every case of every backend there;
each test then asserts its own recorded outcome. Native backends that cannot run here are skipped with
the reason (package missing, no CUDA, too few GPUs).
"""

from __future__ import annotations

import functools
import traceback

import pytest
import torch.distributed as dist

from tests.moe.conformance.backends import BACKENDS
from tests.moe.conformance.cases import CASES, Ctx
from tests.moe.dist_utils import assert_scenario, run_ranks

WORLD_SIZES = (2, 4)


def _run_cases(specs, rank: int, world: int) -> dict:
    outcome = {}
    for spec in specs:
        ctx = None
        for name, (apis, case) in CASES.items():
            if spec.api not in apis:
                continue
            key = f"{spec.name}/{name}"
            try:
                if ctx is None:
                    ctx = Ctx(spec, spec.build(dist.group.WORLD), dist.group.WORLD, rank, world)
                case(ctx)
                outcome[key] = None
            except BaseException:  # noqa: BLE001 - reported per case
                outcome[key] = traceback.format_exc()
            dist.barrier()  # a case that failed on one rank must not leave the others in its collectives
    return outcome


def _portable_rank_main(rank: int, world: int) -> dict:
    return _run_cases([b for b in BACKENDS if not b.native], rank, world)


def _native_rank_main(rank: int, world: int) -> dict:
    return _run_cases([b for b in BACKENDS if b.native and b.unavailable(world) is None], rank, world)


@functools.lru_cache(maxsize=None)
def _outcomes(native: bool, world: int):
    if native:
        return run_ranks(world, _native_rank_main, timeout=300, backend="nccl")
    return run_ranks(world, _portable_rank_main, timeout=300)


PAIRS = [(spec, case) for spec in BACKENDS for case, (apis, _) in CASES.items() if spec.api in apis]


@pytest.mark.timeout(400)
@pytest.mark.parametrize("world", WORLD_SIZES, ids=lambda n: f"{n}ranks")
@pytest.mark.parametrize("spec,case", PAIRS, ids=[f"{s.name}-{c}" for s, c in PAIRS])
def test_backend_matches_the_reference(world, spec, case):
    reason = spec.unavailable(world)
    if reason is not None:
        pytest.skip(f"{spec.name}: {reason}")
    assert_scenario(_outcomes(spec.native, world), f"{spec.name}/{case}")
