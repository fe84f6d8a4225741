"""Regularised incomplete beta function ``I_x(a, b)`` in torch, with a clipped-pdf gradient in ``x``.

``I_x(a, b)`` is the CDF of Beta(a, b) at ``x``. It is evaluated elementwise with the classic continued fraction
(modified Lentz) for a *fixed* number of iterations, so nothing on an accelerator waits for the host: no
data-dependent loop exit, no ``.item()``. Where ``x > (a + 1) / (a + b + 2)`` the fraction converges slowly, so
the symmetry ``I_x(a, b) = 1 - I_{1-x}(b, a)`` is used there (one fraction per element, never two). The prefactor
``x^a (1-x)^b / (a B(a, b))`` is formed in log space with ``lgamma``.

The iterations the fraction needs grow like ``sqrt(max(a, b))``; `iterations_for` gives a count that reaches
float64 round-off for the parameters it is told (checked against scipy in tests/test_losses_betainc.py).

`BetaCDF` is the autograd function: its backward in ``x`` is the Beta pdf clipped to ``[grad_min, grad_max]``
(default ``[1e-3, 100]``): the floor keeps a gradient for probabilities stuck in a tail (a collapsed router
still gets pushed), the ceiling stops the ``x^(a-1)`` spike at ``x -> 0`` for ``a < 1`` from dominating.
No gradient flows to ``a`` or ``b``.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from ..validation import check_float

Number = Union[int, float]
_FPMIN = 1e-30  # keeps Lentz's ratios away from 0 (representable in float32 and float64)


#: largest a, b the continued fraction is evaluated for: its cost grows like sqrt(max(a, b)), and a Beta with
#: parameters beyond this is a near point mass (std below 0.005 at the mean 1/2)
MAX_PARAM = 1e4


def iterations_for(max_ab: float) -> int:
    """Continued-fraction iterations that reach float64 round-off for ``a, b <= max_ab``: ``20 + 4 sqrt(max_ab)``.

    Empirical, with a margin of 1.5x or more over the worst ``x`` and ``(a, b)`` measured (a, b over
    1e-3..1e3: 10 iterations needed at max 1, 20 at 10, 38 at 100, 50 at 1000; 98 at a = b = 1e4).
    ``max_ab`` above `MAX_PARAM` raises ValueError instead of running an unbounded loop.
    """
    check_float("max_ab", max_ab, 0.0, MAX_PARAM, low_inclusive=False)
    return int(math.ceil(20 + 4 * math.sqrt(max_ab)))


def _log_beta(a: Tensor, b: Tensor) -> Tensor:
    return torch.lgamma(a) + torch.lgamma(b) - torch.lgamma(a + b)


def _continued_fraction(x: Tensor, a: Tensor, b: Tensor, num_iters: int) -> Tensor:
    """The Lentz evaluation of the fraction whose value times ``x^a (1-x)^b / (a B(a,b))`` is ``I_x(a,b)``;
    accurate for ``x <= (a + 1) / (a + b + 2)``. Runs without autograd (in-place updates)."""
    def guarded(v: Tensor) -> Tensor:  # Lentz's rule: never divide by (near) zero
        return v.masked_fill_(v.abs() < _FPMIN, _FPMIN)

    apb = a + b
    c = torch.ones_like(x)
    d = guarded(1.0 - apb * x / (a + 1.0)).reciprocal_()
    h = d.clone()
    for m in range(1, num_iters + 1):
        a_2m = a + 2.0 * m
        # even step: m (b - m) x / ((a + 2m - 1)(a + 2m))
        coef = (b - m).mul_(x).mul_(m).div_((a_2m - 1.0).mul_(a_2m))
        d = guarded(d.mul_(coef).add_(1.0)).reciprocal_()
        c = guarded(coef.div_(c).add_(1.0))
        h.mul_(d).mul_(c)
        # odd step: -(a + m)(a + b + m) x / ((a + 2m)(a + 2m + 1))
        coef = (a + m).mul_(apb + m).mul_(x).neg_().div_((a_2m + 1.0).mul_(a_2m))
        d = guarded(d.mul_(coef).add_(1.0)).reciprocal_()
        c = guarded(coef.div_(c).add_(1.0))
        h.mul_(d).mul_(c)
    return h


def _prepare(x: Tensor, a: Union[Tensor, Number], b: Union[Tensor, Number]) -> tuple[Tensor, Tensor, Tensor]:
    dtype = torch.promote_types(x.dtype, torch.float32)
    a_t = torch.as_tensor(a, dtype=dtype, device=x.device)
    b_t = torch.as_tensor(b, dtype=dtype, device=x.device)
    return torch.broadcast_tensors(x.to(dtype), a_t, b_t)


def betainc_forward(x: Tensor, a: Tensor, b: Tensor, num_iters: int) -> Tensor:
    """``I_x(a, b)`` elementwise for broadcast tensors of one dtype (no autograd)."""
    x = x.clamp(0.0, 1.0)
    swap = x > (a + 1.0) / (a + b + 2.0)
    xs = torch.where(swap, 1.0 - x, x)
    as_, bs = torch.where(swap, b, a), torch.where(swap, a, b)
    # x^a (1-x)^b / B(a,b); at xs = 0 the log is -inf and the prefactor exactly 0
    log_front = torch.xlogy(as_, xs) + torch.special.xlog1py(bs, -xs) - _log_beta(as_, bs)
    value = torch.exp(log_front) * _continued_fraction(xs, as_, bs, num_iters) / as_
    value = value.clamp(0.0, 1.0)  # round-off can leave [0, 1] by an ulp
    return torch.where(swap, 1.0 - value, value)


def beta_pdf(x: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Beta(a, b) density at ``x`` (``xlogy`` makes ``a = 1`` at ``x = 0`` give ``b / B`` rather than NaN)."""
    x = x.clamp(0.0, 1.0)
    return torch.exp(torch.xlogy(a - 1.0, x) + torch.special.xlog1py(b - 1.0, -x) - _log_beta(a, b))


