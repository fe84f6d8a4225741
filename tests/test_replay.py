"""Routing replay (`moe_routing.replay`) and recompute safety (`moe_routing.selection`)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as Fn
from torch.utils.checkpoint import checkpoint

import moe_routing as mr
from moe_routing import RoutingRecord, record_routing, replay_routing
from moe_routing.replay import ids_dtype

D, F, E, K, L, T = 8, 6, 6, 2, 3, 10


class Stack(torch.nn.Module):
    """Residual stack of MoE layers, optionally each under an activation checkpoint."""

    def __init__(self, router="topk", L=L, k=K, ckpt=None, group=None, **router_kwargs):
        super().__init__()
        self.group = group
        routers = group.routers if group is not None else [router] * L
        self.layers = torch.nn.ModuleList(mr.MoELayer(D, F, E, k, router=r, router_kwargs=router_kwargs or None)
                                          for r in routers)
        self.ckpt = ckpt  # None, "reentrant" or "non_reentrant"

    def forward(self, h):
        for layer in self.layers:
            if self.ckpt is None:
                h = h + layer(h)
            else:
                h = h + checkpoint(layer, h, use_reentrant=self.ckpt == "reentrant")
        return h


def random_experts(T, L, k, seed, E=E):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(L)]) for _ in range(T)])


FIXED_K = {"topk_softmax_then_topk": dict(router="topk", softmax_before_topk=True),
           "topk_then_softmax": dict(router="topk"),
           "topk_sigmoid": dict(router="topk", score_func="sigmoid"),
           "topk_groups_bias": dict(router="topk", num_groups=2, topk_groups=1, bias_update_rate=1e-3),
           "sinkhorn": dict(router="sinkhorn"), "hyper": dict(router="hyper"), "hash": dict(router="hash"),
           "recurrent": dict(router="recurrent"), "mor": dict(router="mor")}


def build(kind, **kw):
    args = dict(FIXED_K[kind])
    router = args.pop("router")
    if router == "recurrent":
        return Stack(group=mr.RecurrentRouterGroup(D, E, K, L, 4), **kw)
    if kind == "topk_groups_bias":
        return Stack(router, k=1, **args, **kw)
    return Stack(router, **args, **kw)


def run(model, x, ids):
    """A forward inside a routing context (hash needs token ids, recurrent a context)."""
    with mr.routing_context(model, token_ids=ids):
        return model(x)


@pytest.mark.parametrize("kind", list(FIXED_K))
def test_replay_reproduces_the_given_selection_for_every_fixed_k_router(kind):
    torch.manual_seed(0)
    model = build(kind)
    k = model.layers[0].top_k
    x, ids = torch.randn(T, D), torch.randint(0, 50, (T,))
    with record_routing(model) as native:
        run(model, x, ids)
    with torch.no_grad():  # a new policy: the native routing changes, the replayed one must not
        for p in model.parameters():
            if p.is_floating_point():
                p.add_(torch.randn_like(p) * 0.5)
    target = random_experts(T, L, k, seed=1)
    with record_routing(model) as rec, replay_routing(model, target.to(torch.int32)):
        y = run(model, x, ids)
    assert torch.equal(rec.experts_TLK.long(), target.sort(-1).values)
    assert not torch.equal(native.experts_TLK.long().sort(-1).values, target.sort(-1).values)
    y.sum().backward()  # the replayed forward trains
    # replaying a record reproduces it after the weights moved
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.add_(torch.randn_like(p) * 0.5)
    with record_routing(model) as again, replay_routing(model, rec):
        run(model, x, ids)
    assert torch.equal(again.experts_TLK, rec.experts_TLK)


def hand_gates(kind, logits_TE, experts_TK):
    if kind == "softmax_then_topk":
        return logits_TE.softmax(-1).gather(1, experts_TK)
    if kind == "topk_then_softmax":
        return logits_TE.gather(1, experts_TK).softmax(-1)
    g = logits_TE.sigmoid().gather(1, experts_TK)
    return g / g.sum(-1, keepdim=True)


@pytest.mark.parametrize("kind,kwargs", [("softmax_then_topk", dict(softmax_before_topk=True)),
                                         ("topk_then_softmax", dict(softmax_before_topk=False)),
                                         ("sigmoid", dict(score_func="sigmoid"))])
def test_router_gradient_under_replay_equals_a_hand_computation(kind, kwargs):
    torch.manual_seed(2)
    layer = mr.MoELayer(D, F, E, K, router_kwargs=kwargs, losses=[]).double()
    x = torch.randn(T, D, dtype=torch.float64)
    experts = random_experts(T, 1, K, seed=3)
    with replay_routing(layer, experts):
        y = layer(x)
    w = torch.randn_like(y)
    (y * w).sum().backward()
    # by hand: y_t = sum_j g_tj * FFN_{e_tj}(x_t), gates from the router's full logits at the replayed experts
    W = layer.router.weight.detach().clone().requires_grad_(True)
    ex = layer.experts
    e_TK = experts[:, 0].long()
    gates = hand_gates(kind, x @ W.t(), e_TK)
    y_ref = torch.zeros_like(x)
    for t in range(T):
        for j in range(K):
            e = int(e_TK[t, j])
            h = Fn.silu(x[t] @ ex.w_gate[e]) * (x[t] @ ex.w_up[e])
            y_ref[t] += gates[t, j] * (h @ ex.w_down[e])
    torch.testing.assert_close(y, y_ref.detach(), rtol=1e-10, atol=1e-12)
    (y_ref * w).sum().backward()
    torch.testing.assert_close(layer.router.weight.grad, W.grad, rtol=1e-10, atol=1e-12)
    assert W.grad.abs().sum() > 0


def perturb_in_recompute(model, scale=0.3):
    """A router pre-hook nudging the router input only during recomputation (native re-routing would differ);
    returns the per-layer selections the recomputations used."""
    used = {i: [] for i in range(len(model.layers))}
    for i, layer in enumerate(model.layers):
        def pre(mod, args, i=i):
            if torch._C._current_graph_task_id() != -1:
                g = torch.Generator().manual_seed(100 + i)
                return (args[0] + scale * torch.randn(args[0].shape, generator=g, dtype=args[0].dtype), *args[1:])
        def post(mod, args, out, i=i):
            if torch._C._current_graph_task_id() != -1:
                used[i].append(out.experts_TK.clone() if out.top_k else out.token_N.numel())
        layer.router.register_forward_pre_hook(pre)
        layer.router.register_forward_hook(post)
    return used


def native_flips(model, x):
    """Whether the perturbation alone changes layer 0's native routing (else the test would prove nothing)."""
    r = model.layers[0].router
    with torch.no_grad():
        a = r(x).expert_N
        b = r(x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(100))).expert_N
    return a.shape != b.shape or not torch.equal(a, b)


