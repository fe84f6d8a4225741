"""moe_routing/analysis/capacity_bound.py: LocMoE's assignment probability and capacity bound against a naive
integral of the sphere's marginal density, scipy, Monte Carlo and the paper's large-d form; the measured delta
against a naive loop; argument checks."""
import math

import pytest
import torch

from moe_routing.analysis import locmoe_assignment_probability, locmoe_min_capacity, min_assignment_cosine


def _naive_p(delta, d, steps=200_000):
    """P(|x_1| >= delta) for x uniform on the unit sphere in R^d: x_1 has density ~ (1 - t^2)^((d - 3) / 2)."""
    def mass(lo, hi):
        h = (hi - lo) / steps
        return sum((1 - (lo + (i + 0.5) * h) ** 2) ** ((d - 3) / 2) for i in range(steps)) * h
    return mass(delta, 1.0) / mass(0.0, 1.0)


@pytest.mark.parametrize("delta,d", [(0.0, 3), (0.1, 5), (0.03, 64), (0.3, 16), (0.9, 8)])
def test_assignment_probability_is_the_sphere_share_past_delta(delta, d):
    assert locmoe_assignment_probability(delta, d) == pytest.approx(_naive_p(delta, d), rel=1e-6, abs=1e-9)


def test_against_scipy_and_monte_carlo():
    special = pytest.importorskip("scipy.special")
    for delta, d in [(0.03, 4096), (0.2, 100), (0.5, 10)]:
        ref = 1 - special.betainc(0.5, (d - 1) / 2, delta ** 2)
        assert locmoe_assignment_probability(delta, d) == pytest.approx(ref, rel=1e-9)
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(200_000, 12, generator=g, dtype=torch.float64), dim=-1)
    mc = float((x[:, 0].abs() >= 0.25).double().mean())
    assert locmoe_assignment_probability(0.25, 12) == pytest.approx(mc, abs=4e-3)


def test_capacity_bound_and_its_large_d_form():
    n, d = 16, 4096
    p = locmoe_assignment_probability(0.03, d)
    assert locmoe_min_capacity(0.03, d, n) == pytest.approx(1 / (n * p))
    large = locmoe_min_capacity(0.03, d, n, large_d=True)
    assert large == pytest.approx(1 / (n * math.erfc(math.sqrt(0.03 ** 2 * d / (2 - 0.03 ** 2)))))
    assert large == pytest.approx(locmoe_min_capacity(0.03, d, n), rel=2e-3)  # the two forms agree at large d
    assert locmoe_min_capacity(0.0, d, n) == pytest.approx(1 / n)
    bounds = [locmoe_min_capacity(c, 256, n) for c in (0.0, 0.05, 0.1, 0.2)]
    assert bounds == sorted(bounds)  # narrower angle (larger cos) -> larger bound
    assert locmoe_min_capacity(1.0, 8, n) == math.inf


def test_min_assignment_cosine_matches_a_loop():
    torch.manual_seed(1)
    x, W = torch.randn(9, 5), torch.randn(4, 5)
    experts = torch.randint(0, 4, (9, 2))
    valid = torch.tensor([True] * 7 + [False] * 2)
    cos = [float(x[t] @ W[e] / (x[t].norm() * W[e].norm())) for t in range(7) for e in experts[t].tolist()]
    assert min_assignment_cosine(x, W, experts, valid) == pytest.approx(max(min(cos), 0.0), abs=1e-6)
    aligned = W[experts[:, 0]] * 3
    assert min_assignment_cosine(aligned, W, experts[:, :1]) == pytest.approx(1.0)


def test_argument_checks():
    with pytest.raises(ValueError, match="delta"):
        locmoe_min_capacity(1.5, 8, 4)
    with pytest.raises(ValueError, match="delta"):
        locmoe_min_capacity(float("nan"), 8, 4)
    with pytest.raises(ValueError, match="hidden_size"):
        locmoe_assignment_probability(0.1, 1)
    with pytest.raises(TypeError, match="num_experts"):
        locmoe_min_capacity(0.1, 8, True)
    with pytest.raises(ValueError, match="experts_TK"):
        min_assignment_cosine(torch.randn(3, 4), torch.randn(2, 4), torch.zeros(2, 1, dtype=torch.long))
