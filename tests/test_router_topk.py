"""moe_routing/routers/topk.py: TopKRouter's selection and gate weights against a naive per-token computation
(softmax / sigmoid, scaling, group-limited routing and the group score rules of DeepSeek-V3, Megatron-Core and
DeepSeek-V2), the aux-loss-free bias used for selection only, forced experts, jitter, what balance losses count,
and the fused top-k op the layer's backend picks; against megatron-core's own ``group_limited_topk`` and
``topk_routing_with_score_function`` in Megatron's settings (skipped without megatron-core). Bias balancing and
dtype rules: test_router_topk_bias.py."""
from __future__ import annotations

import math

import pytest
import torch

import moe_routing as mr
from moe_routing import RoutingContext, TopKRouter

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


# ---- naive per-token reference -------------------------------------------------------------------------------------
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


# ---- scores and gate weights ---------------------------------------------------------------------------------------
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


# ---- forced experts (routing replay) -------------------------------------------------------------------------------
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


# ---- group score rules (DeepSeek-V3 / Megatron-Core / DeepSeek-V2) and what balance losses count -------------------
def naive_group_experts(row, k, num_groups, topk_groups, best):
    """One token: score each group by the sum of its `best` largest entries, keep the `topk_groups` best groups,
    then the k largest entries inside them (Python lists; inputs are continuous, so no ties)."""
    size = len(row) // num_groups
    groups = [row[g * size:(g + 1) * size] for g in range(num_groups)]
    group_score = [sum(sorted(vals, reverse=True)[:best]) for vals in groups]
    keep = sorted(range(num_groups), key=lambda g: -group_score[g])[:topk_groups]
    allowed = [e for g in keep for e in range(g * size, (g + 1) * size)]
    return sorted(sorted(allowed, key=lambda e: -row[e])[:k])


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
    scores for the sigmoid router; with group_score='topk_sum' (and groups_on_logits for softmax) ours agrees
    with megatron-core's own ``group_limited_topk``."""
    mc_utils = pytest.importorskip("megatron.core.transformer.moe.moe_utils",
                                   reason="megatron-core not installed (extra 'megatron')")
    r = make_router(top_k=4, num_groups=4, topk_groups=2, score_func=score_func, group_score="topk_sum",
                    groups_on_logits=score_func == "softmax")
    x = randx(T=50)
    d = r(x)
    logits = x @ r.weight.detach().t()
    ranked = logits if score_func == "softmax" else logits.sigmoid()
    _, want = mc_utils.group_limited_topk(ranked, topk=4, num_tokens=50, num_experts=E, num_groups=4, group_topk=2)
    assert torch.equal(d.experts_TK.sort(-1).values, want.sort(-1).values)


# Megatron-Core settings (topk_routing_with_score_function arguments) and the TopKRouter arguments that match them
MEGATRON_SETTINGS = [
    ({"score_function": "softmax"}, {}),
    ({"score_function": "softmax", "use_pre_softmax": True}, {"softmax_before_topk": True}),
    ({"topk": 1, "score_function": "softmax", "use_pre_softmax": True}, {"top_k": 1}),
    ({"score_function": "sigmoid"}, {"score_func": "sigmoid"}),
    ({"topk": 1, "score_function": "sigmoid"}, {"top_k": 1, "score_func": "sigmoid"}),
    ({"score_function": "sigmoid", "expert_bias": True}, {"score_func": "sigmoid", "bias_update_rate": 1e-3}),
    ({"score_function": "softmax", "num_groups": 4, "group_topk": 2},
     {"num_groups": 4, "topk_groups": 2, "group_score": "topk_sum", "groups_on_logits": True}),
    ({"score_function": "softmax", "use_pre_softmax": True, "num_groups": 4, "group_topk": 2},
     {"softmax_before_topk": True, "num_groups": 4, "topk_groups": 2, "group_score": "topk_sum"}),
    ({"topk": 4, "score_function": "sigmoid", "expert_bias": True, "num_groups": 4, "group_topk": 2,
      "scaling_factor": 2.5},
     {"top_k": 4, "score_func": "sigmoid", "bias_update_rate": 1e-3, "num_groups": 4, "topk_groups": 2,
      "group_score": "topk_sum", "scaling_factor": 2.5}),
    ({"score_function": "softmax", "scaling_factor": 0.5}, {"scaling_factor": 0.5}),
]