@pytest.mark.parametrize("ckpt", ["non_reentrant", "reentrant"])
@pytest.mark.parametrize("replay", [False, True])
@pytest.mark.parametrize("router", ["topk", "relu"])
def test_recompute_uses_the_forward_selection_after_the_block(ckpt, replay, router):
    torch.manual_seed(4)
    model = Stack(router, ckpt=ckpt)
    plain = Stack(router)
    plain.load_state_dict(model.state_dict())
    x = torch.randn(T, D, requires_grad=True)
    assert native_flips(model, x.detach())
    target = (random_experts(T, L, K, seed=5) if router == "topk"
              else torch.rand(T, L, E, generator=torch.Generator().manual_seed(5)) < 0.4)
    used = perturb_in_recompute(model)
    with record_routing(model) as rec:
        if replay:
            with replay_routing(model, target):
                y = model(x)
        else:
            y = model(x)
    # backward after the blocks exited, the recomputation perturbed
    y.sum().backward()
    for i in range(L):
        assert used[i], "the layer was not recomputed"
        if router == "topk":
            assert torch.equal(used[i][0], rec.experts_TLK[:, i].long())
        else:
            assert used[i][0] == int(rec.routing_map_TLE[:, i].sum())
    if replay:
        want = target.sort(-1).values if router == "topk" else target
        assert torch.equal(rec.selection.long() if router == "topk" else rec.selection, want)


