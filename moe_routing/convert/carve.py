"""CMoE carving (Pei et al., "CMoE: Fast Carving of Mixture-of-Experts for Efficient LLM Inference",
arXiv 2502.04416; the implementation read: github.com/workcode-del/CMoE, ``CMoE_utils.py`` and ``CMoE_model.py``).

A dense SwiGLU FFN's F neurons are split into E groups of m = F / E neurons, with no training:

1. Activation markers on calibration inputs: with inputs and weight rows L2-normalised,
   ``h = silu(x^ . g^_j) * (x^ . u^_j)``; a token marks the ``ceil(sparsity * F)`` neurons of largest ``|h|``
   (sparsity 0.1 in the reference). A neuron's activation rate is the fraction of tokens marking it.
2. Shared experts: the ``num_shared * m`` neurons of highest rate (one always-on FFN).
3. Routed experts: balanced k-means of the remaining neurons' marker columns (L1 distance, k = E - num_shared
   clusters of exactly m neurons: each step is a linear assignment of neurons to m slots per cluster),
   centroids started at the k remaining neurons of highest rate, at most 10 steps, stopping when the
   assignment cost changes by less than 1e-3 (relative).
4. Router without training: each cluster's representative neuron (closest to its centroid) gives a gate row
   and a classifier row (its normalised ``w_gate`` and ``w_up`` columns); ``logits = |(x . u^_r) *
   silu(x . g^_r)|``, softmax over the routed experts, top-k; the gates are the softmax values (Switch style).

Deviations, all minor: rate ties are broken by the lower neuron index (a stable sort; the reference's
``torch.topk`` leaves ties unspecified) and the assignment uses SciPy's ``linear_sum_assignment`` instead of
``lap.lapjv`` (both exact; tied optima may differ). The reference's load-balancing bias (``bias_speed``, used
when fine-tuning) is the `TopKRouter` aux-free bias here (``bias_update_rate``), which steers the choice only;
the reference also adds it to the gate values.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..decision import RoutingContext
from ..layer import MoELayer
from ..routers.topk import TopKRouter
from ..validation import check_float, check_int
from .dense import DenseSwiGLU, dense_swiglu


class NeuronGroups(NamedTuple):
    """The carving: ``shared`` int64 [num_shared * m] neuron ids, ``routed`` int64 [k, m] (one row per routed
    expert), ``representatives`` int64 [k] (one neuron per routed expert), ``rates_F`` float [F]."""

    shared: Tensor
    routed: Tensor
    representatives: Tensor
    rates_F: Tensor


def activation_markers(x_TD: Tensor, dense: DenseSwiGLU, sparsity: float = 0.1) -> Tensor:
    """bool [T, F]: the ``ceil(sparsity * F)`` neurons of largest normalised activation ``|h|`` of each token."""
    sparsity = check_float("sparsity", sparsity, 0.0, 1.0, low_inclusive=False)
    if not isinstance(x_TD, Tensor) or x_TD.dim() != 2 or x_TD.shape[1] != dense.hidden_size:
        raise ValueError(f"calibration inputs must be a [T, {dense.hidden_size}] tensor, got "
                         f"{tuple(getattr(x_TD, 'shape', ()))}")
    if x_TD.shape[0] == 0:
        raise ValueError("calibration inputs hold no tokens")
    x = F.normalize(x_TD.double(), dim=-1)
    h_TF = F.silu(x @ F.normalize(dense.w_gate_DF.double(), dim=0)) * (x @ F.normalize(dense.w_up_DF.double(), dim=0))
    K = max(1, math.ceil(dense.ffn_hidden_size * sparsity))
    top_TK = h_TF.abs().topk(K, dim=-1).indices
    return torch.zeros_like(h_TF, dtype=torch.bool).scatter_(1, top_TK, True)


def _ranked(rates: Tensor) -> Tensor:
    """Indices by decreasing rate, ties by increasing index."""
    return torch.sort(-rates, stable=True).indices


def group_neurons(markers_TF: Tensor, num_experts: int, num_shared_experts: int, max_iters: int = 10,
                  tol: float = 1e-3) -> NeuronGroups:
    """CMoE's grouping of F neurons into ``num_shared_experts`` shared and ``num_experts - num_shared_experts``
    routed experts of ``F / num_experts`` neurons each, from the bool [T, F] activation markers."""
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError as e:  # pragma: no cover - scipy is in the dev and ablate extras
        raise ImportError("carving needs scipy (pip install scipy, or the 'ablate' extra)") from e
    T, Fh = markers_TF.shape
    check_int("num_experts", num_experts, 2)
    check_int("num_shared_experts", num_shared_experts, 0, num_experts - 1)
    if Fh % num_experts:
        raise ValueError(f"num_experts must divide the FFN hidden size {Fh}, got {num_experts}")
    check_int("max_iters", max_iters, 1)
    m, k = Fh // num_experts, num_experts - num_shared_experts
    markers = markers_TF.detach().double().cpu()  # the assignment solver runs on the host
    rates = markers.mean(0)
    order = _ranked(rates)
    shared = order[: num_shared_experts * m]
    remaining = torch.sort(order[num_shared_experts * m:]).values  # ascending neuron ids
    cols_TN = markers[:, remaining]
    centroids_TK = cols_TN[:, _ranked(rates[remaining])[:k]].clone()
    prev_cost: Optional[float] = None
    for _ in range(max_iters):
        dist_NK = torch.cdist(cols_TN.t(), centroids_TK.t(), p=1)
        cost_NN = dist_NK.repeat_interleave(m, dim=1).numpy()  # slot j belongs to cluster j // m
        rows, cols = linear_sum_assignment(cost_NN)
        cluster_N = torch.empty(len(rows), dtype=torch.long)
        cluster_N[torch.as_tensor(rows)] = torch.as_tensor(cols) // m
        cost = float(cost_NN[rows, cols].sum())
        if prev_cost is not None and abs(cost - prev_cost) < tol * abs(cost):
            break
        prev_cost = cost
        for c in range(k):
            centroids_TK[:, c] = cols_TN[:, cluster_N == c].mean(1)
    routed, reps = [], []
    for c in range(k):
        members = (cluster_N == c).nonzero().squeeze(1)
        d = torch.cdist(centroids_TK[:, c][None], cols_TN[:, members].t(), p=1)[0]
        reps.append(remaining[members[int(d.argmin())]])
        routed.append(remaining[members])
    return NeuronGroups(shared, torch.stack(routed), torch.stack(reps), rates)


class CarvedRouter(TopKRouter):
    """CMoE's training-free router: ``logits = |(x @ weight.T) * silu(x @ gate_weight.T)|`` with ``weight``
    and ``gate_weight`` [E, D] the normalised ``w_up`` / ``w_gate`` columns of each expert's representative
    neuron; then a `TopKRouter` with Switch gates (softmax over all E, top-k of the probabilities).

    ``init`` arguments are those of `TopKRouter` (``bias_update_rate`` is the reference's load-balancing bias).
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int = 2, **kwargs) -> None:
        kwargs.setdefault("softmax_before_topk", True)
        super().__init__(hidden_size, num_experts, top_k, **kwargs)
        self.gate_weight = nn.Parameter(torch.empty_like(self.weight))
        nn.init.normal_(self.gate_weight, std=self.init_std)

    def gating(self, x_TD: Tensor, ctx: Optional[RoutingContext]) -> Tensor:
        return ((x_TD @ self.weight.t()) * F.silu(x_TD @ self.gate_weight.t())).abs()


