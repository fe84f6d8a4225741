"""ERC loss, DPSL and the torch regularised incomplete beta, against independent float64 computations.

References here are Python loops (ERC: per proxy/expert/coordinate; DPSL: per expert over a sorted Python list)
with scipy's betainc and math.lgamma for the Beta CDF / pdf; they share no code with `moe_routing.losses`.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.special as sp
import torch
from torch.utils.checkpoint import checkpoint

import moe_routing as mr
from moe_routing import RoutingContext, SwitchAuxLoss
from moe_routing.losses.betainc import betainc, iterations_for
from moe_routing.losses.dpsl import DPSLoss, dpsl_loss
from moe_routing.losses.erc import ERCLoss, erc_loss

f64 = torch.float64


def naive_pdf(x: float, a: float, b: float) -> float:
    return math.exp((a - 1) * math.log(x) + (b - 1) * math.log1p(-x) + math.lgamma(a + b) - math.lgamma(a)
                    - math.lgamma(b))


def naive_pdf_closed(x: float, a: float, b: float) -> float:
    """The density on [0, 1], with its limits at the end points."""
    if 0 < x < 1:
        return naive_pdf(x, a, b)
    c = a if x == 0 else b
    if c < 1:
        return math.inf
    return 0.0 if c > 1 else math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b))


# ------------------------------------------------------------------------------------------------------ betainc
A_B = [(1e-3, 1e-3), (0.05, 2.0), (0.25, 1.75), (0.5, 0.5), (1.0, 1.0), (1.0, 7.0), (2.5, 0.3), (10.0, 10.0),
       (200.0, 3.0), (1500.0, 1500.0)]


@pytest.mark.parametrize("a,b", A_B)
def test_betainc_matches_scipy_float64(a, b):
    switch = (a + 1) / (a + b + 2)
    x = torch.cat([torch.tensor([0.0, 1e-300, 1e-12, 1e-4, 1 - 1e-6, 1.0], dtype=f64),
                   torch.linspace(0, 1, 401, dtype=f64), switch + torch.linspace(-1e-3, 1e-3, 21, dtype=f64)])
    x = x.clamp(0, 1)
    got = betainc(x, a, b)
    ref = torch.from_numpy(sp.betainc(a, b, x.numpy()))
    assert got.dtype == f64 and got[0] == 0 and got[5] == 1
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-12)


def test_betainc_next_to_one_against_mpmath():
    """At x = 1 - 1e-12 scipy's value is off by ~3e-11 for a = b = 0.5; an arbitrary-precision check."""
    mpmath = pytest.importorskip("mpmath")
    x = torch.tensor([1 - 1e-12, 1 - 1e-9, 1e-12], dtype=f64)
    for a, b in [(0.5, 0.5), (0.1, 3.0), (4.0, 0.2)]:
        ref = [float(mpmath.betainc(a, b, 0, mpmath.mpf(v), regularized=True)) for v in x.tolist()]
        torch.testing.assert_close(betainc(x, a, b), torch.tensor(ref, dtype=f64), rtol=1e-12, atol=1e-15)


def test_betainc_float32_broadcasts_per_expert_parameters():
    gen = torch.Generator().manual_seed(0)
    x_NE = torch.rand(50, 3, generator=gen)
    a_E, b_E = torch.tensor([0.1, 1.0, 30.0]), torch.tensor([1.9, 4.0, 2.0])
    got = betainc(x_NE, a_E, b_E)
    assert got.dtype == torch.float32 and got.shape == (50, 3)
    for e in range(3):
        ref = sp.betainc(float(a_E[e]), float(b_E[e]), x_NE[:, e].double().numpy())
        np.testing.assert_allclose(got[:, e].double().numpy(), ref, atol=2e-6)


def test_iteration_rule_converges():
    """The automatic count agrees with four times as many iterations (the fraction has converged)."""
    x = torch.linspace(0, 1, 301, dtype=f64)
    for a, b in [(0.02, 0.3), (40.0, 60.0), (900.0, 1100.0)]:
        n = iterations_for(max(a, b))
        torch.testing.assert_close(betainc(x, a, b, num_iters=n), betainc(x, a, b, num_iters=4 * n),
                                   rtol=0, atol=1e-13)


