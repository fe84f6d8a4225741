"""moe_routing/losses/betainc.py: the torch regularised incomplete beta function against scipy (float64; float32
with per-expert parameters) and mpmath next to one, the automatic iteration count, gradients (gradcheck where the
clip is inactive, the clipped pdf elsewhere) and argument checks."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.special as sp
import torch

from moe_routing.losses.betainc import betainc, iterations_for

from reference import naive_pdf

f64 = torch.float64


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
