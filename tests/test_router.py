"""TopKRouter selection and gate weights against a naive per-token computation; aux-loss-free bias balancing and
its statistics (micro-batch accumulation, eval / no_grad, activation checkpointing); forced experts; dtype rules.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import moe_routing as mr
from moe_routing import MoELayer, RoutingContext, TopKRouter, routing_context

D, E = 10, 8


def make_router(seed=0, dtype=torch.float64, **kw) -> TopKRouter:
    torch.manual_seed(seed)
    r = TopKRouter(D, E, kw.pop("top_k", 2), **kw)
    with torch.no_grad():
        r.weight.normal_(0, 0.6)
    return r.to(dtype)


def randx(T=24, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, D, generator=g, dtype=dtype)


# --------------------------------------------------------------------------------------------------------------
# Naive per-token reference
# --------------------------------------------------------------------------------------------------------------

def naive_route(x, W, k, score_func="softmax", softmax_before_topk=False, normalize=None, bias=None,
                num_groups=None, topk_groups=None, scaling=1.0, forced=None):
    """For each token: {expert: gate weight}, computed with Python floats."""
    if normalize is None:
        normalize = score_func == "sigmoid"
    x, W = x.double().tolist(), W.double().tolist()
    E_ = len(W)
    out = []
    for t, row in enumerate(x):
        logits = [sum(a * b for a, b in zip(row, w)) for w in W]
        if score_func == "softmax":
            m = max(logits)
            ex = [math.exp(v - m) for v in logits]
            scores = [v / sum(ex) for v in ex]
        else:
            scores = [1 / (1 + math.exp(-v)) for v in logits]
        sel = [s + (0.0 if bias is None else bias[i]) for i, s in enumerate(scores)]
        candidates = list(range(E_))
        if num_groups is not None:
            size = E_ // num_groups
            gscore = []
            for g in range(num_groups):
                members = sorted((sel[e] for e in range(g * size, (g + 1) * size)), reverse=True)
                gscore.append(sum(members[:2]))
            keep = sorted(range(num_groups), key=lambda g: -gscore[g])[:topk_groups]
            candidates = [e for e in range(E_) if e // size in keep]
        chosen = sorted(candidates, key=lambda e: -sel[e])[:k] if forced is None else forced[t].tolist()
        if score_func == "softmax" and not softmax_before_topk:
            m = max(logits[e] for e in chosen)
            ex = {e: math.exp(logits[e] - m) for e in chosen}
            gates = {e: v / sum(ex.values()) for e, v in ex.items()}
        else:
            gates = {e: scores[e] for e in chosen}
            if normalize:
                s = sum(gates.values())
                gates = {e: v / s for e, v in gates.items()}
        out.append({e: v * scaling for e, v in gates.items()})
    return out


def as_dicts(decision):
    e = decision.experts_TK.tolist()
    w = decision.weights_TK.detach().double().tolist()
    return [dict(zip(er, wr)) for er, wr in zip(e, w)]


def assert_same_routing(decision, expected, atol=1e-12):
    got = as_dicts(decision)
    assert len(got) == len(expected)
    for t, (g, x) in enumerate(zip(got, expected)):
        assert sorted(g) == sorted(x), f"token {t}: experts {sorted(g)} != {sorted(x)}"
        exp = torch.tensor([x[e] for e in sorted(x)], dtype=torch.float64)
        act = torch.tensor([g[e] for e in sorted(x)], dtype=torch.float64)
        torch.testing.assert_close(act, exp, rtol=1e-10, atol=atol, msg=f"token {t}")


# --------------------------------------------------------------------------------------------------------------
# Scores and gate weights
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("top_k", [2, 3])  # k=1 defaults to Switch gates (test_router_base.py)
def test_softmax_topk_then_softmax(top_k):
    r = make_router(top_k=top_k)
    x = randx()
    d = r(x)
    assert_same_routing(d, naive_route(x, r.weight.detach(), top_k))
    torch.testing.assert_close(d.weights_TK.sum(-1), torch.ones(x.shape[0], dtype=torch.float64),
                               rtol=0, atol=1e-12)
    # the dense tensors losses and metrics read
    torch.testing.assert_close(d.logits_TE, x @ r.weight.detach().t(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(d.scores_TE, d.logits_TE.softmax(-1), rtol=1e-12, atol=1e-14)
    assert d.token_N.tolist() == [t for t in range(x.shape[0]) for _ in range(top_k)]


@pytest.mark.parametrize("normalize", [False, True])
def test_softmax_then_topk(normalize):
    r = make_router(softmax_before_topk=True, normalize=normalize)
    x = randx()
    d = r(x)
    expected = naive_route(x, r.weight.detach(), 2, softmax_before_topk=True, normalize=normalize)
    assert_same_routing(d, expected)
    sums = d.weights_TK.sum(-1)
    if normalize:
        torch.testing.assert_close(sums, torch.ones_like(sums), rtol=0, atol=1e-12)
    else:  # un-normalised top-2 of 8 probabilities sum to less than one
        assert bool((sums < 1 - 1e-3).all())


def test_softmax_then_topk_default_is_unnormalised():
    assert TopKRouter(D, E, 2, softmax_before_topk=True).normalize is False
    assert TopKRouter(D, E, 2, score_func="sigmoid").normalize is True


@pytest.mark.parametrize("normalize", [None, False])
def test_sigmoid_gates(normalize):
    r = make_router(score_func="sigmoid", normalize=normalize)
    x = randx()
    d = r(x)
    assert_same_routing(d, naive_route(x, r.weight.detach(), 2, "sigmoid", normalize=normalize))
    torch.testing.assert_close(d.scores_TE, d.logits_TE.sigmoid(), rtol=1e-12, atol=1e-14)
    assert d.scores_normalized is False


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_scaling_factor(score_func):
    r = make_router(score_func=score_func, scaling_factor=2.5)
    x = randx()
    d = r(x)
    assert_same_routing(d, naive_route(x, r.weight.detach(), 2, score_func, scaling=2.5))
    if score_func == "softmax":
        torch.testing.assert_close(d.weights_TK.sum(-1), torch.full((x.shape[0],), 2.5, dtype=torch.float64),
                                   rtol=0, atol=1e-12)


@pytest.mark.parametrize("score_func,num_groups,topk_groups,top_k", [
    ("sigmoid", 4, 2, 2), ("softmax", 4, 1, 2), ("sigmoid", 2, 1, 3), ("softmax", 4, 3, 4)])
def test_group_limited_routing(score_func, num_groups, topk_groups, top_k):
    r = make_router(score_func=score_func, num_groups=num_groups, topk_groups=topk_groups, top_k=top_k)
    x = randx(T=64)
    d = r(x)
    W = r.weight.detach()
    assert_same_routing(d, naive_route(x, W, top_k, score_func, num_groups=num_groups, topk_groups=topk_groups))
    # group limiting changes some choices compared with plain top-k, and every choice lies in <= topk_groups groups
    plain = naive_route(x, W, top_k, score_func)
    assert sum(sorted(p) != sorted(g) for p, g in zip(plain, as_dicts(d))) > 0
    size = E // num_groups
    for row in d.experts_TK.tolist():
        assert len({e // size for e in row}) <= topk_groups


def test_group_score_is_sum_of_top2_not_max():
    # Group 0 holds one strong expert (0.9) and weak ones; group 1 two good ones (0.8, 0.8): by max, group 0
    # wins; by the sum of the top-2, group 1 wins. With topk_groups=1 the chosen experts tell which rule ran.
    r = TopKRouter(4, 4, 1, score_func="sigmoid", num_groups=2, topk_groups=1).double()
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    with torch.no_grad():
        r.weight.copy_(torch.eye(4, dtype=torch.float64))
    x = torch.tensor([[logit(0.9), logit(0.1), logit(0.8), logit(0.8)]], dtype=torch.float64)
    d = r(x)
    assert d.experts_TK.tolist()[0][0] in (2, 3)
    assert_same_routing(d, naive_route(x, r.weight.detach(), 1, "sigmoid", normalize=False, num_groups=2,
                                       topk_groups=1))


def test_router_gradients_flow_through_gate_weights():
    r = make_router(dtype=torch.float64)
    x = randx()
    d = r(x)
    (d.weight_N * torch.arange(d.weight_N.numel(), dtype=torch.float64)).sum().backward()
    assert r.weight.grad is not None and r.weight.grad.abs().max() > 1e-3


# --------------------------------------------------------------------------------------------------------------
# Aux-loss-free bias
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_bias_is_used_for_selection_only(score_func):
    r = make_router(score_func=score_func, bias_update_rate=1e-3)
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 5.0, 0.0, 0.3], dtype=torch.float64)
    r.expert_bias.copy_(bias)
    x = randx()
    d = r(x)
    assert bool((d.experts_TK == 5).any(-1).all())  # a +5 bias wins every token's selection
    assert_same_routing(d, naive_route(x, r.weight.detach(), 2, score_func, bias=bias.tolist()))
    # the gate weights equal those of an unbiased router forced onto the same experts
    plain = make_router(score_func=score_func)
    forced = plain(x, RoutingContext(forced_experts={"k": d.experts_TK}), "k")
    torch.testing.assert_close(d.weights_TK, forced.weights_TK, rtol=0, atol=0)
    # scores and logits carry no bias either
    torch.testing.assert_close(d.logits_TE, forced.logits_TE, rtol=0, atol=0)


def _moe(bias_rate=1e-2, score_func="sigmoid", seed=0, T_dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    layer = MoELayer(D, 4, E, 2, router_kwargs={"score_func": score_func, "bias_update_rate": bias_rate},
                     losses=[], **kw)
    with torch.no_grad():
        layer.router.weight.normal_(0, 0.6)
    return layer


def _choices(layer, x):
    with torch.no_grad():
        return layer.router(x.reshape(-1, D).to(layer.router.weight.dtype)).experts_TK


def test_bias_update_accumulates_over_micro_batches_then_steps():
    rate = 0.01
    model = nn.Sequential(_moe(rate))
    layer = model[0]
    xs = [torch.randn(16, D) + layer.router.weight[0].detach() for _ in range(3)]
    expected_load = torch.zeros(E, dtype=torch.long)
    for x in xs:
        expected_load += torch.bincount(_choices(layer, x).reshape(-1), minlength=E)
        layer(x)
    torch.testing.assert_close(layer.router.load_accum, expected_load, rtol=0, atol=0)
    assert layer.router.expert_bias.abs().max() == 0  # nothing changes before step()
    mr.step(model)
    mean = expected_load.double().mean()
    expected_bias = rate * torch.sign(mean - expected_load.double())
    torch.testing.assert_close(layer.router.expert_bias.double(), expected_bias, rtol=0, atol=1e-9)
    assert layer.router.load_accum.abs().max() == 0  # accumulator reset
    # a second step with no new statistics changes nothing
    mr.step(model)
    torch.testing.assert_close(layer.router.expert_bias.double(), expected_bias, rtol=0, atol=1e-9)
    # the next update adds to the current bias
    x = xs[0]
    load = torch.bincount(_choices(layer, x).reshape(-1), minlength=E).double()
    layer(x)
    mr.step(model)
    torch.testing.assert_close(layer.router.expert_bias.double(),
                               expected_bias + rate * torch.sign(load.mean() - load), rtol=0, atol=1e-9)


def test_bias_balancing_reduces_max_violation_on_skewed_input():
    layer = _moe(1e-2)
    with torch.no_grad():
        layer.router.weight.normal_(0, 0.3)
    shift = 1.5 * layer.router.weight[:2].sum(0).detach()  # every token leans towards experts 0 and 1
    g = torch.Generator().manual_seed(4)
    x_eval = torch.randn(1024, D, generator=g) * 0.5 + shift

    def max_vio():
        load = torch.bincount(_choices(layer, x_eval).reshape(-1), minlength=E).double()
        return ((load.max() - load.mean()) / load.mean()).item()

    before = max_vio()
    assert before > 2.0
    load0 = torch.bincount(_choices(layer, x_eval).reshape(-1), minlength=E)
    history = []
    for _ in range(50):
        layer(torch.randn(256, D, generator=g) * 0.5 + shift)
        mr.step(layer)
        history.append(max_vio())
    # sign updates of a fixed size oscillate around balance: judge the last 10 steps
    settled = sum(history[-10:]) / 10
    assert settled < 0.35, (before, history)
    assert max(history[-10:]) < 0.6, history
    assert settled < before / 6
    # the initially busiest expert was pushed down, the idlest up
    bias = layer.router.expert_bias
    assert bias[load0.argmax()] < 0 < bias[load0.argmin()]
    after = history[-1]
    # the layer's own metric agrees on the held-out batch (eval: no statistics accumulate)
    layer.eval()
    layer(x_eval)
    assert layer.router.load_accum.abs().max() == 0
    torch.testing.assert_close(torch.tensor(mr.routing_report(layer)["<root>"]["max_vio"], dtype=torch.float64),
                               torch.tensor(after, dtype=torch.float64), rtol=1e-9, atol=1e-12)


def test_stats_skip_eval_and_no_grad():
    layer = _moe()
    x = torch.randn(12, D)
    layer.eval()
    layer(x)
    assert layer.router.load_accum.sum() == 0
    layer.train()
    with torch.no_grad():
        layer(x)
    assert layer.router.load_accum.sum() == 0
    with torch.inference_mode():
        layer(x)
    assert layer.router.load_accum.sum() == 0
    layer(x)
    assert layer.router.load_accum.sum() == 12 * 2
    mr.step(layer)
    assert layer.router.expert_bias.abs().sum() > 0


def test_stats_exclude_padding():
    layer = _moe()
    x = torch.randn(3, 4, D)
    pad = torch.zeros(3, 4, dtype=torch.bool)
    pad[0, 2:] = True
    layer(x, RoutingContext(padding_mask=pad))
    expected = torch.bincount(_choices(layer, x).reshape(-1, 2)[~pad.reshape(-1)].reshape(-1), minlength=E)
    torch.testing.assert_close(layer.router.load_accum, expected, rtol=0, atol=0)
    assert layer.router.load_accum.sum() == 10 * 2


def test_non_reentrant_checkpoint_does_not_double_count():
    layer = _moe()
    calls = []
    layer.router.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(20, D, requires_grad=True)
    y = checkpoint(layer, x, use_reentrant=False)
    (y ** 2).sum().backward()
    assert len(calls) == 2  # the layer really was recomputed in backward
    expected = torch.bincount(_choices(layer, x.detach()).reshape(-1), minlength=E)
    torch.testing.assert_close(layer.router.load_accum, expected, rtol=0, atol=0)
    assert layer.router.load_accum.sum() == 20 * 2
    assert x.grad is not None and layer.router.weight.grad.abs().max() > 0


# --------------------------------------------------------------------------------------------------------------
# Forced experts (routing replay)
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", [dict(), dict(softmax_before_topk=True), dict(score_func="sigmoid")])
def test_forced_experts_in_router(mode):
    r = make_router(**mode)
    x = randx(T=16)
    natural = r(x).experts_TK
    # force the two lowest-scoring experts: certainly not the router's own choice
    forced = (x @ r.weight.detach().t()).topk(2, dim=-1, largest=False).indices
    assert not bool((forced.sort(-1).values == natural.sort(-1).values).all(-1).any())
    d = r(x, RoutingContext(forced_experts={7: forced}), 7)
    assert torch.equal(d.experts_TK, forced)
    score_func = mode.get("score_func", "softmax")
    assert_same_routing(d, naive_route(x, r.weight.detach(), 2, score_func,
                                       softmax_before_topk=mode.get("softmax_before_topk", False), forced=forced))
    if mode.get("softmax_before_topk"):  # weights straight from the full softmax
        torch.testing.assert_close(d.weights_TK, d.scores_TE.gather(1, forced), rtol=0, atol=0)
    (d.weight_N * torch.linspace(-1, 1, d.weight_N.numel(), dtype=torch.float64)).sum().backward()
    assert r.weight.grad.abs().max() > 1e-4
    # another key: not forced
    assert torch.equal(r(x, RoutingContext(forced_experts={7: forced}), 3).experts_TK, natural)


def test_forced_experts_through_routing_context():
    torch.manual_seed(0)
    model = nn.Sequential(MoELayer(D, 4, E, 2, losses=[]), MoELayer(D, 4, E, 2, losses=[]))
    x = torch.randn(6, D)
    forced0 = torch.tensor([[7, 6]] * 6)
    with routing_context(model, forced_experts={0: forced0}) as ctx:
        assert [m.layer_idx for m in model] == [0, 1]
        assert model[0]._ctx is ctx
        y = model(x)
    assert model[0]._ctx is None and model[1]._ctx is None
    stats0 = mr.routing_report(model)["0"]["tokens_per_expert"]
    assert stats0 == [0, 0, 0, 0, 0, 0, 6, 6]
    # layer 1 was not forced: its loads are its router's natural choice
    h = model[0](x)
    natural1 = torch.bincount(_choices(model[1], h).reshape(-1), minlength=E).tolist()
    model(x)  # refresh stats without context
    assert mr.routing_report(model)["1"]["tokens_per_expert"] == natural1
    y.sum().backward()
    assert model[0].router.weight.grad.abs().max() > 0
    # only rows of forced experts get a gradient through the gate weights of top-k-then-softmax
    assert model[0].router.weight.grad[:6].abs().max() == 0
    # the forced output equals an explicit computation with those experts and their softmax weights
    layer = model[0]
    logits = x @ layer.router.weight.detach().t()
    w = logits[:, [7, 6]].softmax(-1)
    ex = layer.experts
    def expert(e, v):
        return (torch.nn.functional.silu(v @ ex.w_gate[e]) * (v @ ex.w_up[e])) @ ex.w_down[e]
    expected = w[:, :1] * expert(7, x) + w[:, 1:] * expert(6, x)
    with routing_context(model, forced_experts={0: forced0}):
        got = model[0](x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------
# dtype rules
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cast", ["to_bf16", "half"])
def test_router_state_stays_float32_when_model_is_cast_down(cast):
    model = nn.Sequential(_moe(1e-3))
    r = model[0].router
    with torch.no_grad():
        r.expert_bias.copy_(torch.linspace(-0.5013, 0.7007, E))
        r.load_accum.fill_(3)
    before = {n: t.clone() for n, t in list(r.named_parameters()) + list(r.named_buffers())}
    model = model.to(torch.bfloat16) if cast == "to_bf16" else model.half()
    low = torch.bfloat16 if cast == "to_bf16" else torch.float16
    assert model[0].experts.w_up.dtype == low
    for name, t in list(r.named_parameters()) + list(r.named_buffers()):
        assert t.dtype == (torch.int64 if name == "load_accum" else torch.float32), name
        torch.testing.assert_close(t, before[name], rtol=0, atol=0, msg=name)  # values not rounded
    # the cast model runs on low-precision input and the router still computes in float32
    x = torch.randn(8, D, dtype=low)
    y = model(x)
    assert y.dtype == low
    with torch.no_grad():
        assert r(x).logits_TE.dtype == torch.float32


def test_router_follows_cast_to_float64():
    model = nn.Sequential(_moe(1e-3))
    model.double()
    r = model[0].router
    assert r.weight.dtype == torch.float64
    assert r.expert_bias.dtype == torch.float64 and r.load_accum.dtype == torch.int64
    assert r.math_dtype == torch.float64
    assert model[0].experts.w_down.dtype == torch.float64
    x = torch.randn(5, D, dtype=torch.float64)
    assert r(x).logits_TE.dtype == torch.float64 and model(x).dtype == torch.float64
    # built as float64 directly: the same
    layer = MoELayer(D, 4, E, 2, dtype=torch.float64)
    assert layer.router.weight.dtype == torch.float64
    # built as bf16 directly: router float32
    layer = MoELayer(D, 4, E, 2, dtype=torch.bfloat16, router_kwargs={"bias_update_rate": 1e-3})
    assert layer.router.weight.dtype == torch.float32 and layer.router.expert_bias.dtype == torch.float32


def test_small_bias_update_registers_in_bf16_cast_model():
    rate = 1e-3
    model = nn.Sequential(_moe(rate)).to(torch.bfloat16)
    r = model[0].router
    r.expert_bias.fill_(0.5)
    x = (torch.randn(32, D) + r.weight[0].detach()).to(torch.bfloat16)
    load = torch.bincount(_choices(model[0], x).reshape(-1), minlength=E).double()
    model(x)
    mr.step(model)
    expected = 0.5 + rate * torch.sign(load.mean() - load)
    torch.testing.assert_close(r.expert_bias.double(), expected, rtol=0, atol=1e-7)
    assert (r.expert_bias != 0.5).sum() == (load != load.mean()).sum() > 0
    # in bf16 the same update would vanish: 0.5 + 1e-3 rounds back to 0.5
    assert torch.tensor(0.5, dtype=torch.bfloat16) + torch.tensor(1e-3, dtype=torch.bfloat16) == 0.5


def test_step_updates_each_layer_from_its_own_loads_and_checkpointed_micro_batches():
    # two layers, two checkpointed micro-batches: each router's bias moves by its own summed loads
    rate = 0.02
    model = nn.Sequential(_moe(rate, seed=0), _moe(rate, seed=1))
    xs = [torch.randn(10, D) + model[0].router.weight[2].detach() for _ in range(2)]
    loads = [torch.zeros(E, dtype=torch.float64), torch.zeros(E, dtype=torch.float64)]
    for x in xs:
        h = model[0](x).detach()  # the second layer's input, computed without touching statistics
        loads[0] += torch.bincount(_choices(model[0], x).reshape(-1), minlength=E).double()
        loads[1] += torch.bincount(_choices(model[1], h).reshape(-1), minlength=E).double()
    for m in model:
        m.router.load_accum.zero_()
    for x in xs:
        y = checkpoint(model, x.requires_grad_(), use_reentrant=False)
        y.square().sum().backward()
    for i in range(2):
        torch.testing.assert_close(model[i].router.load_accum.double(), loads[i], rtol=0, atol=0)
    mr.step(model)
    for i in range(2):
        expected = rate * torch.sign(loads[i].mean() - loads[i])
        torch.testing.assert_close(model[i].router.expert_bias.double(), expected, rtol=0, atol=1e-9)
    assert not torch.equal(model[0].router.expert_bias, model[1].router.expert_bias)


def test_jitter_only_in_training():
    plain = make_router(seed=3)
    jit = make_router(seed=3, jitter_eps=0.3)
    x = randx(T=64)
    jit.eval()
    d_eval = jit(x)
    torch.testing.assert_close(d_eval.logits_TE, plain(x).logits_TE, rtol=0, atol=0)
    jit.train()
    torch.manual_seed(5)
    d_train = jit(x)
    assert (d_train.logits_TE - d_eval.logits_TE).abs().max() > 1e-3
    # multiplicative noise within [1 - eps, 1 + eps]: logits move by at most eps * sum_j |x_j w_ej|
    bound = 0.3 * (x.abs() @ jit.weight.detach().abs().t())
    assert bool(((d_train.logits_TE - d_eval.logits_TE).abs() <= bound + 1e-12).all())


# --------------------------------------------------------------------------------------------------------------
# Group score rules (DeepSeek-V3 / Megatron-Core / DeepSeek-V2) and what balance losses count
# --------------------------------------------------------------------------------------------------------------

def naive_group_experts(row, k, num_groups, topk_groups, best):
    """One token: score each group by the sum of its `best` largest entries, keep the `topk_groups` best groups,
    then the k largest entries inside them (Python lists; inputs are continuous, so no ties)."""
    size = len(row) // num_groups
    groups = [row[g * size:(g + 1) * size] for g in range(num_groups)]
    group_score = [sum(sorted(vals, reverse=True)[:best]) for vals in groups]
    keep = sorted(range(num_groups), key=lambda g: -group_score[g])[:topk_groups]
    allowed = [e for g in keep for e in range(g * size, (g + 1) * size)]
    return sorted(sorted(allowed, key=lambda e: -row[e])[:k])


def megatron_group_limited_topk(scores, topk, num_groups, group_topk):
    """Transcribed from megatron-core 0.16 `transformer/moe/moe_utils.py::group_limited_topk`: groups by the sum of
    their top-(topk // group_topk) scores, then top-k of the masked scores."""
    T, E = scores.shape
    group_scores = scores.view(T, num_groups, -1).topk(topk // group_topk, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=group_topk, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(T, num_groups, E // num_groups).reshape(T, -1)
    masked = scores.masked_fill(~score_mask.bool(), float("-inf"))
    return torch.topk(masked, k=topk, dim=-1)[1]


@pytest.mark.parametrize("rule,best", [("top2_sum", 2), ("topk_sum", 3), ("max", 1)])
@pytest.mark.parametrize("on_logits", [False, True])
def test_group_score_rules_match_a_naive_loop(rule, best, on_logits):
    r = make_router(top_k=3, num_groups=2, topk_groups=1, group_score=rule, groups_on_logits=on_logits,
                    score_func="sigmoid")
    x = randx(T=200)  # 15-48 of these tokens route differently under each pair of rules
    d = r(x)
    logits = x @ r.weight.detach().t()
    rank = logits if on_logits else logits.sigmoid()
    for t in range(x.shape[0]):
        assert sorted(d.experts_TK[t].tolist()) == naive_group_experts(rank[t].tolist(), 3, 2, 1, best), t


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_megatron_group_limited_routing_settings_match_megatron(score_func):
    """Megatron ranks groups on what it selects on: logits for the softmax router without pre-softmax, sigmoid
    scores for the sigmoid router; with group_score='topk_sum' (and groups_on_logits for softmax) ours agrees."""
    r = make_router(top_k=4, num_groups=4, topk_groups=2, score_func=score_func, group_score="topk_sum",
                    groups_on_logits=score_func == "softmax")
    x = randx(T=50)
    d = r(x)
    logits = x @ r.weight.detach().t()
    ranked = logits if score_func == "softmax" else logits.sigmoid()
    want = megatron_group_limited_topk(ranked, 4, 4, 2)
    assert torch.equal(d.experts_TK.sort(-1).values, want.sort(-1).values)


def test_group_score_validation():
    with pytest.raises(ValueError, match="group_score must be one of"):
        TopKRouter(D, E, 2, num_groups=2, topk_groups=1, group_score="mean")
    with pytest.raises(ValueError, match="top_k // topk_groups"):
        TopKRouter(D, E, 1, num_groups=4, topk_groups=2, group_score="topk_sum")


def naive_switch_aux(probs, experts, k, n_e):
    T = len(probs)
    f = [sum(e == i for row in experts for e in row) / (T * k) for i in range(n_e)]
    P = [sum(p[i] for p in probs) / T for i in range(n_e)]
    return n_e * sum(fi * pi for fi, pi in zip(f, P))


@pytest.mark.parametrize("kwargs", [{"bias_update_rate": 1e-2}, {"num_groups": 4, "topk_groups": 1}])
def test_balance_losses_count_the_unbiased_topk_by_default(kwargs):
    """DeepSeek-V3 eq. 18 / Megatron-Core: f_i counts the top-k of the unbiased scores over all experts, not the
    biased or group-limited choice; count='chosen' keeps the other convention."""
    r = make_router(**kwargs)
    if r.expert_bias is not None:
        with torch.no_grad():
            r.expert_bias.copy_(torch.linspace(-0.5, 0.5, E))  # moves the choice away from the plain top-k
    x = randx(T=30)
    d = r(x)
    probs = (x @ r.weight.detach().t()).softmax(-1)
    unbiased = probs.topk(2, -1).indices.tolist()
    assert unbiased != d.experts_TK.tolist()  # the two conventions differ here
    default = mr.losses.switch_aux_loss(d, 2)
    chosen = mr.losses.switch_aux_loss(d, 2, count="chosen")
    assert default.item() == pytest.approx(naive_switch_aux(probs.tolist(), unbiased, 2, E), rel=1e-12)
    assert chosen.item() == pytest.approx(naive_switch_aux(probs.tolist(), d.experts_TK.tolist(), 2, E), rel=1e-12)
    seq = mr.losses.sequence_aux_loss(d, 2, None, 1)
    assert seq.item() == pytest.approx(default.item(), rel=1e-12)
    with pytest.raises(ValueError, match="count must be one of"):
        mr.SwitchAuxLoss(count="biased")
