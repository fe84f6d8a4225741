"""Expert-router coupling (ERC) loss, arXiv 2512.23447.

Each router row ``R[i]`` [D] is treated as a proxy token for the tokens expert i receives. A perturbed copy
``R~[i] = R[i] * delta_i`` (``delta_i ~ U(1 - eps_i, 1 + eps_i)^D`` per coordinate, ``eps_i = ||R[i] - R[j*]|| /
(2 ||R[i]||)`` with ``j*`` the nearest other row, so ``||R~[i] - R[i]|| <= ||R[i] - R[j*]|| / 2``: the proxy stays in
expert i's cluster) goes through every expert's SwiGLU gate projection:

    M[i, j] = || R~[i] @ W_g^j ||_2                                                       (E x E)
    L_ERC   = (1/E^2) sum_i sum_{j != i} [ relu(M[i,j] - alpha M[i,i]) + relu(M[j,i] - alpha M[i,i]) ]

The first hinge asks proxy i to excite its own expert most, the second asks expert i to respond most to its own
proxy. The cost is ``E^2 * D * F`` multiply-adds, independent of the batch; memory is bounded by evaluating the
experts in chunks (see `erc_activation_norms`).

Gradients: ``R~`` carries gradient to the router weight through ``R[i]`` only; the noise ``delta`` and the bound
``eps`` are detached (the paper treats eps as a data-independent bound, and a gradient through a nearest-neighbour
distance would push rows apart as a side effect). ``M`` carries gradient to ``w_gate``.

The loss is not scale-invariant (it grows with ``||R|| * ||W_g||``; scaling ``W_g`` down lowers it without better
coupling), so `ERCLoss` records the norms beside the mean ``eps`` (the paper's specialisation measure).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..validation import check_float, check_int
from .base import Loss, LossInputs

_CHUNK_BUDGET = 1 << 25  # default: at most ~32M activation elements (E * chunk * F) per chunk


def erc_eps(router_ED: Tensor) -> Tensor:
    """Noise bound per row, ``eps_i = min_{j != i} ||R[i] - R[j]|| / (2 ||R[i]||)`` [E], detached.

    0 for a single expert (no other row) and for an all-zero row (its proxy is 0 whatever the noise).
    """
    with torch.no_grad():
        R = router_ED.detach()
        E = R.shape[0]
        if E < 2:
            return torch.zeros(E, dtype=R.dtype, device=R.device)
        # direct differences, E^2 memory: the Gram form |a|^2 + |b|^2 - 2ab cancels when rows are close
        # relative to their norm (a near-collapsed router), where eps is the measure we log
        dist_EE = torch.cdist(R[None], R[None], compute_mode="donot_use_mm_for_euclid_dist")[0]
        dist_EE.fill_diagonal_(float("inf"))
        nearest_E = dist_EE.min(-1).values
        norm_E = torch.linalg.vector_norm(R, dim=-1)
        return torch.where(norm_E > 0, nearest_E / (2.0 * norm_E.clamp_min(torch.finfo(R.dtype).tiny)),
                           torch.zeros_like(norm_E))


def erc_proxies(router_ED: Tensor, generator: Optional[torch.Generator] = None,
                dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
    """Perturbed router rows ``R~ = R * delta`` [E, D] and the bounds ``eps`` [E].

    ``delta = 1 + eps[:, None] * (2u - 1)`` with ``u = torch.rand(E, D, generator=generator, dtype=dtype,
    device=generator.device)`` (one draw, moved to the router's device; the default generator when None).
    ``R~`` is differentiable in ``router_ED``; ``delta`` and ``eps`` are not. ``dtype``: compute dtype (default:
    the router's, at least float32).
    """
    dtype = dtype or torch.promote_types(router_ED.dtype, torch.float32)
    R = router_ED.to(dtype)
    eps_E = erc_eps(R)
    E, D = R.shape
    if generator is None:
        u_ED = torch.rand(E, D, dtype=dtype, device=R.device)
    else:
        u_ED = torch.rand(E, D, generator=generator, dtype=dtype, device=generator.device).to(R.device)
    delta_ED = 1.0 + eps_E[:, None] * (2.0 * u_ED - 1.0)
    return R * delta_ED, eps_E


def _norms_chunk(proxy_ED: Tensor, w_gate_JDF: Tensor) -> Tensor:
    """``||proxy[i] @ w_gate[j]||`` for one chunk of experts j: [E, J]."""
    w = w_gate_JDF.to(proxy_ED.dtype)  # bf16 experts: the cast happens per chunk, inside the checkpoint
    h_EJF = torch.einsum("id,jdf->ijf", proxy_ED, w)
    return torch.linalg.vector_norm(h_EJF, dim=-1)


def erc_activation_norms(proxy_ED: Tensor, w_gate_EDF: Tensor, chunk_size: Optional[int] = None) -> Tensor:
    """``M[i, j] = ||proxy[i] @ w_gate[j]||_2`` [E, E] in ``proxy_ED``'s dtype.

    Experts j are processed ``chunk_size`` at a time (default: as many as keep a chunk's ``[E, chunk, F]``
    activations, plus the ``[chunk, D, F]`` copy of its gates when they are cast (bf16 experts), under ~32M
    elements). With more than one chunk each chunk is activation-checkpointed, so backward keeps only
    ``M`` and recomputes a chunk's activations and gate copy: peak extra memory ``chunk * F * (E + D)``
    instead of ``E * F * (E + D)``, for one extra forward of the loss.
    """
    E, D, Fh = w_gate_EDF.shape
    if chunk_size is None:
        # a cast copy of the gates is saved for backward like the activations: count it (D >> E typically)
        per_expert = Fh * (E + (D if w_gate_EDF.dtype != proxy_ED.dtype else 0))
        chunk_size = max(1, _CHUNK_BUDGET // max(1, per_expert))
    if chunk_size >= E:
        return _norms_chunk(proxy_ED, w_gate_EDF)
    cols = []
    for j0 in range(0, E, chunk_size):
        w = w_gate_EDF[j0:j0 + chunk_size]
        cols.append(checkpoint(_norms_chunk, proxy_ED, w, use_reentrant=False, preserve_rng_state=False))
    return torch.cat(cols, dim=1)


def erc_hinge(M_EE: Tensor, alpha: float = 1.0) -> Tensor:
    """``(1/E^2) sum_{i != j} relu(M[i,j] - alpha M[i,i]) + relu(M[j,i] - alpha M[i,i])`` (a scalar)."""
    E = M_EE.shape[0]
    own_E1 = alpha * M_EE.diagonal()[:, None]
    both_EE = torch.relu(M_EE - own_E1) + torch.relu(M_EE.t() - own_E1)
    off = ~torch.eye(E, dtype=torch.bool, device=M_EE.device)
    return (both_EE * off).sum() / (E * E)


def _check_weights(router_ED: Tensor, w_gate_EDF: Tensor) -> None:
    for name, t, dim in (("router weight", router_ED, 2), ("w_gate", w_gate_EDF, 3)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating torch.Tensor, got {type(t).__name__}")
        if t.dim() != dim:
            raise ValueError(f"{name} must have {dim} dims ({'[E, D]' if dim == 2 else '[E, D, F]'}), "
                             f"got shape {tuple(t.shape)}")
    if w_gate_EDF.shape[:2] != router_ED.shape:
        raise ValueError(f"w_gate must have shape [E, D, F] = [{router_ED.shape[0]}, {router_ED.shape[1]}, F] to "
                         f"match the router weight [E, D], got {tuple(w_gate_EDF.shape)}")


def _check_options(alpha: float, chunk_size: Optional[int], generator: Optional[torch.Generator]) -> None:
    check_float("alpha", alpha, 0.0)
    if chunk_size is not None:
        check_int("chunk_size", chunk_size, 1)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


def erc_loss(router_ED: Tensor, w_gate_EDF: Tensor, alpha: float = 1.0, *,
             generator: Optional[torch.Generator] = None, chunk_size: Optional[int] = None) -> Tensor:
    """The ERC loss (no coefficient) for router weight [E, D] and SwiGLU gate projections [E, D, F].

    Computed in ``promote(router dtype, w_gate dtype, float32)`` (bf16 experts are cast per chunk).
    """
    _check_weights(router_ED, w_gate_EDF)
    _check_options(alpha, chunk_size, generator)
    dtype = torch.promote_types(torch.promote_types(router_ED.dtype, w_gate_EDF.dtype), torch.float32)
    proxy_ED, _ = erc_proxies(router_ED, generator, dtype)
    return erc_hinge(erc_activation_norms(proxy_ED, w_gate_EDF, chunk_size), float(alpha))


class ERCLoss(Loss):
    """Expert-router coupling loss on a SwiGLU `MoELayer`: ``coeff * L_ERC`` (see the module docstring).

    Args:
        coeff: loss coefficient. Default 1.0 (unconfirmed: not checked against the paper's training setup).
        alpha: margin factor; a pair is penalised when ``M[i,j] > alpha * M[i,i]``. ``alpha < 1`` demands
            stronger specialisation, ``alpha = 1`` (default) only that the own expert/proxy wins.
        chunk_size: experts per chunk when forming ``M`` (None: automatic, see `erc_activation_norms`).
        generator: torch.Generator for the proxy noise (reproducible runs); None uses the default generator.

    Reads ``LossInputs.gate_weight_ED`` (the router's [E, D] projection) and ``expert_gate_EDF`` (the experts'
    ``w_gate`` [E, D, F]); GELU/ReLU experts have no gate projection and raise TypeError (the paper defines ERC
    on the gate of SwiGLU experts), as does a router without an [E, D] projection (recurrent, hash).

    The loss does not depend on the batch. It is computed only in training forwards with grad enabled (it
    exists to shape parameters); otherwise it returns 0 and draws no noise, so evaluation costs nothing and
    leaves the generator untouched. For a measurement in eval, call `erc_loss` directly.

    Statistics (returned with the value, so they land in the layer's ``last_stats`` and `routing_report`):
    ``erc_eps_mean`` (mean noise bound, the
    paper's specialisation measure), ``erc_router_norm`` (mean ``||R[i]||``), ``erc_gate_norm`` (mean Frobenius
    ``||W_g^j||``), ``erc_act_own`` / ``erc_act_other`` (mean diagonal / off-diagonal ``M``). Read the loss
    together with the norms: it is not scale-invariant.

    Under activation checkpointing with a custom ``generator`` the recomputation draws fresh noise (an equally
    valid sample); with the default generator torch's checkpoint restores the RNG state and the noise repeats.
    """

    name = "erc"

    def __init__(self, coeff: float = 1.0, alpha: float = 1.0, chunk_size: Optional[int] = None,
                 generator: Optional[torch.Generator] = None) -> None:
        super().__init__(coeff)
        _check_options(alpha, chunk_size, generator)
        self.alpha = float(alpha)
        self.chunk_size = chunk_size
        self.generator = generator

    def __repr__(self) -> str:
        return f"ERCLoss(coeff={self.coeff:g}, alpha={self.alpha:g}, chunk_size={self.chunk_size})"

    @staticmethod
    def _weights(inputs: LossInputs) -> tuple[Tensor, Tensor]:
        router_w, w_gate = inputs.gate_weight_ED, inputs.expert_gate_EDF
        if router_w is None:
            raise TypeError("ERCLoss needs a router with an [E, D] projection of the input (LossInputs."
                            "gate_weight_ED is None: recurrent and hash routers have none)")
        if w_gate is None:
            raise TypeError("ERCLoss needs SwiGLU experts with a gate projection `w_gate` [E, D, F] "
                            "(LossInputs.expert_gate_EDF is None: GELU/ReLU experts have none)")
        _check_weights(router_w, w_gate)
        return router_w, w_gate

    def compute(self, inputs: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
        router_w, w_gate = self._weights(inputs)
        if not (inputs.training and torch.is_grad_enabled()):
            return torch.zeros((), dtype=torch.float32, device=router_w.device), {}
        dtype = torch.promote_types(torch.promote_types(router_w.dtype, w_gate.dtype), torch.float32)
        proxy_ED, eps_E = erc_proxies(router_w, self.generator, dtype)
        M_EE = erc_activation_norms(proxy_ED, w_gate, self.chunk_size)
        loss = erc_hinge(M_EE, self.alpha)
        with torch.no_grad():
            E = M_EE.shape[0]
            off = ~torch.eye(E, dtype=torch.bool, device=M_EE.device)
            stats = {
                "erc_eps_mean": eps_E.mean(),
                "erc_router_norm": torch.linalg.vector_norm(router_w.detach().to(dtype), dim=-1).mean(),
                "erc_gate_norm": torch.linalg.vector_norm(w_gate.detach(), dim=(1, 2), dtype=dtype).mean(),
                "erc_act_own": M_EE.detach().diagonal().mean(),
                "erc_act_other": (M_EE.detach() * off).sum() / max(1, E * (E - 1)),
            }
        return loss, stats
