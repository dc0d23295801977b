"""UCCLBuffer's single-node detection and backend choice (no communication needed)."""

from __future__ import annotations

import logging
import sys
import types

import pytest
import torch

from tandem.moe.uccl_ep import buffer as uccl


class FakeGroup:
    def __init__(self, size: int) -> None:
        self._size = size

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return 0


@pytest.fixture(autouse=True)
def _portable(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("TANDEM_EP_BACKEND", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.mark.parametrize(
    "local_world_size, group_size, intranode",
    [("8", 4, True), ("4", 4, True), ("2", 4, False)],
    ids=["local-above-group", "local-equal-group", "local-below-group"],
)
def test_local_world_size_decides_intranode(monkeypatch, local_world_size, group_size, intranode):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world_size)
    buf = uccl.UCCLBuffer(FakeGroup(group_size), num_nvl_bytes=1 << 20, num_rdma_bytes=1 << 30, explicitly_destroy=True)
    assert buf.is_intranode is intranode
    assert buf.num_rdma_bytes == (0 if intranode else 1 << 30)
    assert buf.num_nvl_bytes == 1 << 20 and buf.explicitly_destroy  # the other arguments pass through
    assert buf.num_rdma_ranks == 1  # at most 8 ranks is one NVLink domain either way


def test_unset_local_world_size_falls_back_to_gpu_count_then_one(monkeypatch):
    assert not uccl.UCCLBuffer(FakeGroup(2), num_rdma_bytes=7).is_intranode  # no GPUs: one rank per node
    assert uccl.UCCLBuffer(FakeGroup(1), num_rdma_bytes=7).is_intranode
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    buf = uccl.UCCLBuffer(FakeGroup(8), num_rdma_bytes=7)
    assert buf.is_intranode and buf.num_rdma_bytes == 0


def test_explicit_is_intranode_is_kept():
    buf = uccl.UCCLBuffer(FakeGroup(16), num_rdma_bytes=5, is_intranode=True)
    assert buf.is_intranode and buf.num_rdma_bytes == 0 and buf.num_rdma_ranks == 1


def test_portable_backend_is_logged_once(caplog):
    with caplog.at_level(logging.INFO, logger=uccl.__name__):
        buf = uccl.UCCLBuffer(FakeGroup(2))
    assert isinstance(buf, uccl.Buffer)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["tandem.moe: UCCLBuffer uses the portable torch.distributed backend"]


@pytest.mark.parametrize("module_name", ["deep_ep", "uccl.ep"])
def test_native_runtime_serves_behind_the_same_call(monkeypatch, caplog, module_name):
    made = {}

    class NativeBuffer:
        def __init__(self, **kwargs):
            made.update(kwargs)

    fake = types.ModuleType(module_name)
    fake.Buffer = NativeBuffer
    if module_name == "uccl.ep":
        monkeypatch.setitem(sys.modules, "uccl", types.ModuleType("uccl"))
    monkeypatch.setitem(sys.modules, module_name, fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    with caplog.at_level(logging.INFO, logger=uccl.__name__):
        buf = uccl.UCCLBuffer(FakeGroup(4), 123, num_rdma_bytes=1 << 30, low_latency_mode=True)
    assert isinstance(buf, NativeBuffer)
    assert made["num_nvl_bytes"] == 123 and made["low_latency_mode"] and made["num_rdma_bytes"] == 0
    assert ("is_intranode" in made) is (module_name == "uccl.ep")
    assert any(module_name in r.getMessage() for r in caplog.records)

    monkeypatch.setenv("TANDEM_EP_BACKEND", "portable")
    assert isinstance(uccl.UCCLBuffer(FakeGroup(4)), uccl.Buffer)


def test_reexports():
    from tandem.moe import ep
    from tandem.moe.uccl_ep.buffer import Buffer, EventHandle, EventOverlap, UCCLBuffer

    assert Buffer is ep.Buffer and EventOverlap is ep.EventOverlap and EventHandle is ep.EventHandle
    assert issubclass(UCCLBuffer, Buffer)
