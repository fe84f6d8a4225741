"""Dirichlet-prior shaping loss (DPSL), arXiv 2510.01185.

Shapes the batch distribution of each expert's routing probability toward the marginal of a target Dirichlet
prior over the probability simplex: under ``p ~ Dirichlet(alpha_1..alpha_E)``, ``p_e ~ Beta(alpha_e, A - alpha_e)``
with ``A = sum alpha``. For expert e with its N (non-padding) probabilities sorted, ``p_(1) <= ... <= p_(N)``:

    L_e  = (1/N) sum_i ( i/(N+1) - F_Beta(p_(i); alpha_e, A - alpha_e) )^2
    DPSL = mean_e L_e

This is the Cramer-von Mises form of the CDF-matching "Batch-Shaping" family the paper builds on; the paper's
exact statistic and default hyper-parameters are not public, so this form and the defaults below are our
choices (unconfirmed). ``F_Beta`` is `betainc`; its gradient in ``p`` is the Beta pdf clipped to [1e-3, 100].

Probabilities: ``decision.scores_TE`` for softmax routers (the full softmax over E); other score functions
(sigmoid, ReLU) are normalised per token first, as the switch aux loss does.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from ..validation import check_float
from .base import Loss, LossInputs
from .betainc import MAX_PARAM, betainc, iterations_for


def default_concentration(num_experts: int, top_k: int) -> list[float]:
    """Symmetric ``alpha_e = k / E`` (total concentration ``A = k``).

    Mean ``1/E`` per expert (balanced load), and sparse per token: under Dirichlet(k/E) the expected
    ``sum_e p_e^2`` is ``(1 + k/E) / (1 + k)``, i.e. about ``(k + 1) / (1 + k/E)`` effective experts per token —
    a confident top-k router rather than the near-uniform softmax of an untrained (or upcycled) one.
    """
    return [top_k / num_experts] * num_experts


def dpsl_loss(probs_TE: Tensor, concentration_E: Tensor, valid_T: Optional[Tensor] = None,
              num_iters: Optional[int] = None, grad_min: float = 1e-3, grad_max: float = 100.0) -> Tensor:
    """DPSL (no coefficient) of per-token probabilities ``probs_TE`` [T, E] against Dirichlet(concentration_E).

    Args:
        probs_TE: [T, E] floating, rows on the simplex (values are clamped to [0, 1] for the CDF).
        concentration_E: [E] positive Dirichlet parameters (E >= 2), on any device.
        valid_T: bool [T], False at padding (excluded), or None.
        num_iters: continued-fraction iterations of `betainc` (default: `iterations_for` the total
            concentration when ``concentration_E`` is on the CPU, else 200).
        grad_min, grad_max: clip of the Beta pdf used as the CDF's gradient.

    Returns a scalar; 0 (still in the graph) when no token is valid.
    """
    if not isinstance(probs_TE, Tensor) or not probs_TE.is_floating_point() or probs_TE.dim() != 2:
        raise TypeError(f"probs_TE must be a floating [T, E] tensor, got "
                        f"{tuple(probs_TE.shape) if isinstance(probs_TE, Tensor) else type(probs_TE).__name__}")
    E = probs_TE.shape[1]
    if not isinstance(concentration_E, Tensor):
        raise TypeError(f"concentration_E must be a tensor [E], got {type(concentration_E).__name__}")
    if concentration_E.shape != (E,) or E < 2:
        raise ValueError(f"concentration_E must have shape [E] = [{E}] with E >= 2, got "
                         f"{tuple(concentration_E.shape)}")
    # checked where it costs no device sync (CPU); elsewhere the caller vouches for it
    if concentration_E.device.type == "cpu" and not bool(((concentration_E > 0) & concentration_E.isfinite()).all()):
        raise ValueError(f"concentration_E must be positive and finite, got {concentration_E.tolist()}")
    if valid_T is not None and (not isinstance(valid_T, Tensor) or valid_T.dtype != torch.bool
                                or valid_T.shape != probs_TE.shape[:1]):
        raise ValueError(f"valid_T must be a bool tensor of shape [T] = [{probs_TE.shape[0]}], got "
                         f"{getattr(valid_T, 'dtype', type(valid_T).__name__)} {tuple(getattr(valid_T, 'shape', ()))}")
    if num_iters is None and concentration_E.device.type == "cpu":
        num_iters = iterations_for(float(concentration_E.sum()))
    return _per_expert(probs_TE, concentration_E, valid_T, num_iters, grad_min, grad_max).mean()


class DPSLoss(Loss):
    """Dirichlet-prior shaping loss: ``coeff * DPSL`` (see the module docstring).

    Args:
        coeff: loss coefficient. Default 0.1 (unconfirmed). DPSL is at most 1/3 per expert, ~0.1 for an
            untrained near-uniform router. In a toy run (2 layers, E=8, k=2, 200 AdamW steps, no other balance
            loss) 1e-2 left routing as without it (DPSL 0.088 -> 0.086), 0.1 moved it part-way (0.063, MaxVio
            0.48 -> 0.28), 1.0 matched the prior (0.005, MaxVio 0.22, routing entropy 1.97 -> 1.11).
        concentration: Dirichlet parameters of the target prior: None (default) = symmetric ``top_k / E`` per
            expert (see `default_concentration`), a positive number = symmetric ``alpha_e = concentration``, or
            a sequence / 1-D tensor of E positive values (asymmetric priors, e.g. experts meant for a modality).
        grad_clip: ``(min, max)`` clip of the Beta pdf used as the CDF's gradient (default (1e-3, 100)).

    DPSL controls balance itself (each marginal has mean ``alpha_e / A``), so it is meant to *replace* the
    switch aux loss: ``MoELayer(..., losses=[DPSLoss()])`` (adding both works but double-counts balance).
    Padding tokens (``LossInputs.valid_T``) are excluded. Its statistic ``dpsl_per_expert`` (in the layer's
    ``last_stats``) holds the detached [E] per-expert terms. Needs E >= 2 (a Beta marginal needs ``A - alpha_e > 0``).
    """

    name = "dpsl"

    def __init__(self, coeff: float = 0.1, concentration: Union[None, float, Sequence[float], Tensor] = None,
                 grad_clip: tuple[float, float] = (1e-3, 100.0)) -> None:
        super().__init__(coeff)
        self.concentration = self._check_concentration(concentration)
        if (not isinstance(grad_clip, (tuple, list)) or len(grad_clip) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in grad_clip)
                or not 0 <= grad_clip[0] <= grad_clip[1]):
            raise ValueError(f"grad_clip must be a pair (min, max) with 0 <= min <= max, got {grad_clip!r}")
        self.grad_clip = (float(grad_clip[0]), float(grad_clip[1]))
        self._alpha_cache: dict[tuple, Tensor] = {}

    @staticmethod
    def _check_concentration(c) -> Union[None, float, Tensor]:
        if c is None:
            return None
        if isinstance(c, bool):
            raise TypeError("concentration must be None, a positive number or E positive values, got a bool")
        if isinstance(c, (int, float)):
            return check_float("concentration", c, 0.0, MAX_PARAM, low_inclusive=False)
        if isinstance(c, Tensor) and not c.is_floating_point():
            raise TypeError(f"concentration tensor must be floating point, got dtype {c.dtype}")
        try:
            t = torch.as_tensor(c, dtype=torch.float64, device="cpu").detach()
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"concentration must be None, a number or a sequence of numbers, got "
                            f"{type(c).__name__}") from err
        if t.dim() == 0:
            return DPSLoss._check_concentration(float(t))
        if t.dim() != 1 or t.numel() < 2:
            raise ValueError(f"concentration must be a number or a 1-D sequence of E >= 2 values, got shape "
                             f"{tuple(t.shape)}")
        if not bool(((t > 0) & (t <= MAX_PARAM)).all()):
            raise ValueError(f"concentration values must lie in (0, {MAX_PARAM:g}], got {t.tolist()}")
        return t

    def __repr__(self) -> str:
        c = self.concentration
        shown = "k/E" if c is None else (f"{c:g}" if isinstance(c, float) else f"[{c.numel()} values]")
        return f"DPSLoss(coeff={self.coeff:g}, concentration={shown})"

    def concentration_for(self, num_experts: int, top_k: int) -> Tensor:
        """The prior's parameters [E] (float64, CPU) for a layer with E experts and nominal top_k."""
        if num_experts < 2:
            raise ValueError(f"DPSLoss needs num_experts >= 2, got {num_experts}")
        c = self.concentration
        if c is None:
            alpha_E = torch.tensor(default_concentration(num_experts, top_k), dtype=torch.float64)
        elif isinstance(c, float):
            alpha_E = torch.full((num_experts,), c, dtype=torch.float64)
        elif c.numel() != num_experts:
            raise ValueError(f"concentration has {c.numel()} values but the layer has num_experts={num_experts}")
        else:
            alpha_E = c
        total = float(alpha_E.sum())
        if total > MAX_PARAM:  # the Beta CDF's cost grows like sqrt(total); beyond this it is a point mass
            raise ValueError(f"DPSLoss concentration sums to {total:g} over {num_experts} experts; the Beta "
                             f"marginals need a sum <= {MAX_PARAM:g} (use a smaller concentration)")
        return alpha_E

    def compute(self, inputs: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
        decision = inputs.decision
        alpha_E = self.concentration_for(decision.num_experts, inputs.top_k)
        # the CDF's iteration count comes from host-side hyper-parameters: no device sync
        num_iters = iterations_for(float(alpha_E.sum()))
        p_TE = decision.probs_TE
        key = (p_TE.device, p_TE.dtype, decision.num_experts, inputs.top_k)
        if key not in self._alpha_cache:  # one host-to-device copy per device/dtype/layer shape, not per step
            self._alpha_cache[key] = alpha_E.to(device=p_TE.device, dtype=p_TE.dtype)
        loss_E = _per_expert(p_TE, self._alpha_cache[key], inputs.valid_T, num_iters, *self.grad_clip)
        return loss_E.mean(), {"dpsl_per_expert": loss_E.detach()}


def _per_expert(p_TE: Tensor, alpha_E: Tensor, valid_T: Optional[Tensor], num_iters: Optional[int],
                grad_min: float, grad_max: float) -> Tensor:
    """The [E] terms ``L_e`` (zeros, in the graph, when no token is valid).

    Padding is excluded without a host sync (no boolean indexing): padded entries are replaced by 2 (above
    any probability) so they sort last, and only the first ``N = #valid`` ranks count, with ``N`` a tensor.
    """
    T = p_TE.shape[0]
    a_E = alpha_E.to(device=p_TE.device, dtype=p_TE.dtype)
    b_E = a_E.sum() - a_E
    rank_T1 = torch.arange(1, T + 1, device=p_TE.device, dtype=p_TE.dtype)[:, None]
    if valid_T is None:
        sorted_TE = torch.sort(p_TE, dim=0).values
        n = float(T)
        keep_T1 = None
    else:
        sorted_TE = torch.sort(torch.where(valid_T[:, None], p_TE, 2.0), dim=0).values
        n = valid_T.sum().to(p_TE.dtype)
        keep_T1 = rank_T1 <= n
    cdf_TE = betainc(sorted_TE, a_E, b_E, num_iters, grad_min, grad_max)
    sq_TE = (rank_T1 / (n + 1) - cdf_TE).square()
    if keep_T1 is not None:
        sq_TE = torch.where(keep_T1, sq_TE, 0.0)
        n = n.clamp_min(1)
    return sq_TE.sum(0) / n