@pytest.mark.parametrize("ckpt", ["non_reentrant", "reentrant"])
def test_checkpointed_replay_trains_like_the_plain_model(ckpt):
    torch.manual_seed(13)
    model, plain = Stack("topk", ckpt=ckpt), Stack("topk")
    plain.load_state_dict(model.state_dict())
    x = torch.randn(T, D)
    target = random_experts(T, L, K, seed=14)
    for m in (model, plain):
        xi = x.clone().requires_grad_(True)
        with replay_routing(m, target):
            y = m(xi)
        y.square().sum().backward()
    for a, b in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("ckpt", ["non_reentrant", "reentrant"])
@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_two_micro_batches_in_flight_each_recompute_their_own(ckpt, order):
    torch.manual_seed(6)
    model = Stack("topk", ckpt=ckpt)
    used = perturb_in_recompute(model, scale=0.05)
    xs = [torch.randn(T, D, requires_grad=True) for _ in range(2)]
    recs, ys = [], []
    for x in xs:
        with record_routing(model) as rec:
            ys.append(model(x))
        recs.append(rec)
    for m in order:
        before = len(used[0])
        ys[m].sum().backward()
        for i in range(L):
            assert torch.equal(used[i][before], recs[m].experts_TLK[:, i].long())


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")  # the no-grad pass, checkpointed
@pytest.mark.parametrize("ckpt", ["non_reentrant", "reentrant"])
def test_replayed_recompute_after_a_native_no_grad_pass_over_the_same_tokens(ckpt):
    """The old-log-prob pass (no grad, train mode) routes the micro-batch natively; the checkpointed training
    forward of the same tokens replays other experts: its recomputation must use the replayed selection, not
    the earlier no-grad one whose input fingerprint is identical (a reentrant forward is no-grad too)."""
    torch.manual_seed(16)
    model, plain = Stack("topk", ckpt=ckpt), Stack("topk")
    plain.load_state_dict(model.state_dict())
    x = torch.randn(T, D)
    target = random_experts(T, L, K, seed=17)
    with torch.no_grad():
        model(x)
    for m in (model, plain):
        with replay_routing(m, target):
            y = m(x.clone().requires_grad_(True))
        y.square().sum().backward()
    for a, b in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad)


def test_same_tokens_in_flight_with_different_routing_cannot_recompute_silently():
    """Two checkpointed forwards of the same tokens with graphs alive, one native and one replayed: the
    recomputation cannot tell them apart by input, so it raises instead of using the other's selection. Two
    forwards that routed alike are no ambiguity."""
    torch.manual_seed(18)
    model = Stack("topk", ckpt="non_reentrant")
    x = torch.randn(T, D, requires_grad=True)
    y_native = model(x)
    with replay_routing(model, random_experts(T, L, K, seed=19)):
        y_replayed = model(x)
    with pytest.raises(RuntimeError, match="cannot tell which one it recomputes"):
        y_replayed.sum().backward()
    del y_native, y_replayed
    ys = [model(x) for _ in range(2)]
    for y in ys:
        y.sum().backward()


def test_order_invariance_is_bitwise():
    torch.manual_seed(7)
    for dtype in (torch.float32, torch.bfloat16):
        model = Stack("topk", k=3).to(dtype)
        x = torch.randn(T, D, dtype=dtype)
        experts = random_experts(T, L, 3, seed=8)
        perm = torch.stack([torch.randperm(3) for _ in range(T * L)]).view(T, L, 3)
        shuffled = experts.gather(2, perm)
        outs, grads = [], []
        for ex in (experts, shuffled):
            model.zero_grad()
            xi = x.clone().requires_grad_(True)
            with replay_routing(model, ex):
                y = model(xi)
            y.float().square().sum().backward()
            outs.append(y.detach())
            grads.append([xi.grad] + [p.grad.clone() for p in model.parameters()])
        assert torch.equal(outs[0], outs[1])
        for a, b in zip(*grads):
            assert torch.equal(a, b)


