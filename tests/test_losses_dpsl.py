"""moe_routing/losses/dpsl.py: DPSL against a loop per expert over a sorted Python list, with scipy's Beta CDF
and a clipped math.lgamma pdf (values and the gradient, with padding); the default prior in a layer; small for
samples of the prior and large otherwise; gradient descent toward the prior; bf16 and one token; a huge
concentration; argument checks. The reference shares no code with `moe_routing.losses`."""
from __future__ import annotations

import math

import pytest
import scipy.special as sp
import torch

import moe_routing as mr
from moe_routing import RoutingContext, SwitchAuxLoss
from moe_routing.losses.dpsl import DPSLoss, dpsl_loss

from reference import naive_pdf

f64 = torch.float64


def naive_pdf_closed(x: float, a: float, b: float) -> float:
    """The density on [0, 1], with its limits at the end points."""
    if 0 < x < 1:
        return naive_pdf(x, a, b)
    c = a if x == 0 else b
    if c < 1:
        return math.inf
    return 0.0 if c > 1 else math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b))


def naive_dpsl(probs: list[list[float]], alpha: list[float], valid: list[bool], lo=1e-3, hi=100.0):
    """DPSL and its gradient d/dp by loops: per expert, sort a Python list, scipy CDF, clipped math pdf."""
    rows = [r for r, v in zip(probs, valid) if v]
    N, E = len(rows), len(alpha)
    A = sum(alpha)
    total, grad = 0.0, [[0.0] * E for _ in probs]
    valid_idx = [t for t, v in enumerate(valid) if v]
    for e in range(E):
        order = sorted(range(N), key=lambda n: rows[n][e])
        a, b = alpha[e], A - alpha[e]
        for rank, n in enumerate(order, start=1):
            p = min(max(rows[n][e], 0.0), 1.0)
            resid = rank / (N + 1) - float(sp.betainc(a, b, p))
            total += resid * resid / (N * E)
            slope = min(max(naive_pdf_closed(p, a, b), lo), hi)
            grad[valid_idx[n]][e] = -2.0 * resid * slope / (N * E)
    return total, grad


def test_dpsl_matches_naive_loop_with_padding_and_gradient():
    gen = torch.Generator().manual_seed(0)
    T, E = 23, 5
    logits = (2.0 * torch.randn(T, E, generator=gen, dtype=f64)).requires_grad_(True)
    probs = logits.softmax(-1)
    valid = torch.rand(T, generator=gen) > 0.3
    alpha = torch.tensor([0.2, 0.7, 0.4, 0.4, 1.3], dtype=f64)
    loss = dpsl_loss(probs, alpha, valid)
    (g,) = torch.autograd.grad(loss, probs)
    ref, g_ref = naive_dpsl(probs.tolist(), alpha.tolist(), valid.tolist())
    assert loss.item() == pytest.approx(ref, rel=1e-11)
    torch.testing.assert_close(g, torch.tensor(g_ref, dtype=f64), rtol=1e-9, atol=1e-14)
    assert g[~valid].abs().sum() == 0


def test_dpsl_layer_default_prior_matches_naive():
    torch.manual_seed(1)
    E, k, D = 6, 2, 7
    layer = mr.MoELayer(D, 4, E, k, losses=[DPSLoss(0.3)], return_aux_loss=True).double()
    with torch.no_grad():
        layer.router.weight.normal_(0, 0.7)
    x = torch.randn(2, 5, D, dtype=f64)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, 3:] = True
    _, aux = layer(x, RoutingContext(padding_mask=pad))
    probs = (x.reshape(-1, D) @ layer.router.weight.detach().t()).softmax(-1)
    ref, _ = naive_dpsl(probs.tolist(), [k / E] * E, (~pad.reshape(-1)).tolist())
    assert aux.item() == pytest.approx(0.3 * ref, rel=1e-11)
    assert layer.last_stats["dpsl_per_expert"].shape == (E,)


def _dirichlet(alpha_E, n, seed):
    torch.manual_seed(seed)
    return torch.distributions.Dirichlet(alpha_E).sample((n,))


def test_dpsl_small_for_samples_of_the_prior_large_otherwise():
    E, k, N = 8, 2, 4000
    alpha = torch.full((E,), k / E, dtype=f64)
    on_prior = dpsl_loss(_dirichlet(alpha, N, 0), alpha).item()
    assert on_prior < 2e-4  # a Cramer-von Mises statistic: about 1/(6N) = 4e-5 for samples of the target
    rand_e = torch.randint(0, E, (N,), generator=torch.Generator().manual_seed(1))
    confident = torch.full((N, E), 0.1 / (E - 1), dtype=f64)
    confident[torch.arange(N), rand_e] = 0.9
    collapsed = torch.full((N, E), 0.01 / (E - 1), dtype=f64)
    collapsed[:, 0] = 0.99
    uniform = torch.full((N, E), 1.0 / E, dtype=f64)
    values = {name: dpsl_loss(p, alpha).item() for name, p in
              [("confident", confident), ("collapsed", collapsed), ("uniform", uniform)]}
    assert all(v > 0.05 for v in values.values()), values
    assert all(v > 200 * on_prior for v in values.values()), (on_prior, values)
    skewed = torch.tensor([2.0] + [0.1] * (E - 1), dtype=f64)  # asymmetric prior: matches its own samples only
    assert dpsl_loss(_dirichlet(skewed, N, 2), skewed).item() < 2e-4
    assert dpsl_loss(_dirichlet(alpha, N, 3), skewed).item() > 0.05


