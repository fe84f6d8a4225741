"""moe_routing/ablate/stats.py: the paired t-interval against scipy's paired t-test, the minimal detectable
effect against the power of the t-test (noncentral t), verdicts read from the interval, and
validation loss interpolated at equal expert compute."""
import math

import pytest
from scipy import stats as scipy_stats

from moe_routing.ablate.results import aggregate
from moe_routing.ablate.stats import (NOT_REPRODUCED, NOT_RESOLVABLE, REPRODUCED, iso_compute_diff,
                                      loss_at_compute, paired_stats)


@pytest.mark.parametrize("diffs", [[-0.2, -0.1, -0.15], [0.01, -0.03, 0.02, 0.05, -0.01], [1.0, 2.0]])
def test_paired_interval_matches_scipy_paired_t_test(diffs):
    st = paired_stats(diffs)
    ci = scipy_stats.ttest_rel(diffs, [0.0] * len(diffs)).confidence_interval(0.95)
    assert st.lo == pytest.approx(ci.low, rel=1e-12) and st.hi == pytest.approx(ci.high, rel=1e-12)
    assert st.mean == pytest.approx(sum(diffs) / len(diffs)) and st.n == len(diffs)


def test_minimal_detectable_effect_has_the_requested_power():
    """At a true mean equal to the MDE, the two-sided paired t-test rejects with probability ~power: checked with
    the noncentral t distribution (normal approximation of the formula, so close, not exact)."""
    diffs = [0.3, -0.1, 0.2, 0.05, -0.2, 0.1, 0.0, 0.15]
    st = paired_stats(diffs, confidence=0.95, power=0.8)
    n, se = len(diffs), st.std / math.sqrt(len(diffs))
    t_crit = scipy_stats.t.ppf(0.975, n - 1)
    power = 1 - scipy_stats.nct.cdf(t_crit, n - 1, st.mde / se)
    assert 0.77 < power < 0.83


def test_verdicts_are_read_from_the_interval():
    assert paired_stats([-0.2, -0.1, -0.15]).verdict(-1) == REPRODUCED
    assert paired_stats([0.2, 0.1, 0.15]).verdict(-1) == NOT_REPRODUCED
    assert paired_stats([0.2, 0.1, 0.15]).verdict(+1) == REPRODUCED
    # a negative mean whose interval contains 0 decides nothing
    st = paired_stats([-0.3, 0.1, -0.2])
    assert st.mean < 0 and st.lo < 0 < st.hi and st.verdict(-1) == NOT_RESOLVABLE
    assert paired_stats([-0.3]).verdict(-1) == NOT_RESOLVABLE  # one seed: no interval
    with pytest.raises(ValueError, match="diffs must be a non-empty sequence of finite numbers"):
        paired_stats([0.1, float("nan")])
    with pytest.raises(ValueError, match="claim_sign must be -1 or 1"):
        paired_stats([0.1, 0.2]).verdict(0)


def test_loss_at_compute_interpolates_and_refuses_extrapolation():
    curve = [[10, 3.0], [20, 2.0], [30, 1.5]]
    compute = [100.0, 200.0, 400.0]
    assert loss_at_compute(curve, compute, 150.0) == pytest.approx(2.5)
    assert loss_at_compute(curve, compute, 300.0) == pytest.approx(1.75)
    assert loss_at_compute(curve, compute, 400.0) == 1.5 and loss_at_compute(curve, compute, 100.0) == 3.0
    with pytest.raises(ValueError, match="outside the measured compute range"):
        loss_at_compute(curve, compute, 500.0)
    with pytest.raises(ValueError, match="non-decreasing"):
        loss_at_compute(curve, [100.0, 50.0, 400.0], 200.0)


def _run(router, seed, final, curve, compute):
    return {"router": router, "seed": seed, "final_val_loss": final, "val_curve": curve, "val_compute_curve": compute,
            "tokens_per_s": 1.0, "active_params": 1, "total_params": 1, "experts_per_token_train_avg": 1.0,
            "expert_flops_per_token_train_avg": 1.0, "final_experts_per_token": 1.0, "final_sparsity": 0.5,
            "final_max_vio": 0.1, "final_routing_entropy": 1.0}


def test_a_router_that_spends_more_compute_is_compared_at_equal_compute():
    """The challenger ends lower but spent twice the expert FLOPs: at the baseline's final compute it is worse."""
    runs = []
    for seed, eps in enumerate((0.0, 0.01, -0.01)):
        runs.append(_run("topk", seed, 2.0 + eps, [[1, 3.0 + eps], [2, 2.0 + eps]], [100.0, 200.0]))
        runs.append(_run("relu", seed, 1.9 + eps, [[1, 3.5 + eps], [2, 1.9 + eps]], [200.0, 400.0]))
    assert iso_compute_diff(runs[1], runs[0]) == pytest.approx(3.5 - 2.0)
    relu = next(r for r in aggregate(runs) if r["router"] == "relu")
    assert relu["delta_vs_topk"] == pytest.approx(-0.1) and relu["verdict"] == REPRODUCED
    assert relu["iso_delta_vs_topk"] == pytest.approx(1.5) and relu["iso_verdict"] == NOT_REPRODUCED