@pytest.mark.parametrize("a,b,lo,hi", [(2.5, 3.5, 0.05, 0.95), (0.3, 1.7, 0.02, 0.6), (1.0, 1.0, 0.1, 0.9)])
def test_betainc_gradcheck_inside_clip(a, b, lo, hi):
    x = torch.linspace(lo, hi, 9, dtype=f64)
    pdf = [naive_pdf(v, a, b) for v in x.tolist()]
    assert 1e-3 < min(pdf) and max(pdf) < 100  # the clip is inactive here: backward is the exact derivative
    x.requires_grad_(True)
    a_t, b_t = torch.tensor(a, dtype=f64), torch.tensor(b, dtype=f64)
    assert torch.autograd.gradcheck(lambda v: betainc(v, a_t, b_t), (x,), eps=1e-6, atol=1e-7)
    (grad,) = torch.autograd.grad(betainc(x, a, b).sum(), x)
    torch.testing.assert_close(grad, torch.tensor(pdf, dtype=f64), rtol=1e-10, atol=0)


def test_betainc_gradient_is_clipped_pdf():
    # pdf > 100 near 0 for a < 1, pdf < 1e-3 deep in a tail, and a custom clip
    x = torch.tensor([1e-9, 1e-4, 0.3], dtype=f64, requires_grad=True)
    (g_small_a,) = torch.autograd.grad(betainc(x, 0.2, 1.8).sum(), x)
    assert naive_pdf(1e-9, 0.2, 1.8) > 100
    assert g_small_a[0].item() == 100.0
    assert g_small_a[2].item() == pytest.approx(naive_pdf(0.3, 0.2, 1.8), rel=1e-10)
    (g_tail,) = torch.autograd.grad(betainc(x, 6.0, 6.0).sum(), x)
    assert naive_pdf(1e-4, 6.0, 6.0) < 1e-3
    assert g_tail[0].item() == 1e-3 and g_tail[1].item() == 1e-3
    (g_custom,) = torch.autograd.grad(betainc(x, 0.2, 1.8, grad_min=0.5, grad_max=2.0).sum(), x)
    assert naive_pdf(0.3, 0.2, 1.8) < 0.5  # below this floor
    assert g_custom.tolist() == [2.0, 2.0, 0.5]


def test_betainc_bad_arguments():
    x = torch.rand(4)
    with pytest.raises(TypeError, match="x must be a floating"):
        betainc(torch.ones(3, dtype=torch.long), 1.0, 1.0)
    with pytest.raises(ValueError, match=r"a must be a finite number in \(0.0, 10000.0\]"):
        betainc(x, -1.0, 1.0)
    with pytest.raises(ValueError, match=r"b must lie in \(0, 10000\]"):
        betainc(x, 1.0, torch.tensor([1.0, 0.0, 1.0, 1.0]))
    with pytest.raises(TypeError, match="a must be"):
        betainc(x, "1", 1.0)
    with pytest.raises(ValueError, match="num_iters"):
        betainc(x, 1.0, 1.0, num_iters=0)
    with pytest.raises(ValueError, match="grad_min"):
        betainc(x, 1.0, 1.0, grad_min=2.0, grad_max=1.0)


# ---------------------------------------------------------------------------------------------------------- ERC
def naive_erc(R, W, alpha, seed):
    """ERC by loops: eps from pairwise distances, the same uniform draw as documented, M element by element."""
    E, D = R.shape
    Fh = W.shape[2]
    Rd = R.detach()
    eps = []
    for i in range(E):
        dists = [math.sqrt(sum((Rd[i, d].item() - Rd[j, d].item()) ** 2 for d in range(D)))
                 for j in range(E) if j != i]
        norm = math.sqrt(sum(Rd[i, d].item() ** 2 for d in range(D)))
        eps.append(min(dists) / (2 * norm) if dists else 0.0)
    u = torch.rand(E, D, generator=torch.Generator().manual_seed(seed), dtype=f64)
    proxy = [[R[i, d] * (1 + eps[i] * (2 * u[i, d].item() - 1)) for d in range(D)] for i in range(E)]
    M = [[None] * E for _ in range(E)]
    for i in range(E):
        for j in range(E):
            sq = 0.0
            for f in range(Fh):
                h = sum(proxy[i][d] * W[j, d, f] for d in range(D))
                sq = sq + h * h
            M[i][j] = torch.sqrt(sq)
    total = 0.0
    for i in range(E):
        for j in range(E):
            if j != i:
                total = total + torch.relu(M[i][j] - alpha * M[i][i]) + torch.relu(M[j][i] - alpha * M[i][i])
    return total / E ** 2, eps, M