def test_dpsl_gradient_descent_moves_routing_toward_the_prior():
    """Free logits of near-uniform routing, trained on DPSL alone, approach the prior (clipped-pdf gradient)."""
    E, N = 4, 512
    alpha = torch.full((E,), 0.5, dtype=f64)
    logits = (0.01 * torch.randn(N, E, generator=torch.Generator().manual_seed(0), dtype=f64)).requires_grad_()
    opt = torch.optim.Adam([logits], lr=0.05)
    start = dpsl_loss(logits.softmax(-1), alpha).item()
    for _ in range(150):
        loss = dpsl_loss(logits.softmax(-1), alpha)
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = dpsl_loss(logits.softmax(-1), alpha).item()
    assert start > 0.05 and end < start / 10, (start, end)


@pytest.mark.parametrize("router,kwargs", [("topk", {}), ("topk", {"score_func": "sigmoid"}), ("relu", {})])
def test_dpsl_in_layer_forward_backward(router, kwargs):
    torch.manual_seed(2)
    layer = mr.MoELayer(9, 5, 4, 2, router=router, router_kwargs=kwargs, losses=[DPSLoss()], return_aux_loss=True)
    x = torch.randn(11, 9)
    y, aux = layer(x)
    assert aux.item() > 0
    (y.sum() + aux).backward()
    assert torch.isfinite(layer.router.weight.grad).all() and layer.router.weight.grad.abs().sum() > 0
    d = layer.router(x)
    rows = d.scores_TE.double().tolist()
    p = [[v / sum(r) if sum(r) > 0 else 0.0 for v in r] for r in rows]  # per-token normalised (sigmoid / relu)
    ref, _ = naive_dpsl(p, [0.5] * 4, [True] * 11)
    assert aux.item() == pytest.approx(0.1 * ref, rel=1e-4)  # default coeff 0.1, prior k/E = 0.5


def test_dpsl_bf16_layer_and_one_token():
    torch.manual_seed(3)
    layer = mr.MoELayer(7, 3, 5, 1, losses=[DPSLoss(), SwitchAuxLoss()]).to(torch.bfloat16)
    x = torch.randn(1, 7, dtype=torch.bfloat16)
    layer(x).float().sum().backward()
    assert layer.last_aux_losses["dpsl"].dtype == torch.float32 and layer.last_aux_losses["dpsl"].item() > 0
    assert torch.isfinite(layer.router.weight.grad).all()
    pad = torch.ones(1, dtype=torch.bool)  # every token padding: zero, still differentiable
    layer.zero_grad()
    layer.return_aux_loss = True
    _, aux = layer(x, RoutingContext(padding_mask=pad))
    assert layer.last_aux_losses["dpsl"].item() == 0.0


def test_dpsl_bad_arguments():
    with pytest.raises(ValueError, match=r"concentration must be a finite number in \(0.0"):
        DPSLoss(concentration=0.0)
    with pytest.raises(ValueError, match=r"concentration values must lie in \(0, 10000\]"):
        DPSLoss(concentration=[1.0, -1.0, 1.0])
    with pytest.raises(TypeError, match="concentration"):
        DPSLoss(concentration=True)
    with pytest.raises(TypeError, match="concentration"):
        DPSLoss(concentration="flat")
    with pytest.raises(ValueError, match="1-D"):
        DPSLoss(concentration=[[1.0, 1.0]])
    with pytest.raises(ValueError, match="grad_clip"):
        DPSLoss(grad_clip=(1.0, 0.1))
    with pytest.raises(ValueError, match="coeff"):
        DPSLoss(coeff=-1)
    with pytest.raises(ValueError, match="concentration has 3 values but the layer has num_experts=4"):
        mr.MoELayer(8, 4, 4, 2, losses=[DPSLoss(concentration=[1.0, 1.0, 1.0])])(torch.randn(2, 8))
    with pytest.raises(ValueError, match="num_experts >= 2"):
        mr.MoELayer(8, 4, 1, 1, losses=[DPSLoss()])(torch.randn(2, 8))
    with pytest.raises(ValueError, match=r"concentration_E must have shape \[E\] = \[3\]"):
        dpsl_loss(torch.rand(4, 3), torch.ones(2))
    with pytest.raises(TypeError, match="probs_TE"):
        dpsl_loss(torch.rand(4), torch.ones(2))
    with pytest.raises(ValueError, match="valid_T"):
        dpsl_loss(torch.rand(4, 3), torch.ones(3), valid_T=torch.ones(4))
    # a non-positive prior used to surface from betainc as "a must be positive" / "max_ab must be ..."
    for bad in ([1.0, -1.0, 1.0], [-1.0, -1.0, 1.0], [1.0, math.nan, 1.0]):
        with pytest.raises(ValueError, match="concentration_E must be positive and finite"):
            dpsl_loss(torch.rand(4, 3), torch.tensor(bad))


@pytest.mark.parametrize("concentration", [1e9, 1e30, [5e3, 6e3]])
def test_dpsl_huge_concentration_is_a_clear_error_not_a_hang(concentration, monkeypatch):
    """The Beta CDF's cost grows like sqrt(sum alpha): the sum is bounded (1e4) with an error naming it, raised
    before the continued fraction (the loop that ran for minutes) is entered."""
    import importlib

    betainc_mod = importlib.import_module("moe_routing.losses.betainc")  # the package exports a same-named function

    def unbounded_loop(*args, **kwargs):
        raise AssertionError("the continued fraction ran")

    monkeypatch.setattr(betainc_mod, "_continued_fraction", unbounded_loop)
    with pytest.raises(ValueError, match="concentration"):
        layer = mr.MoELayer(8, 4, 2, 1, losses=[DPSLoss(concentration=concentration)])
        layer(torch.randn(10, 8))
    with pytest.raises(ValueError, match=r"a must be a finite number in \(0.0, 10000.0\]"):
        mr.losses.betainc(torch.rand(3), 1e9, 2.0)
