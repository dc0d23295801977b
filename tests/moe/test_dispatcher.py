"""MoELayer across 2 and 4 gloo ranks equals the same layer on one process: outputs and gradients, on
DeepEP's V1 `Buffer` API and its V2 `ElasticBuffer` API alike."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from tandem.moe.dispatcher import APIS, GroupedSwiGLU, MoELayer, buffer_api, combine, dispatch
from tests.moe.dist_utils import assert_scenario, scenario_fixtures

HIDDEN, INTERMEDIATE, TOP_K = 32, 48, 2


def _tokens_per_rank(world_size):
    # Uneven on purpose, and with a rank that holds no tokens at all when there are four.
    return [11, 0, 6, 9][:world_size] if world_size == 4 else [11, 5]


def _reference(world_size, num_experts):
    """The full layer on one process, fed every rank's tokens at once, plus its gradients."""
    torch.manual_seed(0)
    layer = MoELayer(HIDDEN, INTERMEDIATE, num_experts, TOP_K)
    xs = [torch.randn(n, HIDDEN) for n in _tokens_per_rank(world_size)]
    gs = [torch.randn(n, HIDDEN) for n in _tokens_per_rank(world_size)]
    x = torch.cat(xs).requires_grad_()
    out = layer(x)
    (out * torch.cat(gs)).sum().backward()
    return layer, xs, gs, out.detach(), x.grad


def _split(t, world_size, rank):
    sizes = _tokens_per_rank(world_size)
    return torch.split(t, sizes)[rank]


def sc_moe_layer_matches_single_process_outputs_and_gradients(rank, ws, api):
    num_experts = 2 * ws
    ref, xs, gs, ref_out, ref_x_grad = _reference(ws, num_experts)
    layer = MoELayer(HIDDEN, INTERMEDIATE, num_experts, TOP_K, group=dist.group.WORLD, api=api)
    assert isinstance(layer.buffer, APIS[api])
    e_local = num_experts // ws
    with torch.no_grad():
        layer.router.weight.copy_(ref.router.weight)
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(layer.experts, name).copy_(getattr(ref.experts, name)[rank * e_local : (rank + 1) * e_local])
    x = xs[rank].clone().requires_grad_()
    out = layer(x)
    (out * gs[rank]).sum().backward()

    torch.testing.assert_close(out.detach(), _split(ref_out, ws, rank), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, _split(ref_x_grad, ws, rank), rtol=1e-5, atol=1e-5)
    for name in ("gate_proj", "up_proj", "down_proj"):
        expected = getattr(ref.experts, name).grad[rank * e_local : (rank + 1) * e_local]
        torch.testing.assert_close(getattr(layer.experts, name).grad, expected, rtol=1e-5, atol=1e-5)
    # The router is replicated: its data-parallel all-reduced gradient is the single-process one.
    router_grad = layer.router.weight.grad.clone()
    dist.all_reduce(router_grad)
    torch.testing.assert_close(router_grad, ref.router.weight.grad, rtol=1e-5, atol=1e-5)
    assert ref.router.weight.grad.abs().sum() > 0  # the weights' gradient path is really exercised


def sc_dispatch_backward_is_combine_and_combine_backward_is_cached_dispatch(rank, ws, api):
    torch.manual_seed(1 + rank)
    num_experts = 4 * ws
    buffer = APIS[api](dist.group.WORLD)
    x = torch.randn(7, HIDDEN, dtype=torch.float64).float().requires_grad_()
    idx = torch.rand(7, num_experts).topk(3, dim=1).indices
    idx[0, 0] = -1
    w = torch.rand(7, 3).requires_grad_()
    sent = dispatch(buffer, x, idx, w, num_experts)
    g_rows = torch.randn_like(sent.recv_x)
    g_w = torch.randn_like(sent.recv_topk_weights)
    (sent.recv_x * g_rows).sum().add_((sent.recv_topk_weights * g_w).sum()).backward()
    with torch.no_grad():
        expected_x, expected_w, _ = buffer.combine(g_rows, sent.handle,
                                                    topk_weights=g_w.masked_fill(sent.recv_topk_idx < 0, 0))
    torch.testing.assert_close(x.grad, expected_x)
    torch.testing.assert_close(w.grad, expected_w)
    assert w.grad[0, 0] == 0  # a -1 slot has no weight gradient

    y = sent.recv_x.detach().clone().requires_grad_()
    g_out = torch.randn(7, HIDDEN)
    (combine(buffer, y, sent.handle) * g_out).sum().backward()
    torch.testing.assert_close(y.grad, buffer.dispatch(g_out, handle=sent.handle)[0])


def sc_layer_takes_the_api_of_the_buffer_it_is_given(rank, ws, api):
    buffer = APIS[api](dist.group.WORLD)
    layer = MoELayer(HIDDEN, INTERMEDIATE, 2 * ws, TOP_K, group=dist.group.WORLD, buffer=buffer)
    assert layer.buffer is buffer and buffer_api(layer.buffer) == api
    other = "v1" if api == "v2" else "v2"
    with pytest.raises(ValueError, match=f"api='{other}' but the given buffer has the {api} API"):
        MoELayer(HIDDEN, INTERMEDIATE, 2 * ws, TOP_K, group=dist.group.WORLD, buffer=buffer, api=other)


SCENARIOS = {
    f"{name[3:]}[{api}]": functools.partial(fn, api=api)
    for name, fn in list(globals().items()) if name.startswith("sc_") for api in ("v1", "v2")
}

outcomes, scenario = scenario_fixtures(SCENARIOS)


@pytest.mark.timeout(180)
def test_dispatcher_behaviour(outcomes, scenario):
    assert_scenario(outcomes, scenario)


def test_grouped_swiglu_matches_a_per_token_loop():
    torch.manual_seed(0)
    experts = GroupedSwiGLU(4, HIDDEN, INTERMEDIATE)
    x = torch.randn(9, HIDDEN)
    idx = torch.randint(-1, 4, (9, 3))
    w = torch.rand(9, 3)
    expected = torch.zeros_like(x)
    for t in range(9):
        for k in range(3):
            e = int(idx[t, k])
            if e >= 0:
                h = F.silu(x[t] @ experts.gate_proj[e]) * (x[t] @ experts.up_proj[e])
                expected[t] += w[t, k] * (h @ experts.down_proj[e])
    torch.testing.assert_close(experts(x, idx, w), expected, rtol=1e-5, atol=1e-5)


def test_moe_layer_rejects_experts_not_divisible_by_group():
    class Group:
        def size(self):
            return 3

        def rank(self):
            return 0

    with pytest.raises(ValueError, match="divisible by the EP group size 3"):
        MoELayer(HIDDEN, INTERMEDIATE, 8, TOP_K, group=Group(), buffer=object())