@pytest.mark.parametrize("E,D,Fh,alpha", [(5, 7, 3, 1.0), (4, 3, 5, 0.6), (2, 1, 2, 1.0)])
def test_erc_matches_naive_loop_with_gradients(E, D, Fh, alpha):
    gen = torch.Generator().manual_seed(E)
    R = torch.randn(E, D, generator=gen, dtype=f64, requires_grad=True)
    W = torch.randn(E, D, Fh, generator=gen, dtype=f64, requires_grad=True)
    loss = erc_loss(R, W, alpha, generator=torch.Generator().manual_seed(7))
    R2, W2 = R.detach().clone().requires_grad_(), W.detach().clone().requires_grad_()
    ref, _, _ = naive_erc(R2, W2, alpha, seed=7)
    assert ref.item() > 0
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-14)
    grads = torch.autograd.grad(loss, [R, W])
    grads_ref = torch.autograd.grad(ref, [R2, W2])
    for g, r in zip(grads, grads_ref):
        assert r.abs().sum() > 0
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_erc_in_layer_matches_naive_and_logs_stats():
    torch.manual_seed(0)
    E, D, Fh = 6, 9, 4
    layer = mr.MoELayer(D, Fh, E, 2, losses=[ERCLoss(0.7, generator=torch.Generator().manual_seed(3))],
                        return_aux_loss=True).double()
    with torch.no_grad():
        layer.router.weight.normal_(0, 0.5)
    x = torch.randn(1, D, dtype=f64)  # one token: most experts receive none; ERC does not care
    _, aux = layer(x)
    ref, eps, M = naive_erc(layer.router.weight.detach(), layer.experts.w_gate.detach(), 1.0, seed=3)
    assert aux.item() == pytest.approx(0.7 * ref.item(), rel=1e-12)
    stats = layer.last_stats
    assert stats["erc_eps_mean"].item() == pytest.approx(sum(eps) / E, rel=1e-12)
    assert stats["erc_act_own"].item() == pytest.approx(sum(M[i][i].item() for i in range(E)) / E, rel=1e-12)
    router_norm = sum(math.sqrt(sum(v * v for v in row)) for row in layer.router.weight.tolist()) / E
    assert stats["erc_router_norm"].item() == pytest.approx(router_norm, rel=1e-12)
    gate_norm = sum(math.sqrt(sum(v * v for v in layer.experts.w_gate[j].flatten().tolist())) for j in range(E)) / E
    assert stats["erc_gate_norm"].item() == pytest.approx(gate_norm, rel=1e-12)
    assert not hasattr(layer.losses[0], "last_stats")  # statistics travel with the value, not on the loss
    assert "erc_eps_mean" in mr.routing_report(layer)["<root>"]


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_erc_zero_for_perfectly_coupled_experts(alpha):
    """Rows R[i] = c_i e_i and gates W_g^j nonzero only in input row j: R~[i] W_g^j = 0 for j != i whatever the
    (coordinate-wise) noise, so M is diagonal and every hinge is inactive."""
    E, D, Fh = 4, 6, 5
    gen = torch.Generator().manual_seed(1)
    R = torch.zeros(E, D, dtype=f64)
    W = torch.zeros(E, D, Fh, dtype=f64)
    for i in range(E):
        R[i, i] = 0.5 + i
        W[i, i] = torch.randn(Fh, generator=gen, dtype=f64)
    R.requires_grad_(True)
    W.requires_grad_(True)
    loss = erc_loss(R, W, alpha, generator=torch.Generator().manual_seed(2))
    assert loss.item() == 0.0
    gR, gW = torch.autograd.grad(loss, [R, W])
    assert torch.isfinite(gR).all() and torch.isfinite(gW).all()
    with torch.no_grad():  # break the coupling: expert 0's gate also reads coordinate 1 (proxy 1's)
        W[0, 1] = 3.0 * W[1, 1].norm() * torch.ones(Fh, dtype=f64)
    assert erc_loss(R, W, alpha, generator=torch.Generator().manual_seed(2)).item() > 0.1