class BetaCDF(torch.autograd.Function):
    """``I_x(a, b)``; backward in ``x`` is the Beta pdf clipped to ``[grad_min, grad_max]``; none to a, b."""

    @staticmethod
    def forward(ctx, x: Tensor, a: Tensor, b: Tensor, num_iters: int, grad_min: float,
                grad_max: float) -> Tensor:
        ctx.save_for_backward(x, a, b)
        ctx.grad_min, ctx.grad_max = grad_min, grad_max
        return betainc_forward(x, a, b, num_iters)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, a, b = ctx.saved_tensors
        slope = beta_pdf(x, a, b).clamp(ctx.grad_min, ctx.grad_max)
        return grad_out * slope, None, None, None, None, None


def _check_param(name: str, v: Union[Tensor, Number]) -> None:
    if isinstance(v, bool) or not isinstance(v, (Tensor, int, float)):
        raise TypeError(f"{name} must be a positive number or a floating tensor, got {type(v).__name__}")
    if isinstance(v, Tensor):
        if not v.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got dtype {v.dtype}")
        if v.device.type == "cpu" and v.numel() and not bool(((v > 0) & (v <= MAX_PARAM)).all()):
            raise ValueError(f"{name} must lie in (0, {MAX_PARAM:g}] everywhere, got values in "
                             f"[{float(v.min())}, {float(v.max())}]")
    else:
        check_float(name, v, 0.0, MAX_PARAM, low_inclusive=False)


def betainc(x: Tensor, a: Union[Tensor, Number], b: Union[Tensor, Number], num_iters: Optional[int] = None,
            grad_min: float = 1e-3, grad_max: float = 100.0) -> Tensor:
    """Regularised incomplete beta ``I_x(a, b)`` (the Beta(a, b) CDF at ``x``), differentiable in ``x``.

    Args:
        x: floating tensor of any shape, values in [0, 1] (others are clamped to it).
        a, b: positive numbers or floating tensors broadcastable with ``x`` (e.g. ``x`` [N, E], ``a`` [E]).
            Positivity is checked for numbers and CPU tensors (a check on an accelerator would sync).
        num_iters: continued-fraction iterations. Default: `iterations_for` of ``max(a, b)`` when both are
            numbers or CPU tensors; for accelerator tensors pass it (default then 200, measured enough for
            a, b <= 1e4).
        grad_min, grad_max: the clip applied to the pdf used as ``d I / d x`` in backward.

    Returns:
        ``I_x(a, b)`` in the broadcast shape, dtype ``promote(x.dtype, float32)``. No gradient reaches a, b.
    """
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating torch.Tensor, got {type(x).__name__}"
                        + (f" of dtype {x.dtype}" if isinstance(x, Tensor) else ""))
    _check_param("a", a)
    _check_param("b", b)
    if not (0 <= grad_min <= grad_max):
        raise ValueError(f"need 0 <= grad_min <= grad_max, got grad_min={grad_min!r}, grad_max={grad_max!r}")
    if num_iters is None:
        on_host = all(not isinstance(v, Tensor) or v.device.type == "cpu" for v in (a, b))
        if on_host:
            params = [torch.as_tensor(v, dtype=torch.float64) for v in (a, b)]
            num_iters = iterations_for(max([float(t.max()) for t in params if t.numel()] + [1.0]))
        else:
            num_iters = 200
    if isinstance(num_iters, bool) or not isinstance(num_iters, int) or num_iters < 1:
        raise ValueError(f"num_iters must be a positive int, got {num_iters!r}")
    x_b, a_b, b_b = _prepare(x, a, b)
    return BetaCDF.apply(x_b, a_b, b_b, num_iters, float(grad_min), float(grad_max))
