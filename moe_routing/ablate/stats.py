"""Paired statistics for router comparisons: confidence intervals, minimal detectable effects, verdicts, and
the comparison at equal expert compute (iso-FLOP).

Runs of two routers with the same seed see the same batches and the same shared initial weights, so the
per-seed difference ``d_s = loss(router, s) - loss(baseline, s)`` removes most seed noise; the interval is the
paired t-interval over seeds. A verdict is read from the interval, never from the mean: a claim "router beats
the baseline" is *reproduced* when the whole interval is below 0, *not reproduced* when it is above 0, and
*not resolvable* when it contains 0 (the minimal detectable effect then says how large an effect these seeds
could have seen).
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Optional, Sequence

from scipy import stats as _scipy_stats

REPRODUCED, NOT_REPRODUCED, NOT_RESOLVABLE = "reproduced", "not reproduced", "not resolvable"


@dataclass(frozen=True)
class PairedStats:
    """Summary of paired differences ``d_s`` over n seeds.

    ``lo``/``hi``: the two-sided ``confidence`` t-interval of the mean (None for n < 2). ``mde``: the smallest
    true mean difference a two-sided paired t-test at ``1 - confidence`` would detect with probability
    ``power`` given the observed spread, ``(t_{1-a/2,n-1} + t_{power,n-1}) * sd / sqrt(n)`` (None for n < 2).
    """

    n: int
    mean: float
    std: float
    lo: Optional[float]
    hi: Optional[float]
    mde: Optional[float]

    def verdict(self, claim_sign: int = -1) -> str:
        """``claim_sign`` -1: the claim is that the difference is negative (lower loss than the baseline)."""
        if claim_sign not in (-1, 1):
            raise ValueError(f"claim_sign must be -1 or 1, got {claim_sign!r}")
        if self.lo is None or self.hi is None:
            return NOT_RESOLVABLE
        lo, hi = (self.lo, self.hi) if claim_sign == -1 else (-self.hi, -self.lo)
        if hi < 0:
            return REPRODUCED
        if lo > 0:
            return NOT_REPRODUCED
        return NOT_RESOLVABLE


def paired_stats(diffs: Sequence[float], confidence: float = 0.95, power: float = 0.8) -> PairedStats:
    """The paired t-interval and minimal detectable effect of ``diffs`` (one difference per seed)."""
    if not 0 < confidence < 1 or not 0 < power < 1:
        raise ValueError(f"confidence and power must be in (0, 1), got {confidence!r}, {power!r}")
    values = [float(d) for d in diffs]
    if not values or not all(math.isfinite(d) for d in values):
        raise ValueError(f"diffs must be a non-empty sequence of finite numbers, got {list(diffs)!r}")
    n, mean = len(values), statistics.fmean(values)
    if n < 2:
        return PairedStats(n, mean, 0.0, None, None, None)
    sd = statistics.stdev(values)
    se = sd / math.sqrt(n)
    t_half = float(_scipy_stats.t.ppf(0.5 + confidence / 2, n - 1))
    t_power = float(_scipy_stats.t.ppf(power, n - 1))
    return PairedStats(n, mean, sd, mean - t_half * se, mean + t_half * se, (t_half + t_power) * se)


def loss_at_compute(val_curve: Sequence[Sequence[float]], compute_curve: Sequence[float], budget: float) -> float:
    """Validation loss at cumulative expert compute ``budget``, linearly interpolated between evaluations.

    ``val_curve``: [[step, loss], ...]; ``compute_curve``: cumulative expert FLOPs at each of those evaluations
    (non-decreasing). A budget outside the measured range is an error, not an extrapolation."""
    if len(val_curve) != len(compute_curve) or not val_curve:
        raise ValueError(f"val_curve and compute_curve must be non-empty and of equal length, got "
                         f"{len(val_curve)} and {len(compute_curve)}")
    xs, ys = [float(c) for c in compute_curve], [float(v) for _, v in val_curve]
    if any(b < a for a, b in zip(xs, xs[1:])):
        raise ValueError("compute_curve must be non-decreasing")
    if not xs[0] <= budget <= xs[-1]:
        raise ValueError(f"budget {budget:.4g} is outside the measured compute range [{xs[0]:.4g}, {xs[-1]:.4g}]")
    for i in range(1, len(xs)):
        if budget <= xs[i]:
            x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
            return y1 if x1 == x0 else y0 + (y1 - y0) * (budget - x0) / (x1 - x0)
    return ys[0]  # one evaluation, at exactly the budget


def iso_compute_diff(run: dict, baseline: dict) -> Optional[float]:
    """Loss difference of ``run`` minus ``baseline`` at the larger compute both reached (the smaller of their
    final cumulative expert FLOPs), or None when either run lacks a compute curve (older results) or the
    budget precedes one of the runs' first evaluations."""
    a, b = run.get("val_compute_curve"), baseline.get("val_compute_curve")
    if not a or not b or len(a) != len(run["val_curve"]) or len(b) != len(baseline["val_curve"]):
        return None
    budget = min(a[-1], b[-1])
    if budget < max(a[0], b[0]):
        return None
    return loss_at_compute(run["val_curve"], a, budget) - loss_at_compute(baseline["val_curve"], b, budget)