def test_erc_chunked_equals_unchunked_and_gradchecks():
    gen = torch.Generator().manual_seed(4)
    R = torch.randn(7, 5, generator=gen, dtype=f64, requires_grad=True)
    W = torch.randn(7, 5, 3, generator=gen, dtype=f64, requires_grad=True)
    # the checkpointed chunks vs finite differences in w_gate (in R they would also see eps move: eps is
    # detached by design, so R's gradient is checked against the naive loop instead)
    assert torch.autograd.gradcheck(
        lambda w: erc_loss(R.detach(), w, chunk_size=3, generator=torch.Generator().manual_seed(0)), (W,))
    full = erc_loss(R, W, chunk_size=7, generator=torch.Generator().manual_seed(0))
    g_full = torch.autograd.grad(full, [R, W])
    for chunk in (1, 2, 3, None):
        part = erc_loss(R, W, chunk_size=chunk, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(part, full, rtol=1e-13, atol=0)
        for g, r in zip(torch.autograd.grad(part, [R, W]), g_full):
            torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-14)


def test_erc_gradients_reach_router_and_gates_only_through_aux():
    torch.manual_seed(5)
    layer = mr.MoELayer(8, 6, 4, 2, losses=[ERCLoss(chunk_size=3)], return_aux_loss=True)
    with torch.no_grad():
        layer.router.weight.normal_(0, 0.3)
    _, aux = layer(torch.randn(5, 8))
    assert aux.item() > 0
    aux.backward()
    assert layer.router.weight.grad.abs().sum() > 0
    assert layer.experts.w_gate.grad.abs().sum() > 0
    assert layer.experts.w_up.grad is None and layer.experts.w_down.grad is None


def test_erc_injected_in_layer_bf16_and_under_checkpoint():
    torch.manual_seed(6)
    layer = mr.MoELayer(9, 5, 4, 2, losses=[SwitchAuxLoss(), ERCLoss(chunk_size=2)]).to(torch.bfloat16)
    assert layer.router.weight.dtype == torch.float32 and layer.experts.w_gate.dtype == torch.bfloat16
    x = torch.randn(3, 5, 9, dtype=torch.bfloat16, requires_grad=True)
    checkpoint(layer, x, use_reentrant=False).float().sum().backward()
    assert layer.last_aux_losses["erc"].dtype == torch.float32 and layer.last_aux_losses["erc"].item() > 0
    assert torch.isfinite(layer.router.weight.grad).all() and layer.experts.w_gate.grad.abs().sum() > 0
    assert x.grad is not None and torch.isfinite(x.grad.float()).all()


def test_erc_skipped_in_eval_and_no_grad_without_drawing_noise():
    gen = torch.Generator().manual_seed(9)
    loss = ERCLoss(generator=gen)
    layer = mr.MoELayer(8, 4, 4, 2, losses=[loss], return_aux_loss=True)
    state = gen.get_state()
    with torch.no_grad():
        assert layer(torch.randn(3, 8))[1].item() == 0.0
    layer.eval()
    assert layer(torch.randn(3, 8))[1].item() == 0.0
    assert torch.equal(gen.get_state(), state) and "erc_eps_mean" not in layer.last_stats
    layer.train()
    assert layer(torch.randn(3, 8))[1].item() > 0
    assert not torch.equal(gen.get_state(), state)


def test_erc_single_expert_is_zero():
    layer = mr.MoELayer(4, 3, 1, 1, losses=[ERCLoss()], return_aux_loss=True)
    _, aux = layer(torch.randn(2, 4))
    assert aux.item() == 0.0
    assert layer.last_stats["erc_eps_mean"].item() == 0.0


