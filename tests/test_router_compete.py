"""moe_routing/routers/compete.py and losses/compete.py: CompeteSMoE's competition steps and router steps against a
naive loop in float64 (outputs, gradients, the distillation loss), the schedule, replay, stats and checks."""
import pytest
import torch

import moe_routing as mr
from reference import leaf, naive_ffn, naive_moe, naive_softmax, top


def _softplus(v):
    return torch.log1p(torch.exp(v))


def _naive_competition(x, ex, k, response):
    """Every expert on every token; top-k responses, gates = responses renormalised over the k."""
    pairs, targets = [], []
    for t in range(x.shape[0]):
        outs = [naive_ffn(x[t], ex[0][e], ex[1][e], ex[2][e], "swiglu") for e in range(ex[1].shape[0])]
        resp = torch.stack([_softplus(h).mean() if response == "softplus_mean" else h.pow(2).sum().sqrt()
                            for h in outs])
        chosen = top(resp.detach().tolist(), k)
        total = sum(resp[e] for e in chosen)
        pairs += [(t, e, resp[e] / total) for e in chosen]
        targets.append(naive_softmax(resp))
    return pairs, torch.stack(targets)


def _layer(D, E, k, **kw):
    router = mr.CompeteRouter(D, E, k, **kw)
    # the aux loss returned, not injected: y's gradient is the expert path alone
    layer = mr.MoELayer(D, 5, E, k, router=router, layer_idx=0, return_aux_loss=True).double()
    with torch.no_grad():
        router.weight.normal_(0, 0.5)
        for w in (layer.experts.w_gate, layer.experts.w_up, layer.experts.w_down):
            w.normal_(0, 0.7)  # decisive responses: no near-ties between the layer and the loop
    return layer


@pytest.mark.parametrize("T,E,k,response", [(1, 3, 1, "softplus_mean"), (9, 5, 2, "softplus_mean"),
                                            (7, 4, 3, "l2_norm")])
