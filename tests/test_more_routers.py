"""Sinkhorn, expert-choice, hash and HyperRouter routers against independent naive computations (Python loops,
float64), inside MoELayer in float32 / bfloat16 / float64, and their argument checks."""
from __future__ import annotations

import math
import warnings
from fractions import Fraction

import pytest
import torch

from moe_routing import MoELayer, RoutingContext, SwitchAuxLoss, routing_context
from moe_routing.routers.expert_choice import ExpertChoiceRouter
from moe_routing.routers.hash import HashRouter, balanced_expert_map, hash_experts
from moe_routing.routers.hyper import HyperRouter
from moe_routing.routers.sinkhorn import SinkhornRouter, sinkhorn

from reference import naive_ffn, naive_sigmoid, naive_softmax

D, E, V = 7, 6, 50
pytestmark = pytest.mark.filterwarnings("ignore:ExpertChoiceRouter is not causal")


# ------------------------------------------------------------------------------------------------ naive references
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


def leaf(t):  # an independent copy of a parameter for the naive graph
    return t.detach().clone().requires_grad_(True)


# --------------------------------------------------------------------------------------- every router in a layer
def make_router(name, k=2):
    r = {"sinkhorn": lambda: SinkhornRouter(D, E, k, tol=1e-12, max_iters=10000),
         "expert_choice": lambda: ExpertChoiceRouter(D, E, k), "hash": lambda: HashRouter(D, E, k, vocab_size=V),
         "hyper": lambda: HyperRouter(D, E, k, hyper_hidden=5)}[name]()
    if isinstance(getattr(r, "weight", None), torch.nn.Parameter):
        with torch.no_grad():
            r.weight.normal_(0, 0.7)  # decisive logits: no near-ties between float32 and float64
    return r


ROUTERS = ["sinkhorn", "expert_choice", "hash", "hyper"]


def naive_pairs(name, router, x, ids, k):
    """The naive pairs for ``router`` and [(router parameter, its naive leaf)] for the gradient comparison."""
    if name in ("sinkhorn", "expert_choice"):
        w = leaf(router.weight)
        pairs = pairs_sinkhorn(x, w, k) if name == "sinkhorn" else pairs_expert_choice(x, w, router.capacity_factor)
        return pairs, [(router.weight, w)]
    if name == "hash":
        return [(t, int(e), 1.0 / k) for t in range(x.shape[0]) for e in router.expert_map[ids[t]]], []
    emb = leaf(router.embedding)
    return pairs_hyper(x, emb, [p.detach() for p in router.hypernet.parameters()], k, E), [(router.embedding, emb)]


# one token with Sinkhorn: the balanced plan is uniform, its top-k a tie (test_sinkhorn_single_token_...)
@pytest.mark.parametrize("name,T,k", [(n, T, k) for n in ROUTERS for T, k in [(1, 1), (11, 2), (13, 3)]
                                      if (n, T) != ("sinkhorn", 1)])
def test_layer_matches_naive_loop_with_gradients(name, T, k):
    torch.manual_seed(T * 10 + k)
    router = make_router(name, k)
    layer = MoELayer(D, 5, E, k, router=router, losses=[]).double()
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, V, (T,))
    y = layer(x, RoutingContext(token_ids=ids))

    ex = [layer.experts.w_gate, layer.experts.w_up, layer.experts.w_down]
    x_ref, ex_ref = leaf(x), [leaf(p) for p in ex]
    pairs, router_leaves = naive_pairs(name, router, x_ref, ids.tolist(), k)
    y_ref = naive_moe(x_ref, ex_ref, pairs)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)

    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *ex, *(p for p, _ in router_leaves)], dy)
    grads_ref = torch.autograd.grad(y_ref, [x_ref, *ex_ref, *(q for _, q in router_leaves)], dy)
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-11)
    counts = torch.bincount(torch.tensor([e for _, e, _ in pairs], dtype=torch.long), minlength=E)
    assert torch.equal(layer.last_stats["tokens_per_expert"], counts)