def test_erc_bad_arguments():
    with pytest.raises(ValueError, match="alpha"):
        ERCLoss(alpha=-0.1)
    with pytest.raises(ValueError, match="chunk_size"):
        ERCLoss(chunk_size=0)
    with pytest.raises(TypeError, match="generator"):
        ERCLoss(generator=0)
    with pytest.raises(ValueError, match="coeff"):
        ERCLoss(coeff=-1.0)
    with pytest.raises(TypeError, match="w_gate"):
        mr.MoELayer(8, 4, 4, 2, activation="gelu", losses=[ERCLoss()])(torch.randn(2, 8))
    with pytest.raises(ValueError, match=r"w_gate must have shape \[E, D, F\] = \[4, 8, F\]"):
        erc_loss(torch.randn(4, 8), torch.randn(4, 7, 3))
    with pytest.raises(ValueError, match="router weight must have 2 dims"):
        erc_loss(torch.randn(4), torch.randn(4, 7, 3))


# --------------------------------------------------------------------------------------------------------- DPSL
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


def test_erc_default_chunks_bound_the_cast_copy_of_bf16_gates(monkeypatch):
    """bf16 gates are cast to float32 per chunk; the default chunk size must count that [chunk, D, F] copy, or
    with D >> E one unchunked einsum keeps an fp32 copy of every gate alive until backward (2x the bf16
    weights per layer). Budget shrunk so the small case behaves like a real layer (E=64, D=4096, F=1408)."""
    import moe_routing.losses.erc as erc_mod
    E, D, Fh = 4, 256, 16
    monkeypatch.setattr(erc_mod, "_CHUNK_BUDGET", 2 * Fh * (E + D))  # room for two experts' activations + copy
    gen = torch.Generator().manual_seed(11)
    R = torch.randn(E, D, generator=gen, requires_grad=True)
    W = (0.1 * torch.randn(E, D, Fh, generator=gen)).bfloat16().requires_grad_(True)
    saved = []

    def pack(t):
        saved.append(t.numel() if t.dtype == torch.float32 else 0)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = erc_loss(R, W, generator=torch.Generator().manual_seed(0))
    assert max(saved) < E * D * Fh // 2, saved  # no float32 copy of (half of) the gates kept for backward
    ref = erc_loss(R, W.float(), chunk_size=E, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)
    gR, gW = torch.autograd.grad(loss, [R, W])
    gR_ref, gW_ref = torch.autograd.grad(ref, [R, W])
    torch.testing.assert_close(gR, gR_ref, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(gW, gW_ref)


def test_erc_eps_accurate_for_a_nearly_collapsed_router():
    """Rows 1e-3 apart relative to their norm (a near-collapsed router): eps from a float32 Gram matrix was
    ~15% off (cancellation in |a|^2 + |b|^2 - 2ab); now it matches the float64 loop to 1e-4."""
    from moe_routing.losses.erc import erc_eps
    gen = torch.Generator().manual_seed(12)
    E, D = 6, 512
    common = torch.randn(1, D, generator=gen)
    R = common + 1e-3 * common.norm() * torch.randn(E, D, generator=gen) / math.sqrt(D)
    rows = R.double().tolist()
    eps_ref = [min(math.dist(rows[i], rows[j]) for j in range(E) if j != i) / (2 * math.hypot(*rows[i]))
               for i in range(E)]
    got = erc_eps(R)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), torch.tensor(eps_ref, dtype=f64), rtol=1e-4, atol=0)


@pytest.mark.parametrize("concentration", [1e9, 1e30, [5e3, 6e3]])
def test_dpsl_huge_concentration_is_a_clear_error_not_a_hang(concentration):
    """The Beta CDF's cost grows like sqrt(sum alpha): the sum is bounded (1e4) with an error naming it."""
    import time

    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="concentration"):
        layer = mr.MoELayer(8, 4, 2, 1, losses=[DPSLoss(concentration=concentration)])
        layer(torch.randn(10, 8))
    assert time.perf_counter() - t0 < 60
    with pytest.raises(ValueError, match=r"a must be a finite number in \(0.0, 10000.0\]"):
        mr.losses.betainc(torch.rand(3), 1e9, 2.0)