def test_competition_step_matches_naive_loop(T, E, k, response):
    torch.manual_seed(T * 10 + E + k)
    D = 6
    layer = _layer(D, E, k, compete_prob=1.0, response=response)
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    y, aux = layer(x)
    ex = [layer.experts.w_gate, layer.experts.w_up, layer.experts.w_down]
    x_ref, ex_ref = leaf(x), [leaf(p) for p in ex]
    pairs, target = _naive_competition(x_ref, ex_ref, k, response)
    y_ref = naive_moe(x_ref, ex_ref, pairs)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *ex], dy, retain_graph=True)
    grads_ref = torch.autograd.grad(y_ref, [x_ref, *ex_ref], dy)
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-11)
    # distillation: MSE between the router's softmax and the competition's, the loss's only router gradient
    W = layer.router.weight.detach()
    gate = torch.stack([naive_softmax(torch.stack([W[e] @ x[t].detach() for e in range(E)])) for t in range(T)])
    distill = ((gate - target.detach()) ** 2).mean()
    torch.testing.assert_close(layer.last_stats["compete_distill"], distill, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(layer.last_aux_losses["compete_distill"], 1e-2 * distill, rtol=1e-10, atol=1e-14)
    assert layer.last_stats["compete_step"] == 1
    assert layer.last_stats["expert_flops_ratio"] == pytest.approx((E + k) / k)


def test_router_step_matches_naive_topk():
    torch.manual_seed(3)
    T, D, E, k = 8, 6, 5, 2
    layer = _layer(D, E, k, compete_prob=0.0)
    x = torch.randn(T, D, dtype=torch.float64)
    y, _ = layer(x)
    W = layer.router.weight.detach()
    ex = [layer.experts.w_gate, layer.experts.w_up, layer.experts.w_down]
    pairs = []
    for t in range(T):
        p = naive_softmax(torch.stack([W[e] @ x[t] for e in range(E)]))
        chosen = top(p.tolist(), k)
        pairs += [(t, e, p[e] / sum(p[c] for c in chosen)) for e in chosen]
    torch.testing.assert_close(y, naive_moe(x, ex, pairs), rtol=1e-10, atol=1e-12)
    assert layer.last_stats["compete_step"] == 0 and layer.last_stats["expert_flops_ratio"] == 1
    assert layer.last_aux_losses["compete_distill"] == 0


def test_no_competition_in_eval_and_the_same_branch_without_grad():
    layer = _layer(4, 3, 2, compete_prob=1.0)
    x = torch.randn(5, 4, dtype=torch.float64)
    with torch.no_grad():  # a reentrant checkpoint's forward: it must compete as its recomputation will
        y_nograd, _ = layer(x)
    assert layer.last_stats["compete_step"] == 1
    torch.testing.assert_close(layer(x)[0], y_nograd)
    layer.eval()
    layer(x)
    assert layer.last_stats["compete_step"] == 0


def test_schedule_warmup_rate_determinism_and_step_counter():
    r = mr.CompeteRouter(4, 3, 2, compete_prob=0.3, warmup_steps=5, seed=7)
    draws = []
    for s in range(4005):
        r.steps = s
        draws.append(r.is_competition_step(2))
    assert not any(draws[:5])
    assert abs(sum(draws[5:]) / 4000 - 0.3) < 0.03
    r2 = mr.CompeteRouter(4, 3, 2, compete_prob=0.3, warmup_steps=5, seed=7)
    r2.steps = 123
    r.steps = 123
    assert r.is_competition_step(2) == r2.is_competition_step(2)
    layer = mr.MoELayer(4, 3, 3, 2, router=mr.CompeteRouter(4, 3, 2))
    mr.step(layer)
    mr.step(layer)
    assert layer.router.steps == 2
    state = layer.state_dict()
    fresh = mr.MoELayer(4, 3, 3, 2, router="compete")
    fresh.load_state_dict(state)
    assert fresh.router.steps == 2


def test_replay_on_a_competition_step_forces_experts_and_keeps_response_gates():
    torch.manual_seed(2)
    layer = _layer(4, 4, 2, compete_prob=1.0)
    forced = torch.tensor([[3, 0], [1, 2], [-1, -1]])
    x = torch.randn(3, 4, dtype=torch.float64)
    ctx = mr.RoutingContext(forced_experts={0: forced})
    with mr.record_routing(layer) as rec:
        y, _ = layer(x, ctx)
    experts = rec.experts_TLK[:, 0].long()
    assert experts[:2].tolist() == [[3, 0], [1, 2]]  # replayed rows; row 2 (-1) chose by competition
    assert layer.last_stats["compete_step"] == 1
    assert not ctx.expert_responses  # the layer passed the responses on a copy of the caller's context
    y.sum().backward()
    assert layer.experts.w_up.grad.abs().sum() > 0
    d = layer.router(x, None, 0)  # no responses: a router step
    assert d.extra["compete_step"] == 0


def test_argument_checks():
    with pytest.raises(ValueError, match="compete_prob"):
        mr.CompeteRouter(4, 3, 2, compete_prob=1.5)
    with pytest.raises(ValueError, match="compete_prob"):
        mr.CompeteRouter(4, 3, 2, compete_prob=float("nan"))
    with pytest.raises(ValueError, match="response"):
        mr.CompeteRouter(4, 3, 2, response="max")
    with pytest.raises(ValueError, match="gate of exactly 1"):
        mr.CompeteRouter(4, 3, 1, normalize=True)
    with pytest.raises(TypeError, match="warmup_steps"):
        mr.CompeteRouter(4, 3, 2, warmup_steps=True)
    r = mr.CompeteRouter(4, 3, 2)
    ctx = mr.RoutingContext()
    ctx.expert_responses[0] = torch.ones(2, 3)
    with pytest.raises(ValueError, match=r"expert_responses\[0\] must have shape \[5, 3\]"):
        r(torch.randn(5, 4), ctx, 0)


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointed_competition_step_has_the_plain_gradients(reentrant):
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(4)
    layer = _layer(5, 4, 2, compete_prob=1.0)
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    params = [x, layer.experts.w_up, layer.router.weight]
    def grads(run):
        for p in params:
            p.grad = None
        y, aux = run(x)
        (y.sum() + aux.sum()).backward()  # .backward: a reentrant checkpoint does not support autograd.grad
        return [p.grad.clone() for p in params]

    plain = grads(layer)
    ckpt = grads(lambda v: checkpoint(layer, v, use_reentrant=reentrant))
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_a_layer_whose_experts_are_not_all_local_refuses_the_router():
    class Remote(mr.Dispatcher):  # stands in for an expert-parallel dispatcher
        def dispatch(self, *a, **k):
            raise AssertionError

        def combine(self, *a, **k):
            raise AssertionError

    with pytest.raises(ValueError, match="needs all experts on this device"):
        mr.MoELayer(4, 3, 4, 2, router="compete", dispatcher=Remote())
