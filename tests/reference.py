"""An intentionally naive MoE reference: Python loops over tokens, experts and routed pairs.

Nothing here is vectorised over tokens and nothing is shared with `moe_routing`'s dispatch code, so a bug in
the library's sort / permute / grouped matmul / combine / capacity logic cannot also hide here. Everything is
written with plain torch scalar-ish ops on the leaf tensors passed in, so autograd through this loop gives
reference gradients.

Used by `test_layer_reference.py` (and usable by any other test): build leaves with `leaves_from_layer`, run
`reference_moe`, compare outputs and ``torch.autograd.grad`` results with the layer's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor


# ----------------------------------------------------------------------------------------------- activations
def naive_silu(v: Tensor) -> Tensor:
    return v * (1.0 / (1.0 + torch.exp(-v)))


def naive_gelu(v: Tensor) -> Tensor:
    """Exact (erf) GELU, as ``torch.nn.functional.gelu`` defaults to."""
    return 0.5 * v * (1.0 + torch.erf(v / math.sqrt(2.0)))


def naive_relu(v: Tensor) -> Tensor:
    return torch.where(v > 0, v, torch.zeros_like(v))


def naive_softmax(v: Tensor) -> Tensor:
    e = torch.exp(v - v.max().detach())
    return e / e.sum()


def naive_sigmoid(v: Tensor) -> Tensor:
    return 1.0 / (1.0 + torch.exp(-v))


def naive_ffn(x_D: Tensor, w_gate: Optional[Tensor], w_up: Tensor, w_down: Tensor, activation: str) -> Tensor:
    """One expert on one token: ``(silu(x @ w_gate) * (x @ w_up)) @ w_down`` or ``act(x @ w_up) @ w_down``."""
    up = x_D @ w_up
    if activation == "swiglu":
        h = naive_silu(x_D @ w_gate) * up
    elif activation == "gelu":
        h = naive_gelu(up)
    elif activation == "relu":
        h = naive_relu(up)
    else:
        raise ValueError(activation)
    return h @ w_down


# ------------------------------------------------------------------------------------------------- leaves
@dataclass
class Leaves:
    """Independent leaf copies of a layer's weights (``requires_grad=True``), in the layer's dtype."""

    router_weight: Tensor                       # [E, D]
    w_up: Tensor                                # [E, D, F]
    w_down: Tensor                              # [E, F, D]
    w_gate: Optional[Tensor] = None             # [E, D, F] (swiglu)
    shared_up: Optional[Tensor] = None          # [D, Fs]
    shared_down: Optional[Tensor] = None        # [Fs, D]
    shared_gate: Optional[Tensor] = None        # [D, Fs] (swiglu)

    def named(self) -> dict[str, Tensor]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def _leaf(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.detach().clone().requires_grad_(True)


def leaves_from_layer(layer) -> Leaves:
    ex, sh = layer.experts, layer.shared_experts
    return Leaves(router_weight=_leaf(layer.router.weight), w_up=_leaf(ex.w_up), w_down=_leaf(ex.w_down),
                  w_gate=_leaf(ex.w_gate),
                  shared_up=None if sh is None else _leaf(sh.w_up),
                  shared_down=None if sh is None else _leaf(sh.w_down),
                  shared_gate=None if sh is None else _leaf(sh.w_gate))


def layer_params(layer) -> dict[str, Tensor]:
    """The layer's parameters under the same names as `Leaves.named`."""
    ex, sh = layer.experts, layer.shared_experts
    out = {"router_weight": layer.router.weight, "w_up": ex.w_up, "w_down": ex.w_down, "w_gate": ex.w_gate}
    if sh is not None:
        out.update(shared_up=sh.w_up, shared_down=sh.w_down, shared_gate=sh.w_gate)
    return {k: v for k, v in out.items() if v is not None}


# ------------------------------------------------------------------------------------------------ routing
@dataclass
class RefResult:
    y: Tensor                                   # [T, D]
    pairs: list = field(default_factory=list)   # (token, expert, weight tensor) in token order, before drops
    kept: list = field(default_factory=list)    # bool per pair
    counts: list = field(default_factory=list)  # pairs each expert processed (after drops)
    dropped: int = 0
    aux: Optional[Tensor] = None                # switch aux loss (coeff included) when requested


