"""moe_routing/routers/topk.py in a layer: TopKRouter's aux-loss-free bias balancing and its load statistics
(accumulated over micro-batches, skipped in eval / no_grad, padding excluded, not counted twice under activation
checkpointing, int64 counts that load old float checkpoints), the update `step` makes per layer, forced experts
through routing_context, and the dtype rules of the router's state."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import moe_routing as mr
from moe_routing import MoELayer, RoutingContext, TopKRouter, routing_context

D, E = 10, 8


def _moe(bias_rate=1e-2, score_func="sigmoid", seed=0, T_dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    layer = MoELayer(D, 4, E, 2, router_kwargs={"score_func": score_func, "bias_update_rate": bias_rate},
                     losses=[], **kw)
    with torch.no_grad():
        layer.router.weight.normal_(0, 0.6)
    return layer


def _choices(layer, x):
    with torch.no_grad():
        return layer.router(x.reshape(-1, D).to(layer.router.weight.dtype)).experts_TK


# ---- bias balancing and its statistics -----------------------------------------------------------------------------
def test_bias_update_accumulates_over_micro_batches_then_steps():
    rate = 0.01
    model = nn.Sequential(_moe(rate))
    layer = model[0]
    xs = [torch.randn(16, D) + layer.router.weight[0].detach() for _ in range(3)]
    expected_load = torch.zeros(E, dtype=torch.long)
    for x in xs:
        expected_load += torch.bincount(_choices(layer, x).reshape(-1), minlength=E)
        layer(x)
    torch.testing.assert_close(layer.router.load_accum, expected_load, rtol=0, atol=0)
    assert layer.router.expert_bias.abs().max() == 0  # nothing changes before step()
    mr.step(model)
    mean = expected_load.double().mean()
    expected_bias = rate * torch.sign(mean - expected_load.double())
    torch.testing.assert_close(layer.router.expert_bias.double(), expected_bias, rtol=0, atol=1e-9)
    assert layer.router.load_accum.abs().max() == 0  # accumulator reset
    # a second step with no new statistics changes nothing
    mr.step(model)
    torch.testing.assert_close(layer.router.expert_bias.double(), expected_bias, rtol=0, atol=1e-9)
    # the next update adds to the current bias
    x = xs[0]
    load = torch.bincount(_choices(layer, x).reshape(-1), minlength=E).double()
    layer(x)
    mr.step(model)
    torch.testing.assert_close(layer.router.expert_bias.double(),
                               expected_bias + rate * torch.sign(load.mean() - load), rtol=0, atol=1e-9)


def test_bias_balancing_reduces_max_violation_on_skewed_input():
    layer = _moe(1e-2)
    with torch.no_grad():
        layer.router.weight.normal_(0, 0.3)
    shift = 1.5 * layer.router.weight[:2].sum(0).detach()  # every token leans towards experts 0 and 1
    g = torch.Generator().manual_seed(4)
    x_eval = torch.randn(1024, D, generator=g) * 0.5 + shift

    def max_vio():
        load = torch.bincount(_choices(layer, x_eval).reshape(-1), minlength=E).double()
        return ((load.max() - load.mean()) / load.mean()).item()

    before = max_vio()
    assert before > 2.0
    load0 = torch.bincount(_choices(layer, x_eval).reshape(-1), minlength=E)
    history = []
    for _ in range(50):
        layer(torch.randn(256, D, generator=g) * 0.5 + shift)
        mr.step(layer)
        history.append(max_vio())
    # sign updates of a fixed size oscillate around balance: judge the last 10 steps
    settled = sum(history[-10:]) / 10
    assert settled < 0.35, (before, history)
    assert max(history[-10:]) < 0.6, history
    assert settled < before / 6
    # the initially busiest expert was pushed down, the idlest up
    bias = layer.router.expert_bias
    assert bias[load0.argmax()] < 0 < bias[load0.argmin()]
    after = history[-1]
    # the layer's own metric agrees on the held-out batch (eval: no statistics accumulate)
    layer.eval()
    layer(x_eval)
    assert layer.router.load_accum.abs().max() == 0
    torch.testing.assert_close(torch.tensor(mr.routing_report(layer)["<root>"]["max_vio"], dtype=torch.float64),
                               torch.tensor(after, dtype=torch.float64), rtol=1e-9, atol=1e-12)


def test_stats_skip_eval_and_no_grad():
    layer = _moe()
    x = torch.randn(12, D)
    layer.eval()
    layer(x)
    assert layer.router.load_accum.sum() == 0
    layer.train()
    with torch.no_grad():
        layer(x)
    assert layer.router.load_accum.sum() == 0
    with torch.inference_mode():
        layer(x)
    assert layer.router.load_accum.sum() == 0
    layer(x)
    assert layer.router.load_accum.sum() == 12 * 2
    mr.step(layer)
    assert layer.router.expert_bias.abs().sum() > 0


def test_stats_exclude_padding():
    layer = _moe()
    x = torch.randn(3, 4, D)
    pad = torch.zeros(3, 4, dtype=torch.bool)
    pad[0, 2:] = True
    layer(x, RoutingContext(padding_mask=pad))
    expected = torch.bincount(_choices(layer, x).reshape(-1, 2)[~pad.reshape(-1)].reshape(-1), minlength=E)
    torch.testing.assert_close(layer.router.load_accum, expected, rtol=0, atol=0)
    assert layer.router.load_accum.sum() == 10 * 2


def test_non_reentrant_checkpoint_does_not_double_count():
    layer = _moe()
    calls = []
    layer.router.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(20, D, requires_grad=True)
    y = checkpoint(layer, x, use_reentrant=False)
    (y ** 2).sum().backward()
    assert len(calls) == 2  # the layer really was recomputed in backward
    expected = torch.bincount(_choices(layer, x.detach()).reshape(-1), minlength=E)
    torch.testing.assert_close(layer.router.load_accum, expected, rtol=0, atol=0)
    assert layer.router.load_accum.sum() == 20 * 2
    assert x.grad is not None and layer.router.weight.grad.abs().max() > 0


def test_step_updates_each_layer_from_its_own_loads_and_checkpointed_micro_batches():
    # two layers, two checkpointed micro-batches: each router's bias moves by its own summed loads
    rate = 0.02
    model = nn.Sequential(_moe(rate, seed=0), _moe(rate, seed=1))
    xs = [torch.randn(10, D) + model[0].router.weight[2].detach() for _ in range(2)]
    loads = [torch.zeros(E, dtype=torch.float64), torch.zeros(E, dtype=torch.float64)]
    for x in xs:
        h = model[0](x).detach()  # the second layer's input, computed without touching statistics
        loads[0] += torch.bincount(_choices(model[0], x).reshape(-1), minlength=E).double()
        loads[1] += torch.bincount(_choices(model[1], h).reshape(-1), minlength=E).double()
    for m in model:
        m.router.load_accum.zero_()
    for x in xs:
        y = checkpoint(model, x.requires_grad_(), use_reentrant=False)
        y.square().sum().backward()
    for i in range(2):
        torch.testing.assert_close(model[i].router.load_accum.double(), loads[i], rtol=0, atol=0)
    mr.step(model)
    for i in range(2):
        expected = rate * torch.sign(loads[i].mean() - loads[i])
        torch.testing.assert_close(model[i].router.expert_bias.double(), expected, rtol=0, atol=1e-9)
    assert not torch.equal(model[0].router.expert_bias, model[1].router.expert_bias)


def test_load_accum_is_int64_counts_and_old_float_checkpoints_load():
    r = TopKRouter(8, 4, 2, bias_update_rate=1e-2)
    assert r.load_accum.dtype == torch.int64
    r.train()
    x = torch.randn(9, 8)
    r(x)
    ids = (x @ r.weight.detach().t()).topk(2).indices
    assert torch.equal(r.load_accum, torch.bincount(ids.reshape(-1), minlength=4))
    # a checkpoint written when load_accum was float32
    old = {k: v.clone() for k, v in r.state_dict().items()}
    old["load_accum"] = torch.tensor([3.0, 0.0, 70000.0, 5.0])
    fresh = TopKRouter(8, 4, 2, bias_update_rate=1e-2)
    fresh.load_state_dict(old)
    assert fresh.load_accum.dtype == torch.int64 and fresh.load_accum.tolist() == [3, 0, 70000, 5]
    # casts leave the counts alone; a step uses them and resets them
    fresh.to(torch.bfloat16)
    assert fresh.load_accum.dtype == torch.int64 and fresh.expert_bias.dtype == torch.float32
    fresh.moe_step()
    load = torch.tensor([3.0, 0.0, 70000.0, 5.0], dtype=torch.float64)
    torch.testing.assert_close(fresh.expert_bias.double(), 1e-2 * torch.sign(load.mean() - load), rtol=0,
                               atol=1e-9)
    assert fresh.load_accum.sum() == 0


# ---- forced experts through routing_context ------------------------------------------------------------------------
def test_forced_experts_through_routing_context():
    torch.manual_seed(0)
    model = nn.Sequential(MoELayer(D, 4, E, 2, losses=[]), MoELayer(D, 4, E, 2, losses=[]))
    x = torch.randn(6, D)
    forced0 = torch.tensor([[7, 6]] * 6)
    with routing_context(model, forced_experts={0: forced0}) as ctx:
        assert [m.layer_idx for m in model] == [0, 1]
        assert model[0]._ctx is ctx
        y = model(x)
    assert model[0]._ctx is None and model[1]._ctx is None
    stats0 = mr.routing_report(model)["0"]["tokens_per_expert"]
    assert stats0 == [0, 0, 0, 0, 0, 0, 6, 6]
    # layer 1 was not forced: its loads are its router's natural choice
    h = model[0](x)
    natural1 = torch.bincount(_choices(model[1], h).reshape(-1), minlength=E).tolist()
    model(x)  # refresh stats without context
    assert mr.routing_report(model)["1"]["tokens_per_expert"] == natural1
    y.sum().backward()
    assert model[0].router.weight.grad.abs().max() > 0
    # only rows of forced experts get a gradient through the gate weights of top-k-then-softmax
    assert model[0].router.weight.grad[:6].abs().max() == 0
    # the forced output equals an explicit computation with those experts and their softmax weights
    layer = model[0]
    logits = x @ layer.router.weight.detach().t()
    w = logits[:, [7, 6]].softmax(-1)
    ex = layer.experts
    def expert(e, v):
        return (torch.nn.functional.silu(v @ ex.w_gate[e]) * (v @ ex.w_up[e])) @ ex.w_down[e]
    expected = w[:, :1] * expert(7, x) + w[:, 1:] * expert(6, x)
    with routing_context(model, forced_experts={0: forced0}):
        got = model[0](x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


# ---- dtype rules ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cast", ["to_bf16", "half"])
def test_router_state_stays_float32_when_model_is_cast_down(cast):
    model = nn.Sequential(_moe(1e-3))
    r = model[0].router
    with torch.no_grad():
        r.expert_bias.copy_(torch.linspace(-0.5013, 0.7007, E))
        r.load_accum.fill_(3)
    before = {n: t.clone() for n, t in list(r.named_parameters()) + list(r.named_buffers())}
    model = model.to(torch.bfloat16) if cast == "to_bf16" else model.half()
    low = torch.bfloat16 if cast == "to_bf16" else torch.float16
    assert model[0].experts.w_up.dtype == low
    for name, t in list(r.named_parameters()) + list(r.named_buffers()):
        assert t.dtype == (torch.int64 if name == "load_accum" else torch.float32), name
        torch.testing.assert_close(t, before[name], rtol=0, atol=0, msg=name)  # values not rounded
    # the cast model runs on low-precision input and the router still computes in float32
    x = torch.randn(8, D, dtype=low)
    y = model(x)
    assert y.dtype == low
    with torch.no_grad():
        assert r(x).logits_TE.dtype == torch.float32


def test_router_follows_cast_to_float64():
    model = nn.Sequential(_moe(1e-3))
    model.double()
    r = model[0].router
    assert r.weight.dtype == torch.float64
    assert r.expert_bias.dtype == torch.float64 and r.load_accum.dtype == torch.int64
    assert r.math_dtype == torch.float64
    assert model[0].experts.w_down.dtype == torch.float64
    x = torch.randn(5, D, dtype=torch.float64)
    assert r(x).logits_TE.dtype == torch.float64 and model(x).dtype == torch.float64
    # built as float64 directly: the same
    layer = MoELayer(D, 4, E, 2, dtype=torch.float64)
    assert layer.router.weight.dtype == torch.float64
    # built as bf16 directly: router float32
    layer = MoELayer(D, 4, E, 2, dtype=torch.bfloat16, router_kwargs={"bias_update_rate": 1e-3})
    assert layer.router.weight.dtype == torch.float32 and layer.router.expert_bias.dtype == torch.float32


def test_small_bias_update_registers_in_bf16_cast_model():
    rate = 1e-3
    model = nn.Sequential(_moe(rate)).to(torch.bfloat16)
    r = model[0].router
    r.expert_bias.fill_(0.5)
    x = (torch.randn(32, D) + r.weight[0].detach()).to(torch.bfloat16)
    load = torch.bincount(_choices(model[0], x).reshape(-1), minlength=E).double()
    model(x)
    mr.step(model)
    expected = 0.5 + rate * torch.sign(load.mean() - load)
    torch.testing.assert_close(r.expert_bias.double(), expected, rtol=0, atol=1e-7)
    assert (r.expert_bias != 0.5).sum() == (load != load.mean()).sum() > 0
    # in bf16 the same update would vanish: 0.5 + 1e-3 rounds back to 0.5
    assert torch.tensor(0.5, dtype=torch.bfloat16) + torch.tensor(1e-3, dtype=torch.bfloat16) == 0.5
