"""moe_routing/ablate/scaling.py and sweep.py: the routed scaling-law fit recovers known coefficients and its
standard errors equal the textbook least-squares formula; effective parameters; per-cell routed - dense effects
against a hand-computed paired t-interval; a tiny `moe-ablate sweep` end to end."""
import json
import math
import statistics

import numpy as np
import pytest

from moe_routing.ablate import cli
from moe_routing.ablate.config import get_preset
from moe_routing.ablate.scaling import fit_routed_scaling, saturated_experts
from moe_routing.ablate.sweep import base_params, effect_lines, expert_effects, grid_preset


def _grid():
    N = np.repeat([1e5, 3e5, 1e6, 3e6], 4)
    E = np.tile([1.0, 2.0, 4.0, 8.0], 4)
    return N, E


def test_fit_recovers_exact_coefficients():
    N, E = _grid()
    a, b, c, d = -0.08, -0.05, 0.003, 1.9
    L = np.exp(a * np.log(N) + b * np.log(E) + c * np.log(N) * np.log(E) + d)
    fit = fit_routed_scaling(N, E, L)
    assert (fit.a, fit.b, fit.c, fit.d) == pytest.approx((a, b, c, d), abs=1e-9)
    assert fit.residual_std < 1e-10 and fit.n_points == 16
    # E = 1: a dense model is its own effective size; more experts act like a bigger dense model here (b < 0)
    assert fit.effective_params(1e6, 1) == pytest.approx(1e6)
    assert fit.effective_params(1e6, 8) > 1e6
    np.testing.assert_allclose(fit.predict(N, E), L, rtol=1e-9)
    assert fit.n_effect_resolved()


def test_effective_parameters_need_a_resolved_n_effect():
    """With the loss flat in N (a ~ 0 inside seed noise) dividing by a would turn any E effect into unbounded
    parameter counts: the fit says the N effect is not resolved instead."""
    rng = np.random.default_rng(1)
    N, E = _grid()
    rising = np.exp(0.01 * np.log(N) - 0.05 * np.log(E) + 2.0 + rng.normal(0, 0.002, N.size))
    assert not fit_routed_scaling(N, E, rising).n_effect_resolved()
    # a = -0.002 inside noise of 0.05: the interval of a contains 0
    noisy = np.exp(-0.002 * np.log(N) - 0.05 * np.log(E) + 2.0 + rng.normal(0, 0.05, N.size))
    fit = fit_routed_scaling(N, E, noisy)
    assert abs(fit.a) < 3 * fit.stderr[0] and not fit.n_effect_resolved()
    falling = np.exp(-0.08 * np.log(N) - 0.05 * np.log(E) + 2.0 + rng.normal(0, 0.002, N.size))
    assert fit_routed_scaling(N, E, falling).n_effect_resolved()


def test_standard_errors_equal_the_least_squares_formula():
    rng = np.random.default_rng(0)
    N, E = _grid()
    L = np.exp(-0.08 * np.log(N) - 0.05 * np.log(E) + 2.0 + rng.normal(0, 0.01, N.size))
    fit = fit_routed_scaling(N, E, L)
    X = np.stack([np.log(N), np.log(E), np.log(N) * np.log(E), np.ones_like(N)], 1)
    y = np.log(L)
    beta = np.linalg.solve(X.T @ X, X.T @ y)
    resid = y - X @ beta
    sigma2 = resid @ resid / (N.size - 4)
    np.testing.assert_allclose(fit.stderr, np.sqrt(np.diag(sigma2 * np.linalg.inv(X.T @ X))), rtol=1e-6)
    np.testing.assert_allclose((fit.a, fit.b, fit.c, fit.d), beta, rtol=1e-9)