def naive_route_token(logits_E: Tensor, top_k: int, score_func: str = "softmax",
                      softmax_before_topk: Optional[bool] = None, normalize: Optional[bool] = None):
    """One token's choice: (list of expert ids, list of gate weights as 0-d tensors), per TopKRouter's docs
    (defaults: Switch gates and no renormalisation at k=1, Mixtral gates / sigmoid renormalised otherwise)."""
    if normalize is None:
        normalize = score_func == "sigmoid" and top_k > 1
    if softmax_before_topk is None:
        softmax_before_topk = top_k == 1
    scores = naive_softmax(logits_E) if score_func == "softmax" else naive_sigmoid(logits_E)
    experts = torch.topk(scores.detach(), top_k).indices.tolist()
    if score_func == "softmax" and not softmax_before_topk:
        sel = torch.stack([logits_E[e] for e in experts])
        gates = naive_softmax(sel)
    else:
        gates = torch.stack([scores[e] for e in experts])
        if normalize:
            gates = gates / gates.sum()
    return experts, [gates[j] for j in range(top_k)], scores


def reference_moe(x_TD: Tensor, p: Leaves, top_k: int, activation: str, *, score_func: str = "softmax",
                  softmax_before_topk: Optional[bool] = None, normalize: Optional[bool] = None,
                  capacity_factor: Optional[float] = None, drop_policy: str = "weight",
                  switch_aux_coeff: float = 0.0) -> RefResult:
    """y_t = sum over t's kept pairs (e, w) of w * expert_e(x_t) (+ shared experts), by Python loops."""
    T, D = x_TD.shape
    E = p.router_weight.shape[0]

    # 1. route each token on its own
    pairs = []          # (t, e, w) in token order
    probs = []          # per-token score vectors (for the aux loss)
    for t in range(T):
        logits = torch.stack([(p.router_weight[e] * x_TD[t]).sum() for e in range(E)])
        experts, gates, scores = naive_route_token(logits, top_k, score_func, softmax_before_topk, normalize)
        probs.append(scores)
        for e, w in zip(experts, gates):
            pairs.append((t, e, w))

    # 2. capacity: per expert, keep `cap` pairs by weight (ties: token order) or by position
    kept = [True] * len(pairs)
    if capacity_factor is not None:
        cap = math.ceil(capacity_factor * T * top_k / E)
        for e in range(E):
            mine = [i for i, (_, pe, _) in enumerate(pairs) if pe == e]
            if drop_policy == "weight":
                mine = sorted(mine, key=lambda i: (-float(pairs[i][2].detach()), i))
            elif drop_policy != "position":
                raise ValueError(drop_policy)
            for i in mine[cap:]:
                kept[i] = False

    # 3. experts, one (token, expert) pair at a time
    rows = []
    for t in range(T):
        acc = torch.zeros(D, dtype=x_TD.dtype)
        for i, (pt, e, w) in enumerate(pairs):
            if pt != t or not kept[i]:
                continue
            gate = None if p.w_gate is None else p.w_gate[e]
            acc = acc + w.to(x_TD.dtype) * naive_ffn(x_TD[t], gate, p.w_up[e], p.w_down[e], activation)
        if p.shared_up is not None:
            acc = acc + naive_ffn(x_TD[t], p.shared_gate, p.shared_up, p.shared_down, activation)
        rows.append(acc)
    y = torch.stack(rows) if rows else x_TD.new_zeros(0, D)

    counts = [sum(1 for i, (_, e, _) in enumerate(pairs) if e == ex and kept[i]) for ex in range(E)]
    result = RefResult(y=y, pairs=pairs, kept=kept, counts=counts, dropped=kept.count(False))

    # 4. switch aux (on the pre-drop choices): coeff * E * sum_i f_i * P_i
    if switch_aux_coeff:
        total = x_TD.new_zeros(())
        for e in range(E):
            f_e = sum(1 for (_, pe, _) in pairs if pe == e) / (T * top_k)
            P_e = sum(probs[t][e] for t in range(T)) / T
            total = total + f_e * P_e
        result.aux = switch_aux_coeff * E * total
    return result
