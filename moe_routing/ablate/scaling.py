"""Routed scaling laws (Clark et al. 2022, "Unified Scaling Laws for Routed Language Models", arXiv 2202.01169).

The paper's bilinear form in log parameters and log experts,

    log L(N, E) = a log N + b log E' + c log N log E' + d,

with N the parameter count of the dense base model and E' either E itself (the default, as in the issue's
form) or the paper's saturating transform ``1/E' = 1/(E - 1 + (1/E_start - 1/E_max)^-1) + 1/E_max`` (E' =
E_start at E = 1, E' -> E_max as E grows), fitted by least squares on log L; coefficient standard errors from the residual variance. The effective parameter count of a
routed model (the paper's N-bar) is the dense size with the same predicted loss:
``log N-bar = log N + (b log E' + c log N log E') / a``.

A CPU-scale grid spans a few hundred thousand parameters and a few expert counts: the fit describes that grid
and says nothing about extrapolation to the paper's 10^7..10^9 parameters.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np


def saturated_experts(E: np.ndarray, e_start: float, e_max: float) -> np.ndarray:
    """Clark et al.'s saturating transform: E' = ``e_start`` at E = 1, grows with E, saturates at ``e_max``."""
    if not (math.isfinite(e_start) and math.isfinite(e_max) and 1 <= e_start < e_max):
        raise ValueError(f"need finite 1 <= e_start < e_max, got e_start={e_start!r}, e_max={e_max!r}")
    E = np.asarray(E, dtype=np.float64)
    return 1.0 / (1.0 / (E - 1.0 + 1.0 / (1.0 / e_start - 1.0 / e_max)) + 1.0 / e_max)


@dataclass(frozen=True)
class ScalingFit:
    """Fitted ``log L = a log N + b log E' + c log N log E' + d`` with standard errors (None without spare
    points: n <= 4) and the transform of E used."""

    a: float
    b: float
    c: float
    d: float
    stderr: Optional[tuple[float, float, float, float]]
    residual_std: float
    n_points: int
    e_start: Optional[float] = None
    e_max: Optional[float] = None

    def _log_e(self, E) -> np.ndarray:
        E = np.asarray(E, dtype=np.float64)
        return np.log(E if self.e_start is None else saturated_experts(E, self.e_start, self.e_max))

    def predict(self, N, E) -> np.ndarray:
        """Predicted loss L(N, E)."""
        ln, le = np.log(np.asarray(N, dtype=np.float64)), self._log_e(E)
        return np.exp(self.a * ln + self.b * le + self.c * ln * le + self.d)

    def n_effect_resolved(self, confidence: float = 0.95) -> bool:
        """Whether the fit shows loss falling with N: ``a < 0`` with its t-interval (``n_points - 4`` degrees
        of freedom) excluding 0. Effective parameter counts divide by ``a``; with ``a`` indistinguishable from
        0 they are meaningless (any E effect would be worth unbounded parameters)."""
        if self.stderr is None or self.n_points <= 4:
            return False
        from scipy import stats

        t = stats.t.ppf(0.5 + confidence / 2, self.n_points - 4)
        return self.a + t * self.stderr[0] < 0

    def effective_params(self, N, E) -> np.ndarray:
        """The dense parameter count with the loss the routed model (N, E) is predicted to reach (check
        `n_effect_resolved` first: it is only meaningful when the loss measurably falls with N)."""
        ln, le = np.log(np.asarray(N, dtype=np.float64)), self._log_e(E)
        return np.exp(ln + (self.b * le + self.c * ln * le) / self.a)

    def lines(self) -> list[str]:
        names = ("a (log N)", "b (log E)", "c (log N log E)", "d")
        se = self.stderr or (None,) * 4
        out = [f"fit on {self.n_points} points: log L = a log N + b log E{'' if self.e_start is None else chr(39)} "
               f"+ c log N log E{'' if self.e_start is None else chr(39)} + d (residual std {self.residual_std:.4g})"]
        out += [f"  {n:16s} {v:+.5f}" + ("" if s is None else f" +/- {s:.5f}")
                for n, v, s in zip(names, (self.a, self.b, self.c, self.d), se)]
        return out


def fit_routed_scaling(N: Sequence[float], E: Sequence[float], L: Sequence[float],
                       e_start: Optional[float] = None, e_max: Optional[float] = None) -> ScalingFit:
    """Least-squares fit of the bilinear law to points (N_i, E_i, L_i); give ``e_start`` and ``e_max`` for the
    saturating transform of E. Needs at least 4 points spanning two N and two E values."""
    N_, E_, L_ = (np.asarray(v, dtype=np.float64) for v in (N, E, L))
    if not (N_.shape == E_.shape == L_.shape and N_.ndim == 1):
        raise ValueError(f"N, E and L must be 1-D of equal length, got {N_.shape}, {E_.shape}, {L_.shape}")
    if not (np.isfinite(N_).all() and np.isfinite(E_).all() and np.isfinite(L_).all()) \
            or (N_ <= 0).any() or (E_ < 1).any() or (L_ <= 0).any():
        raise ValueError("need finite N > 0, E >= 1 and L > 0 at every point")
    if len(np.unique(N_)) < 2 or len(np.unique(E_)) < 2 or N_.size < 4:
        raise ValueError(f"need >= 4 points with >= 2 distinct N and >= 2 distinct E, got {N_.size} points, "
                         f"N in {sorted(set(N_.tolist()))}, E in {sorted(set(E_.tolist()))}")
    if (e_start is None) != (e_max is None):
        raise ValueError("give both e_start and e_max (saturating transform) or neither")
    le = np.log(E_ if e_start is None else saturated_experts(E_, e_start, e_max))
    ln = np.log(N_)
    X = np.stack([ln, le, ln * le, np.ones_like(ln)], axis=1)
    y = np.log(L_)
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    resid = y - X @ coef
    dof = N_.size - 4
    stderr = None
    residual_std = float(np.sqrt(resid @ resid / max(dof, 1)))
    if dof > 0:
        cov = (resid @ resid / dof) * np.linalg.pinv(X.T @ X)
        stderr = tuple(float(s) for s in np.sqrt(np.clip(np.diag(cov), 0, None)))
    a, b, c, d = (float(v) for v in coef)
    return ScalingFit(a, b, c, d, stderr, residual_std, int(N_.size), e_start, e_max)