@pytest.mark.parametrize("name", ROUTERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_forward_backward_fp32_bf16(name, dtype):
    torch.manual_seed(5)
    layer = MoELayer(D, 5, E, 2, router=make_router(name, 2)).to(dtype)
    for p in layer.router.parameters():
        assert p.dtype == torch.float32
    x = torch.randn(2, 9, D, dtype=dtype, requires_grad=True)
    with routing_context(layer, token_ids=torch.randint(0, V, (2, 9)), padding_mask=torch.arange(18).view(2, 9) > 15):
        y = layer(x)
    assert y.shape == x.shape and y.dtype == dtype
    y.float().square().sum().backward()
    assert torch.isfinite(x.grad.float()).all() and x.grad.abs().sum() > 0
    trainable = [p for p in layer.router.parameters() if p.requires_grad]
    assert len(trainable) == (0 if name == "hash" else 1)
    for p in trainable:
        assert p.grad is not None and p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------------- Sinkhorn
@pytest.mark.parametrize("padded", [False, True])
def test_sinkhorn_plan_matches_megatron_iteration_and_is_balanced(padded):
    torch.manual_seed(7)
    T, n_e = 13, 5
    logits = torch.randn(T, n_e, dtype=torch.float64) * 2
    valid = (torch.arange(T) % 4 != 1) if padded else None
    log_plan, iters, err = sinkhorn(logits, valid, tol=1e-13, max_iters=10000)
    plan = log_plan.exp()
    ref = torch.tensor(naive_sinkhorn(logits.tolist(), None if valid is None else valid.tolist()), dtype=torch.float64)
    rows = torch.arange(T) if valid is None else valid.nonzero().squeeze(1)
    torch.testing.assert_close(plan[rows], ref[rows], rtol=1e-9, atol=0)
    assert err <= 1e-13 and 1 < iters < 10000
    torch.testing.assert_close(plan[rows].sum(0), torch.full((n_e,), 1 / n_e, dtype=torch.float64), rtol=1e-12, atol=0)
    torch.testing.assert_close(plan[rows].sum(1), torch.full((len(rows),), 1 / len(rows), dtype=torch.float64),
                               rtol=1e-12, atol=0)
    # default tolerance in float32; an offset of 200 (exp overflows float32) changes nothing in log space
    log_plan, iters, err = sinkhorn(logits.float() + 200, valid)
    plan = log_plan.double().exp()[rows]
    assert err <= 1e-4 and iters < 100 and (plan.sum(1) * len(rows) - 1).abs().max() <= 1.1e-4
    assert (plan.sum(0) * n_e - 1).abs().max() <= 1e-5
    torch.testing.assert_close(plan, ref[rows], rtol=1e-3, atol=0)
    # the iteration cap: unconverged rows, but the columns are exact on exit
    log_plan, iters, err = sinkhorn(logits * 10, valid, tol=1e-12, max_iters=2)
    assert iters == 2 and err > 1e-3
    torch.testing.assert_close(log_plan.exp()[rows].sum(0), torch.full((n_e,), 1 / n_e, dtype=torch.float64))


@pytest.mark.parametrize("k", [1, 2])
def test_sinkhorn_router_train_balances_eval_is_plain_topk(k):
    torch.manual_seed(8)
    T, n_e = 40, 4
    r = SinkhornRouter(D, n_e, k).double()
    with torch.no_grad():
        r.weight.normal_(0, 0.3)
        r.weight[0] += 3.0  # every token prefers expert 0
    x = torch.randn(T, D, dtype=torch.float64) + 1.5
    logits = x @ r.weight.detach().t()
    act = logits.sigmoid() if k == 1 else logits.softmax(-1)
    assert r.scores_normalized == (k != 1)

    r.eval()
    d = r(x)
    assert torch.equal(d.experts_TK, act.topk(k, -1).indices)
    assert (d.experts_TK == 0).sum() == T  # collapsed onto expert 0
    r.train()
    d = r(x)
    plan = naive_sinkhorn(logits.tolist())
    assert d.experts_TK.tolist() == [top(row, k) for row in plan]
    torch.testing.assert_close(d.weights_TK, act.gather(1, d.experts_TK), rtol=1e-12, atol=0)
    counts = torch.bincount(d.expert_N, minlength=n_e)
    assert counts.max() <= 2 * T * k / n_e and counts.min() >= T * k / n_e / 2, counts
    assert int(d.extra["sinkhorn_iters"]) >= 1 and float(d.extra["sinkhorn_error"]) <= 1e-4


def test_sinkhorn_single_token_and_forced_experts():
    r = SinkhornRouter(D, E, 2)
    x = torch.randn(1, D)
    d = r(x)
    act = (x @ r.weight.detach().t()).softmax(-1)
    assert len(set(d.experts_TK[0].tolist())) == 2
    torch.testing.assert_close(d.weights_TK, act.gather(1, d.experts_TK).detach())
    forced = torch.tensor([[5, 1]])
    d = r(x, RoutingContext(forced_experts={"L": forced}), "L")
    assert torch.equal(d.experts_TK, forced) and "sinkhorn_iters" not in d.extra
    torch.testing.assert_close(d.weights_TK.detach(), act[:, [5, 1]])


# --------------------------------------------------------------------------------------------------- expert choice
@pytest.mark.parametrize("T,cf,n_pad", [(1, 2, 0), (17, 2, 4), (9, 0.5, 2), (5, 4, 0), (4, 2, 4)])
def test_expert_choice_against_per_expert_loop(T, cf, n_pad):
    torch.manual_seed(T)
    r = ExpertChoiceRouter(D, E, 2, capacity_factor=cf).double()
    with torch.no_grad():
        r.weight.normal_(0, 0.7)
    x = torch.randn(T, D, dtype=torch.float64)
    pad = torch.zeros(T, dtype=torch.bool)
    pad[torch.randperm(T)[:n_pad]] = True
    d = r(x, RoutingContext(padding_mask=pad))
    pairs = pairs_expert_choice(x, r.weight.detach(), cf, (~pad).tolist())
    assert d.token_N.tolist() == [t for t, _, _ in pairs] and d.expert_N.tolist() == [e for _, e, _ in pairs]
    torch.testing.assert_close(d.weight_N.detach(), torch.stack([w for _, _, w in pairs]) if pairs
                               else torch.zeros(0, dtype=torch.float64), rtol=1e-12, atol=0)
    assert d.top_k is None and bool((d.token_N.diff() >= 0).all())
    cap = ec_capacity(cf, T - n_pad, E)
    assert int(d.extra["capacity"]) == cap
    assert torch.equal(torch.bincount(d.expert_N, minlength=E), torch.full((E,), cap))
    assert not bool(pad[d.token_N].any())
    chosen = set(d.token_N.tolist())
    dropped = sum(1 for t in range(T) if not pad[t] and t not in chosen)
    assert float(d.extra["dropped_token_fraction"]) == pytest.approx(dropped / max(T - n_pad, 1))


def test_expert_choice_capacity_exact_and_clamped():
    r = ExpertChoiceRouter(D, 10, 2, capacity_factor=1.1)
    assert r.capacity(100) == 11  # float arithmetic would give ceil(11.000000000000002) = 12
    assert ExpertChoiceRouter(D, 3, 2).capacity(5) == 4  # default capacity_factor = top_k: ceil(2 * 5 / 3)
    assert ExpertChoiceRouter(D, 3, 3, capacity_factor=4).capacity(5) == 5  # ceil(20 / 3) = 7 > T clamps to T
    assert ExpertChoiceRouter(D, 4, 1).capacity(0) == 0


def test_expert_choice_warns_once_per_instance_and_rejects_replay():
    x = torch.randn(3, D)
    r = ExpertChoiceRouter(D, E, 2)
    with pytest.warns(UserWarning, match="not causal"):
        r(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r(x)
    with pytest.warns(UserWarning, match="not causal"):
        ExpertChoiceRouter(D, E, 2)(x)
    with pytest.raises(ValueError, match="forced_experts"):
        r(x, RoutingContext(forced_experts={0: torch.zeros(3, 2, dtype=torch.long)}), 0)


# ------------------------------------------------------------------------------------------------------------ hash
@pytest.mark.parametrize("k", [1, 3])
def test_balanced_map_is_balanced_distinct_and_seeded(k):
    m = balanced_expert_map(103, 8, k, seed=1)
    assert m.shape == (103, k) and m.dtype == torch.long and 0 <= int(m.min()) and int(m.max()) < 8
    counts = torch.bincount(m.flatten(), minlength=8)
    assert int(counts.max() - counts.min()) <= k and int(counts.sum()) == 103 * k
    assert all(len(set(row)) == k for row in m.tolist())
    assert torch.equal(m, balanced_expert_map(103, 8, k, seed=1))
    assert not torch.equal(m, balanced_expert_map(103, 8, k, seed=2))


def naive_hash(v, n_e, k, seed):
    def mix(h):
        h = (((h >> 16) ^ h) * 0x45D9F3B) % 2**32
        h = (((h >> 16) ^ h) * 0x45D9F3B) % 2**32
        return (h >> 16) ^ h
    chosen = []
    for j in range(k):
        salt = ((seed + 1) * 0x9E3779B9 + j * 0x632BE5AB) % 2**32
        r = mix((v % 2**32) ^ salt) * (n_e - j) // 2**32
        chosen.append([e for e in range(n_e) if e not in chosen][r])
    return chosen


def test_table_free_hash_matches_python_ints_and_spreads():
    ids = torch.tensor([0, 1, 2, 49, 2**31 + 5, 2**40 + 3, 123456789])
    for k, seed in [(1, 0), (3, 7)]:
        assert hash_experts(ids, E, k, seed).tolist() == [naive_hash(v, E, k, seed) for v in ids.tolist()]
    out = hash_experts(torch.arange(24000), 8, 2)
    assert all(len(set(row)) == 2 for row in out[:500].tolist())
    counts = torch.bincount(out.flatten(), minlength=8).double()
    assert (counts / counts.mean() - 1).abs().max() < 0.05


@pytest.mark.parametrize("vocab", [V, None])
def test_hash_router_decision(vocab):
    r = HashRouter(D, E, 2, vocab_size=vocab, seed=3)
    ids = torch.randint(0, V, (2, 5))
    d = r(torch.randn(10, D), RoutingContext(token_ids=ids))
    expect = r.expert_map[ids.flatten()] if vocab else hash_experts(ids.flatten(), E, 2, 3)
    assert torch.equal(d.experts_TK, expect) and d.scores_normalized
    assert torch.equal(d.weights_TK, torch.full((10, 2), 0.5)) and torch.equal(d.logits_TE, torch.zeros(10, E))
    assert torch.equal(d.scores_TE, torch.zeros(10, E).scatter_(1, expect, 0.5))
    if vocab:
        assert "expert_map" in r.state_dict() and r.default_losses() == []
    forced = torch.zeros(10, 2, dtype=torch.long) + torch.tensor([4, 2])
    assert torch.equal(r(torch.randn(10, D), RoutingContext(token_ids=ids, forced_experts={1: forced}), 1).experts_TK,
                       forced)


def test_hash_router_token_id_errors():
    r = HashRouter(D, E, 1, vocab_size=V)
    x = torch.randn(4, D)
    with pytest.raises(ValueError, match="routing_context"):
        r(x)
    with pytest.raises(ValueError, match="routing_context"):
        MoELayer(D, 5, E, 1, router=r)(x)
    with pytest.raises(ValueError, match=r"\[0, 50\)"):
        r(x, RoutingContext(token_ids=torch.tensor([0, 1, 50, 2])))
    with pytest.raises(ValueError, match="token_ids"):
        HashRouter(D, E, 1)(x, RoutingContext(token_ids=torch.tensor([0, -1, 5, 2])))
    with pytest.raises(ValueError, match="4 tokens"):
        r(x, RoutingContext(token_ids=torch.tensor([0, 1])))


# ----------------------------------------------------------------------------------------------------- HyperRouter
def test_hyper_generated_weight_and_frozen_hypernet():
    torch.manual_seed(9)
    r = HyperRouter(D, E, 2, embed_dim=4, hyper_hidden=5).double()
    W, b = r.generate()
    out = naive_hypernet(r.embedding.detach(), *[p.detach() for p in r.hypernet.parameters()]).view(E, D + 1)
    torch.testing.assert_close(W, out[:, :D], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(b, out[:, D], rtol=1e-12, atol=1e-15)
    assert torch.equal(r.weight, W) and W.shape == (E, D) and b.shape == (E,)
    assert HyperRouter(D, E, 2, bias=False).generate()[1] is None
    assert [type(m) for m in r.hypernet] == [torch.nn.Linear, torch.nn.ReLU, torch.nn.Linear]
    assert r.hypernet[0].weight.shape == (5, 4) and r.hypernet[2].weight.shape == (E * (D + 1), 5)
    assert [type(l) for l in r.default_losses()] == [SwitchAuxLoss] and r.default_losses()[0].coeff == 1e-2
    # size-aware init: generated weight std near init_std at a realistic size
    big = HyperRouter(256, 16, 2)
    assert 0.01 < float(big.weight.detach().std()) < 0.04

    layer = MoELayer(D, 5, E, 2, router=HyperRouter(D, E, 2))  # default switch aux loss on
    layer(torch.randn(12, D)).sum().backward()
    router = layer.router
    assert router.embedding.grad is not None and router.embedding.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in router.hypernet.parameters())
    keys = set(router.state_dict())
    assert {"embedding", "hypernet.0.weight", "hypernet.0.bias", "hypernet.2.weight", "hypernet.2.bias"} <= keys
    clone = HyperRouter(D, E, 2)
    clone.load_state_dict(router.state_dict())
    torch.testing.assert_close(clone.weight, router.weight)
    layer.to(torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in router.parameters())
    assert all(not p.requires_grad for p in router.hypernet.parameters())


# ---------------------------------------------------------------------------------------------------- bad arguments
BAD = [
    (lambda: SinkhornRouter(0, E), ValueError, "hidden_size"),
    (lambda: SinkhornRouter(D, E, 0), ValueError, "top_k"),
    (lambda: SinkhornRouter(D, E, E + 1), ValueError, "top_k"),
    (lambda: SinkhornRouter(D, E, 1, tol=0.0), ValueError, "tol"),
    (lambda: SinkhornRouter(D, E, 1, tol="small"), TypeError, "tol"),
    (lambda: SinkhornRouter(D, E, 1, max_iters=0), ValueError, "max_iters"),
    (lambda: SinkhornRouter(D, E, 1, init_std=-1.0), ValueError, "init_std"),
    (lambda: ExpertChoiceRouter(D, E, 7), ValueError, "top_k"),
    (lambda: ExpertChoiceRouter(D, E, 2, capacity_factor=0), ValueError, "capacity_factor"),
    (lambda: ExpertChoiceRouter(D, E, 2, capacity_factor=math.inf), ValueError, "capacity_factor"),
    (lambda: ExpertChoiceRouter(D, E, 2, capacity_factor="2"), TypeError, "capacity_factor"),
    (lambda: HashRouter(D, E, 0), ValueError, "top_k"),
    (lambda: HashRouter(D, E, 1, vocab_size=0), ValueError, "vocab_size"),
    (lambda: HashRouter(D, E, 1, seed=1.5), TypeError, "seed"),
    (lambda: HyperRouter(D, E, 2, embed_dim=0), ValueError, "embed_dim"),
    (lambda: HyperRouter(D, E, 2, hyper_hidden=-3), ValueError, "hyper_hidden"),
    (lambda: HyperRouter(D, E, 2, bias="yes"), TypeError, "bias"),
    (lambda: HyperRouter(D, 0, 1), ValueError, "num_experts"),
    (lambda: MoELayer(D, 5, E + 1, 2, router=HyperRouter(D, E, 2)), ValueError, "num_experts"),
]


@pytest.mark.parametrize("make,exc,match", BAD)
def test_bad_arguments(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


@pytest.mark.parametrize("name", ["sinkhorn", "hyper"])
def test_bad_forced_experts_and_input(name):
    r = make_router(name, 2)
    with pytest.raises(ValueError, match=r"forced_experts\[0\] must be an integer tensor of shape \[3, 2\]"):
        r(torch.randn(3, D), RoutingContext(forced_experts={0: torch.zeros(3, 1, dtype=torch.long)}), 0)
    with pytest.raises(ValueError, match="outside"):
        r(torch.randn(3, D), RoutingContext(forced_experts={0: torch.full((3, 2), E)}), 0)
    with pytest.raises(ValueError, match=f"shape \\[T, {D}\\]"):
        r(torch.randn(3, D + 1))


@pytest.mark.parametrize("vocab", [V, None])
def test_hash_router_reads_no_device_values_off_the_host(vocab, monkeypatch):
    """The id-range check read two values back to the host in every forward (a sync per hash layer on GPU).
    Off the CPU it now runs only with MOE_ROUTING_DEBUG=1; the meta device stands in for an accelerator here:
    any host read of its values raises."""
    r = HashRouter(D, E, 2, vocab_size=vocab, seed=1).to("meta")
    ctx = RoutingContext(token_ids=torch.zeros(2, 5, dtype=torch.long, device="meta"))
    monkeypatch.delenv("MOE_ROUTING_DEBUG", raising=False)
    d = r.route(torch.empty(10, D, device="meta"), ctx, None)  # Router.forward's autocast guard has no meta
    assert d.experts_TK.shape == (10, 2) and d.experts_TK.device.type == "meta"
    assert d.scores_TE.shape == (10, E)
    monkeypatch.setenv("MOE_ROUTING_DEBUG", "1")
    with pytest.raises(RuntimeError, match="meta"):  # the debug check does read the values
        r.route(torch.empty(10, D, device="meta"), ctx, None)


def test_expert_choice_builds_pairs_without_reading_device_values():
    """Pairs came from a nonzero over the [T, E] choice mask: a host sync on accelerators, although N = E * C is
    known on the host. The meta device stands in for an accelerator: any host read of its values raises."""
    r = ExpertChoiceRouter(D, E, 2, capacity_factor=1.5).to("meta")
    d = r.route(torch.empty(9, D, device="meta"), None, None)  # Router.forward's autocast guard has no meta
    cap = ec_capacity(1.5, 9, E)
    assert d.token_N.shape == d.expert_N.shape == d.weight_N.shape == (E * cap,)
    assert d.token_N.device.type == "meta" and d.extra["max_experts_per_token"].device.type == "meta"


@pytest.mark.parametrize("name", ROUTERS)
@pytest.mark.parametrize("n_e,k", [(1, 1), (4, 4)])
def test_one_expert_and_k_equals_e_with_strided_input(name, n_e, k):
    """E = 1 and k = E: every token reaches every expert, so the layer is the gate-weighted sum of all experts
    (for expert choice with cf = k too: C = T); a non-contiguous input matches its contiguous copy."""
    torch.manual_seed(n_e)
    router = {"sinkhorn": lambda: SinkhornRouter(D, n_e, k), "expert_choice": lambda: ExpertChoiceRouter(D, n_e, k),
              "hash": lambda: HashRouter(D, n_e, k, vocab_size=V), "hyper": lambda: HyperRouter(D, n_e, k)}[name]()
    layer = MoELayer(D, 3, n_e, k, router=router, losses=[]).double()
    x = torch.randn(D, 5, dtype=torch.float64).t()  # [5, D], strided
    ctx = RoutingContext(token_ids=torch.randint(0, V, (5,)))
    y = layer(x, ctx)
    torch.testing.assert_close(y, layer(x.contiguous(), ctx), rtol=1e-12, atol=1e-14)  # matmul ulps only
    d = layer.router(x, ctx)
    assert sorted(zip(d.token_N.tolist(), d.expert_N.tolist())) == [(t, e) for t in range(5) for e in range(n_e)]
    ex = layer.experts
    rows = []
    for t in range(5):
        w = {int(e): d.weight_N[i] for i, e in enumerate(d.expert_N.tolist()) if d.token_N[i] == t}
        rows.append(sum(w[e] * naive_ffn(x[t], ex.w_gate[e], ex.w_up[e], ex.w_down[e], "swiglu") for e in range(n_e)))
    torch.testing.assert_close(y, torch.stack(rows), rtol=1e-10, atol=1e-12)


def test_sinkhorn_tolerance_below_the_dtype_floor_warns_and_stops():
    from moe_routing.routers.sinkhorn import sinkhorn

    L = torch.randn(300, 8, generator=torch.Generator().manual_seed(0)) * 3
    with pytest.warns(UserWarning, match="below what torch.float32 resolves"):
        _, iters, err = sinkhorn(L, None, tol=1e-12, max_iters=100_000)
    assert iters < 1000 and err < 1e-4


def megatron_sinkhorn(cost, tol=1e-4):
    """Transcribed from megatron-core 0.16 `transformer/moe/moe_utils.py::sinkhorn` (returns the iteration count
    too): d0/d1 scalings of exp(cost), stop when mean |d1 - d1_old| <= tol."""
    cost = torch.exp(cost)
    d0 = torch.ones(cost.size(0), dtype=cost.dtype)
    d1 = torch.ones(cost.size(1), dtype=cost.dtype)
    eps, error, d1_old, iters = 1e-8, 1e9, d1, 0
    while error > tol:
        d0 = (1 / d0.size(0)) * 1 / (torch.sum(d1 * cost, 1) + eps)
        d1 = (1 / d1.size(0)) * 1 / (torch.sum(d0.unsqueeze(1) * cost, 0) + eps)
        error = torch.mean(torch.abs(d1_old - d1))
        d1_old = d1
        iters += 1
    return d1 * cost * d0.unsqueeze(1), iters


def test_sinkhorn_megatron_stop_rule_matches_megatron():
    from moe_routing.routers.sinkhorn import sinkhorn

    L = torch.randn(64, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    want, want_iters = megatron_sinkhorn(L, tol=1e-6)
    log_plan, iters, err = sinkhorn(L, None, tol=1e-6, max_iters=10_000, stop_rule="megatron")
    assert iters == want_iters and err <= 1e-6
    # Megatron's plan ends on its column update too; eps=1e-8 in its denominators is the only difference
    torch.testing.assert_close(log_plan.exp(), want, rtol=1e-6, atol=1e-12)
    with pytest.raises(ValueError, match="stop_rule must be one of"):
        SinkhornRouter(D, E, 1, stop_rule="cols")
