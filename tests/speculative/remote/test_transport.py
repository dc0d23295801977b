"""NCCLTransport on CPU through gloo, between real processes: every wire dtype, None and empty tensors,
torch's registries left clean, a taken port, a peer that dies or stalls mid-transfer (bounded, torn
down), and the environment rules. The peer (rank 0, the server side) runs in a child process; this
process is the client (rank 1), or the server when the client is the one that dies."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tandem.speculative.remote import protocol
from tandem.speculative.remote.transport import (
    NCCLTransport,
    ReceiveBufferPool,
    TransportError,
    _agree_backend,
    nccl_enabled,
    nccl_port_for,
)
from tandem.speculative.remote.wire import CODE_TO_DTYPE
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.timeout(60)

TIMEOUT_S = 5  # group timeout: rendezvous and each transfer
BIG = 8 * 2**20  # bytes: more than loopback socket buffers hold, so a send needs a live receiver


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sample_tensors(seed: int) -> dict:
    """Every wire dtype, a 0-d tensor, shapes with zero elements and None entries."""
    g = torch.Generator().manual_seed(seed)
    out: dict = {}
    for code, dtype in sorted(CODE_TO_DTYPE.items()):
        values = torch.randn(3, 5, generator=g) * 100
        out[f"t{code}_{str(dtype).removeprefix('torch.')}"] = (values > 0) if dtype == torch.bool else values.to(dtype)
    out["scalar_i16"] = torch.tensor(-1234, dtype=torch.int16)
    out["empty_bf16"] = torch.empty(0, 7, dtype=torch.bfloat16)
    out["empty_bool"] = torch.empty(4, 0, 2, dtype=torch.bool)
    out["none_a"] = None
    out["tail_i8"] = torch.tensor([-128, -1, 0, 127], dtype=torch.int8)
    out["none_b"] = None
    return out


def metadata_of(tensors: dict) -> tuple[list, dict]:
    """What the server's ``/generate`` answer carries, through the real encoder and checking decoder."""
    return protocol.decode_nccl_metadata(protocol.encode_nccl_metadata(tensors, list(tensors)))


def registry_mentions(name: str) -> list:
    c10d = dist.distributed_c10d
    hits = [pg for pg, group_name in c10d._world.pg_names.items() if group_name == name]
    try:
        c10d._resolve_process_group(name)
        hits.append("c10d name registry")
    except Exception:  # noqa: BLE001 - unknown names raise
        pass
    return hits


# ---------------------------------------------------------------- the peer process


def _peer(port: int, is_server: bool, scenario: str) -> None:
    torch.set_num_threads(1)
    transport = NCCLTransport(port, "127.0.0.1", is_server=is_server)
    if not transport.initialize(timeout_seconds=TIMEOUT_S):
        os._exit(3)
    if scenario in ("send_samples", "send_thrice"):
        for seed in (0, 1) if scenario == "send_samples" else (0, 1, 2):  # transfers on one group
            tensors = sample_tensors(seed)
            transport.send_tensors(tensors, list(tensors))
        time.sleep(2)  # let the receiver finish before our sockets close
    elif scenario == "stall":
        time.sleep(60)  # alive, never sends: the receiver must give up by its timeout
    elif scenario == "die":
        os._exit(0)  # gone before the transfer: the sender must fail, not hang
    os._exit(0)


def start_peer(port: int, scenario: str, is_server: bool = True):
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "tandem.speculative.remote.transport"])
    process = ctx.Process(target=_peer, args=(port, is_server, scenario), daemon=True)
    process.start()
    return process


@pytest.fixture()
def reaper():
    processes = []
    yield processes.append
    for process in processes:
        process.kill()
        process.join(10)


# ---------------------------------------------------------------- tests


def test_every_wire_dtype_none_and_empty_shapes_round_trip_over_gloo(reaper):
    port = free_port()
    reaper(start_peer(port, "send_samples"))
    client = NCCLTransport(port, "127.0.0.1", is_server=False)
    assert client.initialize(timeout_seconds=TIMEOUT_S)
    assert client.is_initialized and client.backend == "gloo" and client.device == torch.device("cpu")
    for seed in (0, 1):
        expected = sample_tensors(seed)
        keys_order, metadata = metadata_of(expected)
        got = client.recv_tensors(metadata, keys_order)
        assert list(got) == list(expected)
        for key, want in expected.items():
            if want is None:
                assert got[key] is None, key
                continue
            assert got[key].dtype == want.dtype and got[key].shape == want.shape, key
            assert torch.equal(got[key], want), key
    client.destroy()


