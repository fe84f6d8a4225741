"""An intentionally naive MoE reference: Python loops over tokens, experts and routed pairs.

Nothing here is vectorised over tokens and nothing is shared with `moe_routing`'s dispatch code, so a bug in
the library's sort / permute / grouped matmul / combine / capacity logic cannot also hide here. Everything is
written with plain torch scalar-ish ops on the leaf tensors passed in, so autograd through this loop gives
reference gradients.

Used by `test_layer.py` (and usable by any other test): build leaves with `leaves_from_layer`, run
`reference_moe`, compare outputs and ``torch.autograd.grad`` results with the layer's. Below that, the naive
routing of the other routers (Sinkhorn, expert choice, HyperRouter: test_routers.py and test_router_<name>.py;
the recurrent router: test_router_recurrent.py) and the Beta density (test_losses_betainc.py and
test_losses_dpsl.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
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


def leaf(t: Optional[Tensor]) -> Optional[Tensor]:
    """An independent copy of a parameter for a naive graph."""
    return None if t is None else t.detach().clone().requires_grad_(True)


def leaves_from_layer(layer) -> Leaves:
    ex, sh = layer.experts, layer.shared_experts
    return Leaves(router_weight=leaf(layer.router.weight), w_up=leaf(ex.w_up), w_down=leaf(ex.w_down),
                  w_gate=leaf(ex.w_gate),
                  shared_up=None if sh is None else leaf(sh.w_up),
                  shared_down=None if sh is None else leaf(sh.w_down),
                  shared_gate=None if sh is None else leaf(sh.w_gate))


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


# ---- other routers: Sinkhorn, expert choice, HyperRouter -----------------------------------------------------------
def naive_sinkhorn(logits, valid=None):
    """Megatron-core's iteration in Python floats: d0 scales rows to 1/T, d1 columns to 1/E, until d1 settles."""
    T, n_e = len(logits), len(logits[0])
    rows = [t for t in range(T) if valid is None or valid[t]]
    cost = [[math.exp(v) for v in row] for row in logits]
    d1 = [1.0] * n_e
    for _ in range(10000):
        d0 = [1.0 / (len(rows) * sum(d1[e] * cost[t][e] for e in range(n_e))) for t in range(T)]
        new = [1.0 / (n_e * sum(d0[t] * cost[t][e] for t in rows)) for e in range(n_e)]
        done = max(abs(a - b) / b for a, b in zip(new, d1)) < 1e-14
        d1 = new
        if done:
            break
    return [[d0[t] * cost[t][e] * d1[e] for e in range(n_e)] for t in range(T)]


def token_logits(x, W, b=None):
    """Per-token logit vectors as 0-d tensor stacks (differentiable w.r.t. the leaves)."""
    return [torch.stack([(W[e] * x[t]).sum() + (0 if b is None else b[e]) for e in range(W.shape[0])])
            for t in range(x.shape[0])]


def top(values, k):
    return sorted(range(len(values)), key=lambda e: -values[e])[:k]


def pairs_sinkhorn(x, W, k, valid=None):
    logits = token_logits(x, W)
    plan = naive_sinkhorn([lt.detach().tolist() for lt in logits], valid)
    act = [naive_sigmoid(lt) if k == 1 else naive_softmax(lt) for lt in logits]
    return [(t, e, act[t][e]) for t in range(len(logits)) for e in top(plan[t], k)]


def ec_capacity(cf, num_valid, n_e):
    return min(math.ceil(Fraction(str(cf)) * num_valid / n_e), num_valid)


def pairs_expert_choice(x, W, cf, valid=None):
    """Each expert, one at a time, takes the C valid tokens with the highest softmax score; sorted by token."""
    probs = [naive_softmax(lt) for lt in token_logits(x, W)]
    tokens = [t for t in range(len(probs)) if valid is None or valid[t]]
    cap = ec_capacity(cf, len(tokens), W.shape[0])
    pairs = []
    for e in range(W.shape[0]):
        for t in sorted(tokens, key=lambda t: -float(probs[t][e].detach()))[:cap]:
            pairs.append((t, e, probs[t][e]))
    return sorted(pairs, key=lambda p: (p[0], p[1]))


def naive_hypernet(emb, w1, b1, w2, b2):
    """Linear -> ReLU -> Linear, one unit at a time."""
    h = [torch.relu(sum(w1[j, i] * emb[i] for i in range(emb.shape[0])) + b1[j]) for j in range(w1.shape[0])]
    return torch.stack([sum(w2[o, j] * h[j] for j in range(len(h))) + b2[o] for o in range(w2.shape[0])])


def pairs_hyper(x, emb, frozen, k, n_e):
    out = naive_hypernet(emb, *frozen).view(n_e, -1)
    logits = token_logits(x, out[:, :-1], out[:, -1])
    pairs = []
    for t, lt in enumerate(logits):
        chosen = top(lt.detach().tolist(), k)
        if k == 1:  # Switch gates: the softmax over all E at the chosen expert (one logit's softmax is 1)
            gates = naive_softmax(lt)[chosen]
        else:
            gates = naive_softmax(torch.stack([lt[e] for e in chosen]))
        pairs += [(t, e, gates[j]) for j, e in enumerate(chosen)]
    return pairs