@torch.no_grad()
def carve(ffn: nn.Module, calibration_TD: Tensor, num_experts: int, top_k: int = 2, num_shared_experts: int = 1,
          *, sparsity: float = 0.1, router_kwargs: Optional[dict] = None, **layer_kwargs) -> MoELayer:
    """An `MoELayer` carved out of the dense SwiGLU ``ffn`` (left unchanged; see `dense_swiglu`).

    Args:
        calibration_TD: [T, D] inputs of ``ffn`` on calibration text (`capture_inputs` records them).
        num_experts: E, the number of groups the F neurons split into (E must divide F), shared ones included:
            the layer has ``E - num_shared_experts`` routed experts of ``F / E`` neurons and one always-on FFN of
            ``num_shared_experts * F / E`` neurons (CMoE's S{shared}A{k}E{E} naming).
        top_k: routed experts per token.  sparsity: fraction of neurons a token marks as active.
        router_kwargs: extra `CarvedRouter` (`TopKRouter`) arguments, e.g. ``{"bias_update_rate": 1e-3}``.
        layer_kwargs: other `MoELayer` arguments (``losses``, ``capacity_factor``, ...).

    With every routed expert chosen and each gate replaced by 1 the layer computes the dense FFN exactly (the
    groups partition the neurons); with the router's gates it does not, which is what CMoE's short fine-tuning
    recovers. The grouping is in ``layer.carving`` (a `NeuronGroups`).
    """
    dense = dense_swiglu(ffn)
    check_int("num_experts", num_experts, 2)
    check_int("num_shared_experts", num_shared_experts, 0, num_experts - 1)
    check_int("top_k", top_k, 1, num_experts - num_shared_experts)
    for reserved in ("hidden_size", "ffn_hidden_size", "num_experts", "top_k", "activation", "router",
                     "num_shared_experts"):
        if reserved in layer_kwargs:
            raise ValueError(f"carve sets {reserved}; do not pass it in layer_kwargs")
    groups = group_neurons(activation_markers(calibration_TD, dense, sparsity), num_experts, num_shared_experts)
    m, E_r = dense.ffn_hidden_size // num_experts, num_experts - num_shared_experts
    w = dense.w_up_DF
    layer_kwargs.setdefault("device", w.device)
    layer_kwargs.setdefault("dtype", w.dtype)
    router = CarvedRouter(dense.hidden_size, E_r, top_k, device=layer_kwargs["device"], dtype=layer_kwargs["dtype"],
                          **(router_kwargs or {}))
    reps = groups.representatives.to(w.device)
    router.weight.copy_(F.normalize(dense.w_up_DF[:, reps].t().to(router.weight.dtype), dim=-1))
    router.gate_weight.copy_(F.normalize(dense.w_gate_DF[:, reps].t().to(router.weight.dtype), dim=-1))
    layer = MoELayer(dense.hidden_size, m, E_r, top_k, router=router, activation="swiglu",
                     num_shared_experts=num_shared_experts, **layer_kwargs)
    routed = groups.routed.to(w.device)
    layer.experts.w_gate.copy_(dense.w_gate_DF[:, routed].permute(1, 0, 2))
    layer.experts.w_up.copy_(dense.w_up_DF[:, routed].permute(1, 0, 2))
    layer.experts.w_down.copy_(dense.w_down_FD[routed])
    if layer.shared_experts is not None:
        shared = groups.shared.to(w.device)
        layer.shared_experts.w_gate.copy_(dense.w_gate_DF[:, shared])
        layer.shared_experts.w_up.copy_(dense.w_up_DF[:, shared])
        layer.shared_experts.w_down.copy_(dense.w_down_FD[shared])
    layer.carving = groups
    return layer