def test_saturating_transform_and_bad_inputs():
    Ep = saturated_experts(np.array([1.0, 2.0, 1e9]), 1.5, 300.0)
    assert Ep[0] == pytest.approx(1.5) and Ep[-1] == pytest.approx(300.0, rel=1e-5) and Ep[0] < Ep[1] < Ep[2]
    N, E = _grid()
    with pytest.raises(ValueError, match="need >= 4 points with >= 2 distinct N and >= 2 distinct E"):
        fit_routed_scaling([1e5, 1e5, 1e5, 1e5], [1, 2, 4, 8], [3.0, 2.9, 2.8, 2.7])
    with pytest.raises(ValueError, match="need finite N > 0, E >= 1 and L > 0"):
        fit_routed_scaling(N, E * 0, np.ones_like(N))
    with pytest.raises(ValueError, match="give both e_start and e_max"):
        fit_routed_scaling(N, E, np.ones_like(N), e_start=1.5)
    with pytest.raises(ValueError, match="need finite 1 <= e_start < e_max"):
        saturated_experts(E, 5.0, 2.0)


def test_grid_preset_and_base_parameters():
    base = get_preset("smoke")
    p = grid_preset(base, 16, 4)
    assert (p.d_model, p.expert_hidden, p.num_experts, p.top_k) == (16, 16, 4, 1)
    D, F_, L = 16, 16, base.n_layers
    assert base_params(p, 256) == L * (4 * D * D + 2 * D + 3 * D * F_) + D  # attention, norms, FFN, final norm
    with pytest.raises(ValueError, match="does not split into the preset's 2 heads of even size"):
        grid_preset(base, 18, 2)


def test_expert_effects_are_paired_over_shared_seeds():
    dense = {0: 2.00, 1: 2.10, 2: 1.95, 3: 2.05}
    routed = {0: 1.90, 1: 2.02, 2: 1.88}  # seed 3 missing: the pairs are over seeds 0-2
    points = ([{"width": 32, "experts": 1, "seed": s, "final_val_loss": v} for s, v in dense.items()]
              + [{"width": 32, "experts": 4, "seed": s, "final_val_loss": v} for s, v in routed.items()]
              + [{"width": 48, "experts": 2, "seed": 0, "final_val_loss": 1.7},  # no dense cell at this width
                 {"width": 64, "experts": 1, "seed": 0, "final_val_loss": 1.8},
                 {"width": 64, "experts": 8, "seed": 0, "final_val_loss": 1.9}])
    (a, b) = expert_effects(points)
    d = [routed[s] - dense[s] for s in (0, 1, 2)]  # -0.10, -0.08, -0.07
    half = 4.302652729911275 * statistics.stdev(d) / math.sqrt(3)  # t_{0.975, 2}
    assert (a["width"], a["experts"], a["seeds"]) == (32, 4, 3)
    assert a["mean"] == pytest.approx(sum(d) / 3, abs=1e-12)
    assert (a["lo"], a["hi"]) == (pytest.approx(sum(d) / 3 - half, abs=1e-9), pytest.approx(sum(d) / 3 + half,
                                                                                              abs=1e-9))
    assert a["verdict"] == "reproduced"  # the whole interval is below 0: experts help at this cell
    assert (b["width"], b["experts"], b["seeds"], b["lo"], b["verdict"]) == (64, 8, 1, None, "not resolvable")
    assert b["mean"] == pytest.approx(0.1)
    lines = effect_lines([a, b])
    assert "D=  32 E=  4: -0.0833 [" in lines[1] and lines[1].endswith("over 3 seed(s): reproduced")
    assert lines[2] == "  D=  64 E=  8: +0.1000 over 1 seed(s): not resolvable"
    assert expert_effects([pt for pt in points if pt["experts"] != 1]) == [] and effect_lines([]) == []


def test_sweep_end_to_end(tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", "--preset", "smoke", "--steps", "3", "--widths", "16,32", "--experts", "1,2,4", "--jobs", "1",
            "--out", str(out), "--no-progress"]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "fit on 6 points" in text and "effective parameters" in text and "routed - dense (E = 1)" in text
    summary = json.loads((out / "sweep.json").read_text())
    assert len(summary["points"]) == 6 and summary["fit"]["stderr"] is not None
    assert [(x["width"], x["experts"], x["seeds"]) for x in summary["vs_dense"]] == [(16, 2, 1), (16, 4, 1),
                                                                                     (32, 2, 1), (32, 4, 1)]
    assert (out / "scaling.png").read_bytes()[:4] == b"\x89PNG"
    assert cli.main(["sweep", "--router", "dense", "--out", str(tmp_path / "d")]) == 2
    assert "needs a routed model" in capsys.readouterr().err