@pytest.mark.parametrize("theirs,ours", MEGATRON_SETTINGS)
def test_topk_router_matches_megatron_topk_routing_with_score_function(theirs, ours):
    """megatron-core's own ``topk_routing_with_score_function`` on the same logits: the same experts, gate weights
    and router-weight gradients (Megatron's softmax runs in float32, hence the tolerances)."""
    mc_utils = pytest.importorskip("megatron.core.transformer.moe.moe_utils",
                                   reason="megatron-core not installed (extra 'megatron')")
    T = 300  # enough tokens that ranking groups on logits or on probabilities routes some differently
    theirs, ours = dict(theirs), dict(ours)
    k = theirs.pop("topk", 2)
    r = make_router(top_k=ours.pop("top_k", k), **ours)
    bias = None
    if theirs.pop("expert_bias", False):
        bias = torch.linspace(-0.3, 0.3, E, dtype=torch.float64)[torch.randperm(E, generator=torch.Generator()
                                                                                 .manual_seed(4))]
        with torch.no_grad():
            r.expert_bias.copy_(bias)
    x = randx(T=T)
    d = r(x)
    logits = x @ r.weight.t()
    probs_TE, map_TE = mc_utils.topk_routing_with_score_function(logits, k, expert_bias=bias, **theirs)
    ours_map = torch.zeros(T, E, dtype=torch.bool).scatter_(1, d.experts_TK, True)
    assert torch.equal(ours_map, map_TE)
    ours_TE = torch.zeros(T, E, dtype=torch.float64).scatter(1, d.experts_TK, d.weights_TK)
    torch.testing.assert_close(ours_TE, probs_TE, rtol=1e-6, atol=1e-7)
    cot_TE = torch.randn(T, E, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    g_ours = torch.autograd.grad((ours_TE * cot_TE).sum(), r.weight)[0]
    g_theirs = torch.autograd.grad((probs_TE * cot_TE).sum(), r.weight)[0]
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-5, atol=1e-5)  # a sum over T float32 softmaxes


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


# ---- the fused top-k op: the layer's backend picks the kernel ------------------------------------------------------
def _spy(monkeypatch, calls):
    """Replace the router's fused op by one that records its backend and runs the torch implementation (the
    triton/cuda kernels need a GPU or the interpreter; their equality with torch is tested above)."""
    import moe_routing.routers.topk as topk_mod

    real = topk_mod.topk_softmax

    def spy(logits_TE, k, backend, **kw):
        calls.append(backend)
        return real(logits_TE, k, "torch", **kw)

    monkeypatch.setattr(topk_mod, "topk_softmax", spy)


@pytest.mark.parametrize("softmax_first", [False, True])
def test_router_fused_path_matches_default(monkeypatch, softmax_first):
    calls = []
    _spy(monkeypatch, calls)
    torch.manual_seed(0)
    r = TopKRouter(11, 5, 2, softmax_before_topk=softmax_first, scaling_factor=1.5)
    x = torch.randn(14, 11)
    outs = []
    for backend in ("torch", "triton"):
        xx = x.clone().requires_grad_()
        d = r(xx, backend=backend)
        outs.append((d.experts_TK, d.weights_TK, *torch.autograd.grad(d.weights_TK.square().sum(), [xx, r.weight])))
    assert calls == ["triton"]
    assert torch.equal(outs[0][0], outs[1][0])
    for got, want in zip(outs[1][1:], outs[0][1:]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_router_torch_backend_and_unfusable_configs_do_not_call_the_fused_op(monkeypatch):
    calls = []
    _spy(monkeypatch, calls)
    x = torch.randn(3, 8)
    TopKRouter(8, 4, 2)(x)  # backend "torch": plain ops
    assert calls == []
    for kw in ({"score_func": "sigmoid"}, {"num_groups": 2, "topk_groups": 1}, {"bias_update_rate": 1e-3},
               {"jitter_eps": 0.1}):
        TopKRouter(8, 4, 2, **kw)(x, backend="cuda")
    assert calls == []
    jitter = TopKRouter(8, 4, 2, jitter_eps=0.1).eval()  # jitter only acts in training: fused in eval
    jitter(x, backend="cuda")
    assert calls == ["cuda"]


def test_router_forced_experts_take_the_unfused_path(monkeypatch):
    calls = []
    _spy(monkeypatch, calls)
    torch.manual_seed(1)
    r = TopKRouter(8, 5, 2)
    forced = torch.tensor([[4, 0], [1, 3], [2, 1]])
    d = r(torch.randn(3, 8), RoutingContext(forced_experts={"L": forced}), "L", backend="triton")
    assert calls == []
    torch.testing.assert_close(d.weights_TK.sum(-1), torch.ones(3))
    assert torch.equal(d.experts_TK, forced)
