"""moe_routing.routers.base: what every router inherits (gate weight, dtype rules, checks, replay, statistic),
shown through the README's custom router (examples/custom_router.py) against a naive float64 loop."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

import moe_routing as mr
from moe_routing import RoutingContext

ROOT = Path(__file__).resolve().parents[1]
D, F, E, K = 10, 6, 7, 3


def _example():
    spec = importlib.util.spec_from_file_location("custom_router", ROOT / "examples" / "custom_router.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def naive_noisy_topk_eval(x_TD, W_ED, k):
    """Per token: the k largest logits (ties: lowest id) and a softmax over them, in Python floats."""
    experts, gates = [], []
    for x in x_TD.tolist():
        logits = [sum(a * b for a, b in zip(x, w)) for w in W_ED.tolist()]
        top = sorted(range(len(logits)), key=lambda e: (-logits[e], e))[:k]
        m = max(logits[e] for e in top)
        z = sum(math.exp(logits[e] - m) for e in top)
        experts.append(top)
        gates.append([math.exp(logits[e] - m) / z for e in top])
    return experts, gates


def test_custom_router_equals_naive_loop_and_runs_in_a_layer():
    router_cls = _example().NoisyTopKRouter
    torch.manual_seed(0)
    r = router_cls(D, E, K).double().eval()
    x = torch.randn(13, D, dtype=torch.float64)
    d = r(x)
    experts, gates = naive_noisy_topk_eval(x, r.weight.detach(), K)
    assert d.experts_TK.tolist() == experts
    torch.testing.assert_close(d.weights_TK, torch.tensor(gates, dtype=torch.float64), rtol=1e-12, atol=1e-14)
    assert r.weight.dtype == torch.float64 and r.w_noise.dtype == torch.float64
    layer = mr.MoELayer(D, F, E, K, router=router_cls(D, E, K))
    layer.train()
    y = layer(torch.randn(2, 5, D))
    y.sum().backward()
    assert layer.router.weight.grad.abs().max() > 0 and layer.router.w_noise.grad.abs().max() > 0
    assert "switch_aux" in mr.aux_losses(layer)[""]  # GatedRouter's default loss
    layer.to(torch.bfloat16)
    assert layer.router.weight.dtype == torch.float32 and layer.router.w_noise.dtype == torch.float32


def test_custom_router_replay_keeps_gate_gradient():
    r = _example().NoisyTopKRouter(D, E, K).eval()
    x = torch.randn(4, D)
    forced = torch.tensor([[6, 0, 2], [1, 2, 3], [5, 4, 0], [0, 1, 2]])
    d = r(x, RoutingContext(forced_experts={"L": forced}), "L")
    assert torch.equal(d.experts_TK, forced)
    logits = x @ r.weight.detach().t()
    torch.testing.assert_close(d.weights_TK.detach(), logits.gather(1, forced).softmax(-1))
    d.weights_TK[:, 0].sum().backward()
    assert r.weight.grad.abs().max() > 0


@pytest.mark.parametrize("bad,match", [
    (torch.tensor([[1, 1, 2]] * 4), "repeats an expert"),
    (torch.ones(4, 3, dtype=torch.bool), "integer tensor"),
    (torch.zeros(4, 3), "integer tensor"),
    (torch.tensor([[0, 1, 7]] * 4), r"outside \[0, 7\)"),
    (torch.tensor([[0, 1]] * 4), r"shape \[4, 3\]"),
])
def test_forced_experts_are_checked(bad, match):
    r = mr.TopKRouter(D, E, K)
    with pytest.raises(ValueError, match=match):
        r(torch.randn(4, D), RoutingContext(forced_experts={0: bad}), 0)


@pytest.mark.parametrize("router,match", [("relu", r"routing map.*\[4, 7\]"),
                                          ("expert_choice", "does not support forced_experts")])
def test_variable_k_routers_reject_a_TK_replay(router, match):
    layer = mr.MoELayer(D, F, E, K, router=router, layer_idx=0)
    with pytest.raises(ValueError, match=match):
        layer(torch.randn(4, D), RoutingContext(forced_experts={0: torch.zeros(4, K, dtype=torch.long)}))


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(top_k=True), TypeError, "top_k must be an int"),
    (dict(hidden_size=True), TypeError, "hidden_size must be an int"),
    (dict(top_k=E + 1), ValueError, r"top_k must be an int in \[1, 7\]"),
    (dict(init_std=float("nan")), ValueError, "init_std must be a finite number"),
    (dict(init_std=-1.0), ValueError, "init_std must be a finite number >= 0"),
    (dict(strict=1), TypeError, "strict must be a bool"),
])
def test_gated_router_arguments(kwargs, error, match):
    args = {"hidden_size": D, "num_experts": E, "top_k": K, **kwargs}
    with pytest.raises(error, match=match):
        mr.TopKRouter(**args)


def test_every_named_router_is_a_router_with_the_layers_k():
    for name, cls in mr.routers.ROUTERS.items():
        layer = mr.MoELayer(D, F, E, K, router=name)
        assert isinstance(layer.router, mr.Router) and layer.router.top_k == K, name
    with pytest.raises(ValueError, match="router has top_k=2 but the layer has top_k=3"):
        mr.MoELayer(D, F, E, K, router=mr.TopKRouter(D, E, 2))


@pytest.mark.parametrize("make", [
    lambda **kw: mr.TopKRouter(D, E, 1, **kw),
    lambda **kw: mr.HyperRouter(D, E, 1, **kw),
    lambda **kw: mr.RecurrentRouterGroup(D, E, 1, num_layers=1, proj_dim=4, **kw).routers[0],
])
def test_top1_default_gates_carry_the_task_gradient(make):
    """At k=1 a softmax over the one chosen logit is exactly 1: the default must be Switch gates (the full
    softmax at the chosen expert), so the task loss reaches the router; asking for the constant gate raises."""
    r = make()
    x = torch.randn(6, D)
    d = r(x, RoutingContext())
    assert not torch.allclose(d.weights_TK, torch.ones_like(d.weights_TK))
    d.weights_TK.sum().backward()
    grads = [p.grad for p in r.parameters() if p.grad is not None]
    assert grads and max(float(g.abs().max()) for g in grads) > 0
    with pytest.raises(ValueError, match="gives every token a gate of exactly 1"):
        make(softmax_before_topk=False)


def test_top1_renormalised_gates_are_refused():
    with pytest.raises(ValueError, match="normalize=True gives every token a gate of exactly 1"):
        mr.TopKRouter(D, E, 1, score_func="sigmoid", normalize=True)
    with pytest.raises(ValueError, match="normalize=True"):
        mr.TopKRouter(D, E, 1, softmax_before_topk=True, normalize=True)
    assert mr.TopKRouter(D, E, 1, score_func="sigmoid").normalize is False
    assert mr.TopKRouter(D, E, 2, score_func="sigmoid").normalize is True
