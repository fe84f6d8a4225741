"""moe_routing/routers/mor.py: the Mixture of Routers router against a naive loop in float64 (outputs and
gradients of every router parameter), its scores and logits, k = 1 gates, routing replay, float32 parameters
under bf16 and argument checks."""
import math

import pytest
import torch

import moe_routing as mr
from reference import assert_output_and_grads_close, leaf, naive_moe, naive_softmax, top


def _naive_pairs(x, sub, main, k, normalize):
    """p_t = sum_m softmax(main . x_t)_m softmax(sub[m] . x_t); experts = top-k of p_t; gates p (renormalised)."""
    pairs = []
    for t in range(x.shape[0]):
        a = naive_softmax(torch.stack([main[m] @ x[t] for m in range(main.shape[0])]))
        votes = [naive_softmax(torch.stack([sub[m, e] @ x[t] for e in range(sub.shape[1])]))
                 for m in range(sub.shape[0])]
        p = sum(a[m] * votes[m] for m in range(sub.shape[0]))
        chosen = top(p.detach().tolist(), k)
        total = sum(p[e] for e in chosen)
        pairs += [(t, e, p[e] / total if normalize else p[e]) for e in chosen]
    return pairs


@pytest.mark.parametrize("T,k,M", [(1, 1, 1), (11, 2, 3), (13, 3, 4)])
def test_layer_matches_naive_loop_with_gradients(T, k, M):
    torch.manual_seed(T + k + M)
    D, E = 7, 6
    router = mr.MixtureOfRoutersRouter(D, E, k, num_routers=M)
    with torch.no_grad():  # decisive scores: no near-ties between float32 and float64
        router.sub_weight.normal_(0, 0.8)
        router.main_weight.normal_(0, 0.8)
    layer = mr.MoELayer(D, 5, E, k, router=router, losses=[]).double()
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    ex = [layer.experts.w_gate, layer.experts.w_up, layer.experts.w_down]
    params = [router.sub_weight, router.main_weight]
    x_ref, ex_ref, p_ref = leaf(x), [leaf(p) for p in ex], [leaf(p) for p in params]
    y_ref = naive_moe(x_ref, ex_ref, _naive_pairs(x_ref, *p_ref, k, normalize=k > 1))
    assert_output_and_grads_close(y, y_ref, [x, *ex, *params], [x_ref, *ex_ref, *p_ref])


def test_scores_are_the_weighted_votes_and_logits_their_log():
    torch.manual_seed(0)
    r = mr.MixtureOfRoutersRouter(5, 4, 2, num_routers=3)
    x = torch.randn(6, 5) * 30  # large logits: the log-space mixture stays finite
    d = r(x)
    a = r.router_weights(x)
    votes = torch.einsum("td,med->tme", x, r.sub_weight).softmax(-1)
    p = (a[:, :, None] * votes).sum(1)
    torch.testing.assert_close(d.scores_TE, p, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(d.logits_TE.softmax(-1), p, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(d.logits_TE).all() and d.scores_normalized
    torch.testing.assert_close(d.weights_TK.sum(-1), torch.ones(6))  # k > 1: renormalised by default
    assert r.gate_weight_ED() is None


def test_top1_gates_carry_the_task_gradient_and_constant_gates_raise():
    r = mr.MixtureOfRoutersRouter(5, 4, 1)
    d = r(torch.randn(6, 5))
    assert not torch.allclose(d.weights_TK, torch.ones_like(d.weights_TK))
    d.weights_TK.sum().backward()
    assert r.sub_weight.grad.abs().max() > 0 and r.main_weight.grad.abs().max() > 0
    with pytest.raises(ValueError, match="gives every token a gate of exactly 1"):
        mr.MixtureOfRoutersRouter(5, 4, 1, normalize=True)


def test_replay_forces_experts_and_keeps_gate_gradients():
    torch.manual_seed(1)
    layer = mr.MoELayer(5, 3, 4, 2, router="mor", layer_idx=0)
    forced = torch.tensor([[3, 0], [1, 2], [0, 1]])
    x = torch.randn(3, 5)
    layer(x, mr.RoutingContext(forced_experts={0: forced})).sum().backward()
    assert layer.router.sub_weight.grad.abs().max() > 0 and layer.router.main_weight.grad.abs().max() > 0
    d = layer.router(x, mr.RoutingContext(forced_experts={0: forced}), 0)
    assert torch.equal(d.experts_TK, forced)
    p = d.scores_TE.gather(1, forced)
    torch.testing.assert_close(d.weights_TK, p / p.sum(-1, keepdim=True))
    with pytest.raises(ValueError, match="forced_experts"):
        layer(x, mr.RoutingContext(forced_experts={0: forced[:, :1]}))


def test_float32_parameters_under_bf16_and_named_build():
    layer = mr.MoELayer(8, 4, 4, 2, router="mor", router_kwargs={"num_routers": 2}).to(torch.bfloat16)
    assert layer.router.sub_weight.dtype == torch.float32 and layer.router.main_weight.dtype == torch.float32
    assert layer.router.sub_weight.shape == (2, 4, 8) and layer.router.main_weight.shape == (2, 8)
    y = layer(torch.randn(3, 8, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
    assert [type(l).__name__ for l in layer.losses] == ["SwitchAuxLoss"]


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(num_routers=0), ValueError, "num_routers"),
    (dict(num_routers=True), TypeError, "num_routers"),
    (dict(normalize=1), TypeError, "normalize must be a bool"),
    (dict(init_std=math.nan), ValueError, "init_std"),
    (dict(top_k=5), ValueError, "top_k"),
])
def test_bad_arguments(kwargs, error, match):
    args = {"hidden_size": 5, "num_experts": 4, "top_k": 2, **kwargs}
    with pytest.raises(error, match=match):
        mr.MixtureOfRoutersRouter(**args)