def naive_moe(x, ex, pairs):
    """y_t = sum over t's pairs (e, w) of w * SwiGLU_e(x_t), one pair at a time."""
    rows = [torch.zeros_like(x[0]) for _ in range(x.shape[0])]
    for t, e, w in pairs:
        rows[t] = rows[t] + w * naive_ffn(x[t], ex[0][e], ex[1][e], ex[2][e], "swiglu")
    return torch.stack(rows)


def assert_output_and_grads_close(y, y_ref, inputs, ref_inputs, rtol=1e-9, atol=1e-11):
    """``y`` equals the naive ``y_ref`` (float64: rtol 1e-10) and so do the gradients of one random output
    gradient with respect to ``inputs`` and their reference leaves ``ref_inputs``, in order."""
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, list(inputs), dy)
    grads_ref = torch.autograd.grad(y_ref, list(ref_inputs), dy)
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g, r, rtol=rtol, atol=atol)


# ---- the recurrent router: torch.nn.GRUCell's equations written out ------------------------------------------------
def naive_gru_token(x_P, h_P, w_ih, w_hh, b_ih, b_hh):
    """torch.nn.GRUCell's equations for one token, gate by gate (rows of w_ih / w_hh are r, z, n)."""
    P = h_P.shape[0]
    rows = {"r": slice(0, P), "z": slice(P, 2 * P), "n": slice(2 * P, 3 * P)}
    out = []
    for j in range(P):
        def pre(g, src, w, b):
            row = rows[g].start + j
            return sum(w[row, c] * src[c] for c in range(src.shape[0])) + b[row]
        r = naive_sigmoid(pre("r", x_P, w_ih, b_ih) + pre("r", h_P, w_hh, b_hh))
        z = naive_sigmoid(pre("z", x_P, w_ih, b_ih) + pre("z", h_P, w_hh, b_hh))
        n = torch.tanh(pre("n", x_P, w_ih, b_ih) + r * pre("n", h_P, w_hh, b_hh))
        out.append((1 - z) * n + z * h_P[j])
    return torch.stack(out)


def naive_recurrent_route(xs, params, k):
    """Per layer and per token: logits [T, E], chosen experts (descending logit) and their gates."""
    w_ih, w_hh, b_ih, b_hh = params["gru"]
    T, P = xs[0].shape[0], w_hh.shape[1]
    h = [torch.zeros(P, dtype=torch.float64) for _ in range(T)]
    out = []
    for i, x_TD in enumerate(xs):
        w1, w2 = params["w1"][i], params["w2"][i]
        logits, experts, gates = [], [], []
        for t in range(T):
            xp = torch.stack([(w1[p] * x_TD[t]).sum() for p in range(P)])
            h[t] = naive_gru_token(xp, h[t], w_ih, w_hh, b_ih, b_hh)
            lg = torch.stack([(w2[e] * h[t]).sum() for e in range(w2.shape[0])])
            chosen = sorted(range(lg.shape[0]), key=lambda e: -float(lg[e].detach()))[:k]
            logits.append(lg)
            experts.append(chosen)
            gates.append(naive_softmax(torch.stack([lg[e] for e in chosen])))
        out.append((torch.stack(logits), experts, torch.stack(gates)))
    return out


def recurrent_leaves(group):
    g = group.gru
    return {"gru": [p.detach().clone().requires_grad_() for p in (g.weight_ih, g.weight_hh, g.bias_ih, g.bias_hh)],
            "w1": [r.w1.detach().clone().requires_grad_() for r in group.routers],
            "w2": [r.w2.detach().clone().requires_grad_() for r in group.routers]}


def recurrent_leaf_list(p):
    return [*p["gru"], *p["w1"], *p["w2"]]


def recurrent_params(group):
    g = group.gru
    return [g.weight_ih, g.weight_hh, g.bias_ih, g.bias_hh, *[r.w1 for r in group.routers],
            *[r.w2 for r in group.routers]]


def naive_recurrent_stack(x_TD, model, k):
    """The toy stack token by token: naive routing per layer, naive experts, residual."""
    p = recurrent_leaves(model.group)
    h = x_TD
    hidden = [torch.zeros(p["w2"][0].shape[1], dtype=x_TD.dtype) for _ in range(x_TD.shape[0])]
    w_ih, w_hh, b_ih, b_hh = p["gru"]
    for i, layer in enumerate(model.layers):
        ex = layer.experts
        rows = []
        for t in range(h.shape[0]):
            xp = torch.stack([(p["w1"][i][j] * h[t]).sum() for j in range(len(hidden[t]))])
            hidden[t] = naive_gru_token(xp, hidden[t], w_ih, w_hh, b_ih, b_hh)
            lg = torch.stack([(p["w2"][i][e] * hidden[t]).sum() for e in range(p["w2"][i].shape[0])])
            chosen = sorted(range(lg.shape[0]), key=lambda e: -float(lg[e].detach()))[:k]
            gates = naive_softmax(torch.stack([lg[e] for e in chosen]))
            acc = sum(gates[j] * naive_ffn(h[t], ex.w_gate[e], ex.w_up[e], ex.w_down[e], "swiglu")
                      for j, e in enumerate(chosen))
            rows.append(h[t] + acc)
        h = torch.stack(rows)
    return h, p


# ---- the Beta density ----------------------------------------------------------------------------------------------
def naive_pdf(x: float, a: float, b: float) -> float:
    return math.exp((a - 1) * math.log(x) + (b - 1) * math.log1p(-x) + math.lgamma(a + b) - math.lgamma(a)
                    - math.lgamma(b))