def test_mask_and_sentinel_rows_route_natively():
    torch.manual_seed(9)
    model = Stack("topk")
    x = torch.randn(T, D)
    with record_routing(model) as native:
        model(x)
    target = random_experts(T, L, K, seed=10)
    target[T - 1] = -1          # the last token an engine does not report
    mask = torch.ones(T, dtype=torch.bool)
    mask[:2] = False            # padding
    with record_routing(model) as rec, replay_routing(model, target.to(torch.int16), token_mask_T=mask):
        model(x)
    got = rec.experts_TLK.long()
    nat = native.experts_TLK.long()
    # layer 0 sees the same input, so its native rows equal the native run's
    for t in (0, 1, T - 1):
        assert torch.equal(got[t, 0], nat[t, 0])
    assert torch.equal(got[2:T - 1], target[2:T - 1].sort(-1).values)


def test_save_load_round_trip_and_model_check(tmp_path):
    torch.manual_seed(11)
    model = Stack("topk")
    with record_routing(model, keep_scores=True) as rec:
        model(torch.randn(T, D))
        model(torch.randn(4, D))
    assert rec.experts_TLK.shape == (T + 4, L, K) and rec.experts_TLK.dtype == torch.uint8
    assert rec.scores_TLE.shape == (T + 4, L, E)
    path = tmp_path / "r.safetensors"
    rec.save(path)
    back = RoutingRecord.load(path, model=model)
    assert torch.equal(back.experts_TLK, rec.experts_TLK) and torch.equal(back.scores_TLE, rec.scores_TLE)
    assert (back.layer_names, back.num_experts, back.top_k, back.router_kinds, back.version) == (
        rec.layer_names, rec.num_experts, rec.top_k, rec.router_kinds, mr.__version__)
    with pytest.raises(ValueError, match="has 3 MoE layers but the model has 2"):
        RoutingRecord.load(path, model=Stack("topk", L=2))
    with pytest.raises(ValueError, match="router kinds differ.*TopKRouter.*SinkhornRouter"):
        RoutingRecord.load(path, model=Stack("sinkhorn"))
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:len(data) - 20])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        RoutingRecord.load(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(ValueError, match="truncated or corrupt"):
        RoutingRecord.load(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a moe_routing routing record"):
        RoutingRecord.load(tmp_path / "other.safetensors")


def test_replay_errors():
    model = Stack("topk")
    x = torch.randn(T, D)
    with pytest.raises(ValueError, match=r"T=12 tokens but MoE layer 'layers.0' got an input of 10 tokens"):
        with replay_routing(model, random_experts(12, L, K, seed=0)):
            model(x)
    with pytest.raises(ValueError, match="has 4 layers .* but the model has 3 MoE layers"):
        with replay_routing(model, random_experts(T, 4, K, seed=0)):
            pass
    for bad in (E, -2):
        ex = random_experts(T, L, K, seed=0)
        ex[3, 1, 0] = bad
        with pytest.raises(ValueError, match=r"outside \[0, 6\)"):
            with replay_routing(model, ex):
                pass
    with pytest.raises(ValueError, match="K=3 experts per token but the model's MoE layers have top_k=2"):
        with replay_routing(model, random_experts(T, L, 3, seed=0)):
            pass
    with pytest.raises(ValueError, match="integer tensor"):
        with replay_routing(model, torch.zeros(T, L, K)):
            pass
    with pytest.raises(ValueError, match=r"token_mask_T must have shape \[10\]"):
        with replay_routing(model, random_experts(T, L, K, seed=0), token_mask_T=torch.ones(9, dtype=torch.bool)):
            pass
    ec = Stack("expert_choice")
    with pytest.raises(ValueError, match="ExpertChoiceRouter does not support forced_experts"):
        with replay_routing(ec, random_experts(T, L, K, seed=0)):
            pass
    with pytest.raises(ValueError, match="ExpertChoiceRouter does not support forced_experts"):
        with replay_routing(ec, torch.zeros(T, L, E, dtype=torch.bool)):
            pass
    with pytest.raises(ValueError, match="variable number of experts.*routing map"):
        with replay_routing(Stack("relu"), random_experts(T, L, K, seed=0)):
            pass
    assert model.layers[0]._routing.replay is None  # every block restored the layers


def test_record_size_for_a_long_rollout():
    rec = RoutingRecord(layer_names=[f"l{i}" for i in range(48)], num_experts=[128] * 48, top_k=8,
                        router_kinds=["TopKRouter"] * 48,
                        experts_TLK=torch.zeros(32 * 1024, 48, 8, dtype=ids_dtype(128)))
    assert rec.experts_TLK.dtype == torch.uint8 and rec.experts_TLK.device.type == "cpu"
    assert rec.nbytes <= 13 * 10**6
    assert ids_dtype(256) == torch.uint8 and ids_dtype(257) == torch.int16
    with pytest.raises(ValueError, match="int16 for E=300"):
        RoutingRecord(layer_names=["a"], num_experts=[300], top_k=1, router_kinds=["TopKRouter"],
                      experts_TLK=torch.zeros(2, 1, 1, dtype=torch.uint8))


def test_record_covers_grad_and_no_grad_calls_and_layers_called_one_by_one():
    torch.manual_seed(12)
    model = Stack("topk")
    x = torch.randn(T, D)
    with record_routing(model) as rec:
        with torch.no_grad():
            model.eval()(x)
        model.train()(x)
    assert rec.num_tokens == 2 * T and torch.equal(rec.experts_TLK[:T], rec.experts_TLK[T:])
    h = x
    with replay_routing(model, rec.experts_TLK[:T]), record_routing(model) as one:
        for layer in model.layers:
            h = h + layer(h)
    assert torch.equal(one.experts_TLK, rec.experts_TLK[:T].sort(-1).values)  # replay sorts each token's set


def test_kept_selections_die_with_their_graph_and_no_grad_slots_are_bounded():
    from moe_routing.selection import NO_GRAD_SLOTS
    model = Stack("topk")
    layer = model.layers[0]
    y = model(torch.randn(T, D))
    assert len(layer._routing.kept()) == 1
    y.sum().backward()
    del y
    assert layer._routing.kept() == []
    for _ in range(5):  # a long run without checkpoints: the references do not pile up
        model(torch.randn(T, D)).sum().backward()
    assert len(layer._routing._with_graph) <= 1
    with torch.no_grad():
        model.eval()
        model(torch.randn(T, D))
        assert layer._routing.kept() == []  # inference keeps nothing
        model.train()
        for _ in range(NO_GRAD_SLOTS + 3):
            model(torch.randn(T, D))
    assert len(layer._routing.kept()) == NO_GRAD_SLOTS
    assert layer._routing.kept()[0].selection.dtype == torch.uint8
    import copy
    import pickle
    assert copy.deepcopy(model).layers[0]._routing.kept() == []
    assert pickle.loads(pickle.dumps(model)).layers[0]._routing.kept() == []


def test_hash_layer_fully_replayed_needs_no_token_ids():
    model = Stack("hash")
    target = random_experts(T, L, K, seed=15)
    with record_routing(model) as rec, replay_routing(model, target):
        model(torch.randn(T, D))
    assert torch.equal(rec.experts_TLK.long(), target.sort(-1).values)
    target[0] = -1  # a natively routed row needs the ids again
    with pytest.raises(ValueError, match="HashRouter needs token ids"), replay_routing(model, target):
        model(torch.randn(T, D))