def test_destroy_leaves_no_registry_entry_is_idempotent_and_refuses_further_use(reaper):
    port = free_port()
    name = f"nemo_eagle_target_transfer_{port}"
    reaper(start_peer(port, "send_samples"))
    client = NCCLTransport(port, "127.0.0.1", is_server=False)
    maps_before = (len(dist.distributed_c10d._world.pg_map), len(dist.distributed_c10d._world.pg_names))
    assert client.initialize(timeout_seconds=TIMEOUT_S)
    # Never registered: the training job's destroy_process_group() cannot trip over it.
    assert registry_mentions(name) == [] and not dist.is_initialized()
    keys_order, metadata = metadata_of(sample_tensors(0))
    client.recv_tensors(metadata, keys_order)
    started = time.monotonic()
    client.destroy()
    client.destroy()
    assert time.monotonic() - started < 1.0  # never waits for the peer
    assert not client.is_initialized and registry_mentions(name) == []
    assert (len(dist.distributed_c10d._world.pg_map), len(dist.distributed_c10d._world.pg_names)) == maps_before
    with pytest.raises(TransportError, match="not initialized"):
        client.recv_tensors(metadata, keys_order)
    assert client.initialize(timeout_seconds=TIMEOUT_S) is False  # destroyed for good


def storage_address(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def test_pool_never_hands_out_a_buffer_while_anything_carved_from_it_is_alive():
    pool = ReceiveBufferPool(capacity=2, min_bytes=0)
    first = pool.take(1000)
    address = storage_address(first)
    # Each of these, alone, keeps the buffer busy: a derived view, a NumPy array, the storage object.
    holders = [
        lambda t: t[100:200].view(torch.int32).reshape(5, 5),
        lambda t: t[:8].numpy(),
        lambda t: t.untyped_storage(),
    ]
    for make in holders:
        held = make(first)
        del first
        other = pool.take(1000)
        assert storage_address(other) != address, make  # busy: a second pooled buffer
        del other, held
        first = pool.take(1000)  # both free, equally large: the first in the pool, the one held before
        assert storage_address(first) == address and len(pool) == 2, make
    # Every pooled buffer busy: a one-off, never a buffer in use.
    busy = [first, pool.take(1000)]
    assert storage_address(pool.take(1000)) not in {storage_address(b) for b in busy}
    assert len(pool) == 2


def test_received_tensors_reuse_pooled_memory_only_after_the_previous_result_is_gone(reaper):
    port = free_port()
    reaper(start_peer(port, "send_thrice"))
    pool = ReceiveBufferPool(capacity=4, min_bytes=0)
    client = NCCLTransport(port, "127.0.0.1", is_server=False, receive_pool=pool)
    assert client.initialize(timeout_seconds=TIMEOUT_S)
    keys_order, metadata = metadata_of(sample_tensors(0))
    first = client.recv_tensors(metadata, keys_order)
    key = "t0_float32"
    kept = first[key][1:].clone(), first[key][1:]  # only a view of one tensor survives the dict
    first_address = storage_address(kept[1])
    del first
    second = client.recv_tensors(metadata, keys_order)
    assert storage_address(second[key]) != first_address  # the first result is alive: not reused
    assert torch.equal(kept[1], kept[0]) and torch.equal(second[key], sample_tensors(1)[key])
    second_address = storage_address(second[key])
    del kept, second
    third = client.recv_tensors(metadata, keys_order)
    assert storage_address(third[key]) in (first_address, second_address)  # nothing alive: reused
    assert len(pool) == 2
    for name, want in sample_tensors(2).items():
        assert (third[name] is None) if want is None else torch.equal(third[name], want), name
    client.destroy()


def test_taken_port_makes_the_server_side_fail_fast():
    with socket.socket() as squatter:
        squatter.bind(("0.0.0.0", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        server = NCCLTransport(port, "127.0.0.1", is_server=True)
        started = time.monotonic()
        assert server.initialize(timeout_seconds=TIMEOUT_S) is False
        assert time.monotonic() - started < TIMEOUT_S - 1  # a bind error, not a wait for the timeout
        assert not server.is_initialized
        server.destroy()


def test_client_waiting_for_an_absent_server_gives_up_at_its_timeout():
    client = NCCLTransport(free_port(), "127.0.0.1", is_server=False)
    started = time.monotonic()
    assert client.initialize(timeout_seconds=2) is False
    assert 1.0 < time.monotonic() - started < 4.0  # about its timeout, never the minutes of a hang


def test_server_killed_mid_receive_fails_the_receiver_at_once_and_tears_down(reaper):
    port = free_port()
    peer = start_peer(port, "stall")
    reaper(peer)
    client = NCCLTransport(port, "127.0.0.1", is_server=False)
    assert client.initialize(timeout_seconds=TIMEOUT_S)
    keys_order, metadata = metadata_of({"big": torch.empty(BIG // 4), "small": torch.empty(3)})
    threading.Timer(0.5, peer.kill).start()
    started = time.monotonic()
    with pytest.raises(TransportError, match="receive failed"):
        client.recv_tensors(metadata, keys_order)
    assert time.monotonic() - started < TIMEOUT_S  # the closed sockets say so before the timeout
    assert not client.is_initialized


def test_stalled_server_fails_the_receiver_by_the_group_timeout(reaper):
    port = free_port()
    reaper(start_peer(port, "stall"))
    client = NCCLTransport(port, "127.0.0.1", is_server=False)
    assert client.initialize(timeout_seconds=2)
    keys_order, metadata = metadata_of({"x": torch.empty(10)})
    started = time.monotonic()
    with pytest.raises(TransportError, match="receive failed"):
        client.recv_tensors(metadata, keys_order)
    assert 1.5 < time.monotonic() - started < 8
    assert not client.is_initialized


def test_dead_client_fails_the_servers_send_and_frees_the_port_for_the_next(reaper):
    port = free_port()
    reaper(start_peer(port, "die", is_server=False))
    server = NCCLTransport(port, "127.0.0.1", is_server=True)
    assert server.initialize(timeout_seconds=TIMEOUT_S)
    time.sleep(0.5)  # the client is gone
    started = time.monotonic()
    with pytest.raises(TransportError, match="send failed"):
        server.send_tensors({"big": torch.zeros(BIG // 4)}, ["big"])
    assert time.monotonic() - started < TIMEOUT_S + 2
    assert not server.is_initialized
    # The port is free again: the next client gets a working group on it.
    reaper(start_peer(port, "die", is_server=False))
    again = NCCLTransport(port, "127.0.0.1", is_server=True)
    assert again.initialize(timeout_seconds=TIMEOUT_S)
    again.destroy()


def test_dtypes_nccl_lacks_travel_as_uint8_views_of_the_same_bytes():
    transport = NCCLTransport(1, "127.0.0.1", is_server=True)
    transport.backend, transport.device = "nccl", torch.device("cpu")  # no CUDA here: only the view logic
    for dtype in (torch.int8, torch.int16, torch.bool):
        tensor = torch.arange(6).reshape(2, 3).to(dtype)
        view = transport._wire_view(tensor)
        assert view.dtype == torch.uint8 and view.numel() == tensor.numel() * tensor.element_size()
        assert torch.equal(view.view(dtype).reshape(2, 3), tensor)
    for dtype in (torch.float32, torch.bfloat16, torch.int64, torch.uint8):
        assert transport._wire_view(torch.zeros(2, 3, dtype=dtype)).dtype == dtype
    transport.backend = "gloo"  # gloo moves raw bytes: nothing is reinterpreted
    assert transport._wire_view(torch.zeros(4, dtype=torch.bool)).dtype == torch.bool


def test_backend_agreement_is_symmetric_and_refuses_conflicts():
    cases = {
        ("nccl:0", "nccl:0"): "nccl", ("nccl:0", "gloo:0"): "gloo", ("gloo:0", "gloo:0"): "gloo",
        ("nccl:1", "gloo:0"): "nccl", ("gloo:1", "nccl:0"): "gloo",
    }
    for (a, b), want in cases.items():
        assert _agree_backend(a, b) == _agree_backend(b, a) == want, (a, b)
    with pytest.raises(TransportError, match="mismatch"):
        _agree_backend("nccl:1", "gloo:1")
    with pytest.raises(ValueError, match="backend"):
        NCCLTransport(1, "127.0.0.1", True, backend="mpi")


def test_environment_switch_and_port_rule():
    assert nccl_enabled({}) and nccl_enabled({"TANDEM_ENABLE_NCCL": "1"})
    assert not nccl_enabled({"TANDEM_ENABLE_NCCL": "0"}) and not nccl_enabled({"NEMO_EAGLE_ENABLE_NCCL": "0"})
    assert nccl_enabled({"TANDEM_ENABLE_NCCL": "1", "NEMO_EAGLE_ENABLE_NCCL": "0"})  # tandem's name wins
    assert nccl_port_for(8001, environ={}) == 8101
    assert nccl_port_for(8001, server_index=2, num_servers=3, environ={"NEMO_EAGLE_NCCL_PORT": "9000"}) == 9002
    assert nccl_port_for(8001, server_index=1, num_servers=2, rank=3, environ={"TANDEM_NCCL_PORT": "9000"}) == 9007
    with pytest.raises(ValueError, match="TANDEM_NCCL_PORT"):
        nccl_port_for(8001, environ={"TANDEM_NCCL_PORT": "abc"})
    with pytest.raises(ValueError, match="not a TCP port"):
        nccl_port_for(65500, environ={})


REPO = str(REPO_ROOT)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU answer of the GPU check")
def test_gpu_check_script_says_cuda_is_absent_and_exits_0():
    out = subprocess.run([sys.executable, "-m", "bench.gpu_check"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "CUDA is absent" in out.stdout


@pytest.mark.gpu
@pytest.mark.timeout(900)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_check_passes_on_cuda():
    """CUDA supervision over HTTP and a gloo group on any GPU machine; the NCCL rows need two GPUs."""
    out = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--repeats", "3"], cwd=REPO, capture_output=True,
                         text=True, timeout=850)
    assert out.returncode == 0, out.stdout + out.stderr[-4000:]
    assert out.stdout.count("| PASS |") >= 2, out.stdout


def test_init_nccl_checks_its_body_and_answers_disabled_when_off(tiny_llama):
    from tandem.speculative.remote.server import TargetModelServer
    from tandem.speculative.remote.serving.request_checks import RequestError
    from tandem.speculative.target.model import Eagle3TargetModel

    target = Eagle3TargetModel(tiny_llama)
    on = TargetModelServer(target, nccl_port=0, enable_nccl=True, nccl_timeout_s=1, nccl_port_range=(1024, 65535))
    for body in ({"nccl_port": 0}, {"nccl_port": 70000}, {"nccl_port": True}, {"nccl_port": "8101"},
                 {"nccl_port": 8101, "rendezvous_id": 7}, {"nccl_port": 8101, "rendezvous_id": "x" * 200}):
        with pytest.raises(RequestError) as info:
            on.handle("init_nccl", protocol.encode_json(body), client_id="c")
        assert info.value.status == 400, body
    off = TargetModelServer(target, nccl_port=0)  # the logic object alone opens no ports
    reply = off.handle("init_nccl", protocol.encode_json({"nccl_port": free_port()}), client_id="c")
    assert protocol.decode_json(b"".join(reply.body)) == {"status": "disabled"}
    # On, with nobody at the other end: "failed" within the group timeout, and the port is free again.
    port = free_port()
    started = time.monotonic()
    reply = on.handle("init_nccl", protocol.encode_json({"nccl_port": port}), client_id="c")
    assert protocol.decode_json(b"".join(reply.body))["status"] == "failed"
    assert time.monotonic() - started < 1.0
    with socket.socket() as again:  # SO_REUSEADDR as every server sets it: only a listener would refuse
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("0.0.0.0", port))
