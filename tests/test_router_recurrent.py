"""moe_routing/routers/recurrent.py (RMoE): routing and gradients against a naive per-token GRU (reference.py),
full MoE stacks in float64 / float32 / bfloat16, state handling (reset between forwards, activation
checkpointing, misuse), forced experts, shared-GRU ownership and dtypes."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import moe_routing as mr
from moe_routing.decision import RoutingContext
from moe_routing.losses.base import LossInputs
from moe_routing.routers.recurrent import RecurrentRouter, RecurrentRouterGroup

from reference import (naive_recurrent_route, naive_recurrent_stack, recurrent_leaf_list, recurrent_leaves,
                       recurrent_params)


# ---- routing math --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T", [1, 6])
def test_routing_and_gradients_match_naive_gru_over_three_layers(T):
    torch.manual_seed(T)
    D, E, k, P = 7, 5, 2, 4
    group = RecurrentRouterGroup(D, E, k, 3, P, init_std=0.5, dtype=torch.float64)
    xs = [torch.randn(T, D, dtype=torch.float64) for _ in range(3)]
    ctx = RoutingContext()
    decisions = [r(x, ctx) for r, x in zip(group.routers, xs)]
    ref_params = recurrent_leaves(group)
    ref = naive_recurrent_route(xs, ref_params, k)
    for d, (logits, experts, gates) in zip(decisions, ref):
        torch.testing.assert_close(d.logits_TE, logits, rtol=1e-12, atol=1e-13)
        assert d.experts_TK.tolist() == experts
        torch.testing.assert_close(d.weights_TK, gates, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(d.scores_TE.sum(-1), torch.ones(T, dtype=torch.float64))
    # gradients of a random function of every layer's gates and logits, through the recurrence
    c = [(torch.randn(T, k, dtype=torch.float64), torch.randn(T, E, dtype=torch.float64)) for _ in range(3)]
    loss = sum((d.weights_TK * a).sum() + (d.logits_TE * b).sum() for d, (a, b) in zip(decisions, c))
    loss_ref = sum((g * a).sum() + (lg * b).sum() for (lg, _, g), (a, b) in zip(ref, c))
    grads = torch.autograd.grad(loss, recurrent_params(group))
    grads_ref = torch.autograd.grad(loss_ref, recurrent_leaf_list(ref_params))
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_gradcheck_through_the_recurrence():
    torch.manual_seed(1)
    group = RecurrentRouterGroup(5, 4, 2, 3, 3, init_std=0.7, dtype=torch.float64)
    x1, x2 = torch.randn(2, 5, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)

    def last_layer(x0):
        ctx = RoutingContext()
        group.routers[0](x0, ctx)
        group.routers[1](x1, ctx)
        d = group.routers[2](x2, ctx)
        return d.weights_TK, d.logits_TE

    x0 = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(last_layer, (x0,))


def test_layer_two_loss_reaches_layer_zero_projection_and_shared_gru():
    torch.manual_seed(2)
    D, E = 9, 4
    group = RecurrentRouterGroup(D, E, 2, 3, 8, init_std=0.3)
    layers = [mr.MoELayer(D, 6, E, 2, router=r, losses=[]) for r in group.routers]
    xs = [torch.randn(5, D) for _ in range(3)]  # independent inputs: layer 0 reaches layer 2 only via the state
    ctx = RoutingContext()
    ys = [layer(x, ctx) for layer, x in zip(layers, xs)]
    grads = torch.autograd.grad(ys[2].square().sum(), [group.routers[0].w1, group.routers[1].w2, group.gru.weight_hh,
                                                      group.gru.weight_ih, layers[0].experts.w_up],
                                allow_unused=True)
    assert grads[0].abs().sum() > 1e-6             # state really flows from layer 0
    assert grads[2].abs().sum() > 1e-6 and grads[3].abs().sum() > 1e-6
    assert grads[1] is None                        # layer 1's logits do not feed layer 2
    assert grads[4] is None


# ---- full MoE layers -----------------------------------------------------------------------------------------------
class Toy(torch.nn.Module):
    """Residual stack of MoE layers routed by one group (the group is a submodule, registered first)."""

    def __init__(self, D=9, F=6, E=5, k=2, L=3, P=8, ckpt=False, **kw):
        super().__init__()
        self.group = RecurrentRouterGroup(D, E, k, L, P, **kw)
        self.layers = torch.nn.ModuleList(mr.MoELayer(D, F, E, k, router=r) for r in self.group.routers)
        self.ckpt = ckpt

    def forward(self, h, ctx=None):
        for layer in self.layers:
            if self.ckpt:
                h = h + checkpoint(layer, h, ctx, use_reentrant=False)
            else:
                h = h + layer(h, ctx)
        return h


@pytest.mark.parametrize("T", [1, 7])
def test_moe_stack_matches_naive_float64(T):
    torch.manual_seed(3)
    model = Toy(E=6, init_std=0.4).double()
    for layer in model.layers:
        layer.losses = []
    x = torch.randn(T, 9, dtype=torch.float64)
    with mr.routing_context(model):
        y = model(x)
    y_ref, p = naive_recurrent_stack(x, model, 2)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, recurrent_params(model.group), dy)
    grads_ref = torch.autograd.grad(y_ref, recurrent_leaf_list(p), dy)
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-11)
    if T == 1:  # k=2 of 6 experts: four get no token
        assert int((model.layers[0].last_stats["tokens_per_expert"] == 0).sum()) == 4


def test_moe_stack_fp32_and_bf16_forward_backward():
    torch.manual_seed(4)
    model = Toy()
    ref = copy.deepcopy(model).double()
    x = torch.randn(2, 5, 9)
    with mr.routing_context(model):
        y = model(x)
    y.sum().backward()
    with mr.routing_context(ref):
        y64 = ref(x.double())
    torch.testing.assert_close(y, y64.float(), rtol=1e-5, atol=1e-5)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.group.routers[0].w1.grad.abs().sum() > 0
    assert set(mr.aux_losses(model)["layers.2"]) == {"switch_aux"}  # default loss: TopK softmax's

    gru_before = {n: p.detach().clone() for n, p in model.group.gru.named_parameters()}
    model.zero_grad()
    model.to(torch.bfloat16)
    for n, p in model.group.gru.named_parameters():  # fp32 and not rounded through bf16
        assert p.dtype == torch.float32 and torch.equal(p, gru_before[n])
    for layer in model.layers:
        assert layer.router.w1.dtype == layer.router.w2.dtype == torch.float32
        assert layer.router.gru is model.group.gru
        assert layer.experts.w_up.dtype == torch.bfloat16
    xb = x.bfloat16()
    with mr.routing_context(model):
        yb = model(xb)
    yb.float().square().sum().backward()
    assert yb.dtype == torch.bfloat16
    assert model.group.gru.weight_hh.grad.dtype == torch.float32
    assert model.group.gru.weight_hh.grad.abs().sum() > 0
    torch.testing.assert_close(yb.float(), y.detach(), rtol=0.1, atol=0.1)
    assert model.double().group.gru.weight_ih.dtype == torch.float64


def test_bf16_cast_of_layers_only_keeps_shared_gru_fp32():
    group = RecurrentRouterGroup(8, 4, 1, 2, 4)
    seq = torch.nn.Sequential(*[mr.MoELayer(8, 4, 4, 1, router=r) for r in group.routers]).to(torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in group.parameters())
    assert seq[0].experts.w_up.dtype == torch.bfloat16


# ---- state ---------------------------------------------------------------------------------------------------------
def test_state_resets_between_forwards():
    torch.manual_seed(5)
    model = Toy()
    fresh = copy.deepcopy(model)
    a, b = torch.randn(4, 9), torch.randn(3, 2, 9)  # different token counts
    with mr.routing_context(model):
        model(a)
    with mr.routing_context(model):
        y_b = model(b)
    with mr.routing_context(fresh):
        torch.testing.assert_close(y_b, fresh(b), rtol=0, atol=0)
    reused = RoutingContext()  # one context for sequential forwards: layer 0 starts a new generation each time
    model(a, reused)
    torch.testing.assert_close(model(b, reused), y_b, rtol=0, atol=0)


def test_deepcopied_group_has_its_own_state_key():
    torch.manual_seed(6)
    model = Toy()
    twin = copy.deepcopy(model)
    ctx = RoutingContext()
    x = torch.randn(3, 9)
    y = model(x, ctx)
    torch.testing.assert_close(twin(x, ctx), y, rtol=0, atol=0)
    assert twin.layers[1].router._group_key is twin.layers[0].router._group_key
    assert twin.layers[0].router._group_key is not model.layers[0].router._group_key
    assert len(ctx.layer_state) == 2 * (3 + 1)  # 3 layers + a generation counter per group


@pytest.mark.parametrize("how", ["explicit_ctx", "routing_context", "whole_model"])
def test_checkpointing_matches_plain_run(how):
    torch.manual_seed(7)
    plain = Toy(init_std=0.3)
    ckpt = copy.deepcopy(plain)
    ckpt.ckpt = how != "whole_model"
    x = torch.randn(2, 4, 9)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    with mr.routing_context(plain):
        y = plain(xs[0])
        y.square().sum().backward()
    if how == "explicit_ctx":
        yc = ckpt(xs[1], RoutingContext())
        yc.square().sum().backward()
    elif how == "whole_model":  # one checkpoint around all layers: recomputes layers 0..2 in order
        yc = checkpoint(ckpt, xs[1], RoutingContext(), use_reentrant=False)
        yc.square().sum().backward()
    else:
        with mr.routing_context(ckpt):  # recomputation in backward needs the context still set
            yc = ckpt(xs[1])
            yc.square().sum().backward()
    torch.testing.assert_close(yc, y, rtol=0, atol=0)
    torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=1e-6, atol=1e-7)
    for (n, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert p.grad is not None, n
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-7, msg=n)


def test_checkpoint_backward_outside_routing_context_says_why():
    model = Toy(ckpt=True)
    with mr.routing_context(model):
        y = model(torch.randn(3, 9))
    with pytest.raises(ValueError, match="recomputation during backward"):
        y.sum().backward()


# ---- misuse --------------------------------------------------------------------------------------------------------
def test_misuse_errors():
    torch.manual_seed(8)
    group = RecurrentRouterGroup(6, 4, 2, 3, 4)
    r0, r1, r2 = group.routers
    x = torch.randn(5, 6)
    with pytest.raises(ValueError, match=r"moe_routing\.routing_context\(model\)"):
        r0(x)
    with pytest.raises(ValueError, match=r"RoutingContext"):
        mr.MoELayer(6, 4, 4, 2, router=r0)(x)
    with pytest.raises(ValueError, match="layer 1 found no state from layer 0"):
        r1(x, RoutingContext())
    ctx = RoutingContext()
    r0(x, ctx)
    with pytest.raises(ValueError, match="layer 1 got 4 tokens but layer 0 routed 5"):
        r1(x[:4], ctx)
    r1(x, ctx)
    r2(x, ctx)
    r0(x, ctx)  # reused context: a new forward starts at layer 0 ...
    with pytest.raises(ValueError, match="state of layer 1 .* earlier forward"):
        r2(x, ctx)  # ... so layer 1's state is stale
    with pytest.raises(ValueError, match="forced_experts"):
        r0(x, RoutingContext(forced_experts={None: torch.zeros(5, 3, dtype=torch.long)}))
    with pytest.raises(ValueError, match=r"outside \[0, 4\)"):
        r0(x, RoutingContext(forced_experts={None: torch.full((5, 2), 4)}))
    with pytest.raises(ValueError, match="forced_experts"):
        r0(x, RoutingContext(forced_experts={None: torch.zeros(5, 2)}))
    with pytest.raises(ValueError, match=r"shape \[T, 6\]"):
        r0(torch.randn(5, 7), RoutingContext())


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"proj_dim": 0}, ValueError, "proj_dim"),
    ({"proj_dim": 2.5}, TypeError, "proj_dim"),
    ({"top_k": 5}, ValueError, r"top_k must be an int in \[1, 4\]"),
    ({"top_k": 0}, ValueError, "top_k"),
    ({"num_layers": 0}, ValueError, "num_layers"),
    ({"num_layers": True}, TypeError, "num_layers"),
    ({"hidden_size": 0}, ValueError, "hidden_size"),
    ({"num_experts": 0}, ValueError, "num_experts"),
    ({"init_std": 0.0}, ValueError, "init_std"),
    ({"gru_init": "xavier"}, ValueError, "gru_init must be one of"),
    ({"balance_loss": "pooled"}, ValueError, "balance_loss must be one of"),
    ({"aux_coeff": float("nan")}, ValueError, "aux_coeff"),
    ({"aux_coeff": -1.0}, ValueError, "aux_coeff"),
])
def test_bad_constructor_arguments(kwargs, exc, match):
    args = {"hidden_size": 6, "num_experts": 4, "top_k": 2, "num_layers": 2, **kwargs}
    with pytest.raises(exc, match=match):
        RecurrentRouterGroup(**args)


def test_router_needs_group_pieces():
    group = RecurrentRouterGroup(6, 4, 2, 1, 4)
    with pytest.raises(TypeError, match="gru"):
        RecurrentRouter(6, 4, 2, 0, torch.nn.GRUCell(4, 5), group.routers[0]._group_key)
    with pytest.raises(TypeError, match="group_key"):
        RecurrentRouter(6, 4, 2, 0, group.gru, object())


# ---- forced experts ------------------------------------------------------------------------------------------------
def test_forced_experts_replay_and_override():
    torch.manual_seed(9)
    model = Toy(init_std=0.3)
    x = torch.randn(4, 9)
    captured = []
    hook = model.layers[1].router.register_forward_hook(lambda mod, args, out: captured.append(out))
    with mr.routing_context(model):
        y = model(x)
    hook.remove()
    own = captured[0].experts_TK
    with mr.routing_context(model, forced_experts={1: own}):  # replaying layer 1's own choice changes nothing
        torch.testing.assert_close(model(x), y, rtol=0, atol=0)
    other = (own + 1) % 5
    with mr.routing_context(model, forced_experts={1: other}):
        assert not torch.allclose(model(x), y)
    ctx = RoutingContext(forced_experts={1: other})
    model.layers[0].router(x, ctx, 0)
    d = model.layers[1].router(x, ctx, 1)
    assert torch.equal(d.experts_TK, other)
    torch.testing.assert_close(d.weights_TK, d.logits_TE.gather(1, other).softmax(-1))
    assert d.weights_TK.requires_grad


# ---- ownership -----------------------------------------------------------------------------------------------------
def test_shared_gru_counted_once_and_state_dict_round_trips():
    torch.manual_seed(10)
    D, F, E, L, P = 9, 6, 5, 3, 8
    model = Toy(D, F, E, 2, L, P)
    gru = 2 * 3 * P * P + 2 * 3 * P
    per_layer = P * D + E * P + 3 * E * D * F
    assert sum(p.numel() for p in model.parameters()) == gru + L * per_layer
    assert len({id(p) for p in model.parameters()}) == len(list(model.parameters()))
    torch.manual_seed(11)
    other = Toy(D, F, E, 2, L, P)
    x = torch.randn(5, D)
    with mr.routing_context(model):
        y = model(x)
    with mr.routing_context(other):
        assert not torch.allclose(other(x), y)
    missing = other.load_state_dict(model.state_dict())
    assert not missing.missing_keys and not missing.unexpected_keys
    assert other.layers[2].router.gru is other.group.gru  # still one shared module after loading
    with mr.routing_context(other):
        torch.testing.assert_close(other(x), y, rtol=0, atol=0)
    assert math.isclose(float(model.group.routers[0].w1.detach().std()), 0.02, rel_tol=0.3)


# ---- reentrant checkpointing ---------------------------------------------------------------------------------------
def test_per_layer_reentrant_checkpoint_raises_instead_of_losing_the_recurrence_gradient():
    """A reentrant checkpoint runs its forward under no_grad and recomputes each layer alone in backward, so
    layer i's recomputation would read a grad-less state of layer i-1: the gradient of layer i's output through
    the recurrence (into the GRU, earlier w1 and earlier layers) was silently dropped. Now a ValueError."""
    torch.manual_seed(12)
    model = Toy(init_std=0.3)
    x = torch.randn(4, 9, requires_grad=True)
    ctx = RoutingContext()
    h = x
    for layer in model.layers:
        h = h + checkpoint(layer, h, ctx, use_reentrant=True)
    with pytest.raises(ValueError, match="use_reentrant=False"):
        h.square().sum().backward()
    # a forward with lower layers under no_grad on purpose stays allowed (no recomputation involved)
    ctx = RoutingContext()
    with torch.no_grad():
        h = x + model.layers[0](x, ctx)
    y = model.layers[1](h, ctx)
    y.sum().backward()
    assert model.group.routers[1].w1.grad.abs().sum() > 0


def test_whole_model_reentrant_checkpoint_matches_plain_run():
    """One reentrant checkpoint around all layers recomputes them in order with grad: the gradients match."""
    torch.manual_seed(13)
    plain = Toy(init_std=0.3)
    ckpt = copy.deepcopy(plain)
    x = torch.randn(2, 3, 9)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    plain(xs[0], RoutingContext()).square().sum().backward()
    checkpoint(ckpt, xs[1], RoutingContext(), use_reentrant=True).square().sum().backward()
    torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=1e-6, atol=1e-7)
    for (n, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-7, msg=n)


def test_switch_gates_at_k1_give_the_router_a_gradient():
    torch.manual_seed(11)
    x = torch.randn(5, 6, dtype=torch.float64)
    for switch in (None, True):  # the default at k=1 is Switch gates
        group = RecurrentRouterGroup(6, 4, 1, 1, proj_dim=3, softmax_before_topk=switch).double()
        d = group.routers[0](x, RoutingContext(), 0)
        probs = torch.softmax(d.logits_TE, -1)
        torch.testing.assert_close(d.weights_TK, probs.gather(1, d.experts_TK))
        d.weights_TK.sum().backward()
        grad = group.routers[0].w2.grad
        assert grad is not None and grad.abs().sum() > 0
    with pytest.raises(ValueError, match="gate of exactly 1"):  # Mixtral gates at k=1: constant 1
        RecurrentRouterGroup(6, 4, 1, 1, proj_dim=3, softmax_before_topk=False)


def test_rerunning_a_later_layer_without_layer_zero_is_detected():
    group = RecurrentRouterGroup(8, 4, 2, num_layers=2, proj_dim=6)
    layers = [mr.MoELayer(8, 5, 4, 2, router=r, layer_idx=i) for i, r in enumerate(group.routers)]
    ctx = RoutingContext()
    x = torch.randn(3, 8)
    layers[1](layers[0](x, ctx), ctx)
    with pytest.raises(ValueError, match="layer 1 already ran in this forward"):
        layers[1](x, ctx)
    layers[1](layers[0](x, ctx), ctx)  # a new forward from layer 0 is fine


# ---- fidelity to the reference code (qiuzh20/RMoE llama_moe_rnn/) -------------------------------------------------
def _reference_gru_cell(x, h, w_ih, w_hh, b_ih, b_hh):
    """llama_moe_rnn/rnn.py CustomGRUCell.forward, its r/z/n weights being the chunks of torch's stacked ones."""
    w_ir, w_iz, w_in = w_ih.chunk(3)
    w_hr, w_hz, w_hn = w_hh.chunk(3)
    b_ir, b_iz, b_in = b_ih.chunk(3)
    b_hr, b_hz, b_hn = b_hh.chunk(3)
    r = torch.sigmoid(x @ w_ir.t() + b_ir + h @ w_hr.t() + b_hr)
    z = torch.sigmoid(x @ w_iz.t() + b_iz + h @ w_hz.t() + b_hz)
    n = torch.tanh(x @ w_in.t() + b_in + r * (h @ w_hn.t() + b_hn))
    return (1 - z) * n + z * h


def _reference_aux(logits_list, num_experts, top_k):
    """llama_moe_rnn/llama_moe_modeling.py load_balancing_loss_func: all layers pooled, counts not divided by k."""
    logits = torch.cat(logits_list, 0)
    probs = logits.softmax(-1)
    mask = torch.zeros(logits.shape[0], top_k, num_experts, dtype=probs.dtype)
    mask.scatter_(2, probs.topk(top_k, -1).indices[..., None], 1.0)
    return (mask.mean(0) * probs.mean(0)[None]).sum() * num_experts


def test_defaults_follow_the_reference_config():
    group = RecurrentRouterGroup(16, 4, 2, 3)
    assert group.proj_dim == 256 and group.gru_init == "reference" and group.balance_loss == "reference"
    losses = group.routers[1].default_losses()
    assert len(losses) == 1 and type(losses[0]).__name__ == "SwitchAuxLoss"
    assert losses[0].coeff == pytest.approx(2 * 1e-3 / 3)
    switch = RecurrentRouterGroup(16, 4, 2, 3, balance_loss="switch").routers[0].default_losses()[0]
    assert switch.coeff == pytest.approx(1e-2)


def test_reference_gru_init_is_normal_on_every_weight_and_bias():
    torch.manual_seed(0)
    P, std = 64, 0.02
    group = RecurrentRouterGroup(8, 4, 2, 2, P, init_std=std)
    for name, p in group.gru.named_parameters():
        assert abs(p.mean().item()) < 4 * std / math.sqrt(p.numel()), name
        assert p.std().item() == pytest.approx(std, rel=0.1), name
    torch_init = RecurrentRouterGroup(8, 4, 2, 2, P, gru_init="torch").gru
    bound = 1 / math.sqrt(P)
    for name, p in torch_init.named_parameters():
        assert p.abs().max().item() <= bound and p.std().item() > 0.5 * bound / math.sqrt(3), name


def test_gru_cell_is_the_reference_cell_float64():
    torch.manual_seed(1)
    group = RecurrentRouterGroup(6, 4, 2, 2, 5, init_std=0.5, dtype=torch.float64)
    g = group.gru
    x, h = torch.randn(7, 5, dtype=torch.float64), torch.randn(7, 5, dtype=torch.float64)
    ref = _reference_gru_cell(x, h, g.weight_ih, g.weight_hh, g.bias_ih, g.bias_hh)
    torch.testing.assert_close(g(x, h), ref, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(g(x), _reference_gru_cell(x, torch.zeros_like(x), g.weight_ih, g.weight_hh,
                                                         g.bias_ih, g.bias_hh), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("k", [1, 2])
def test_reference_balance_loss_relation_to_the_pooled_reference_float64(k):
    torch.manual_seed(5 + k)
    D, E, L, T = 9, 5, 3, 11
    group = RecurrentRouterGroup(D, E, k, L, 6, init_std=0.6, dtype=torch.float64)
    ctx = RoutingContext()
    decisions = [r(torch.randn(T, D, dtype=torch.float64), ctx) for r in group.routers]
    ours = [r.default_losses()[0](LossInputs(decision=d, top_k=k)).value for r, d in zip(group.routers, decisions)]
    logits = [d.logits_TE.detach() for d in decisions]
    per_layer_ref = torch.stack([_reference_aux([lg], E, k) for lg in logits])
    # each layer: (k coef / L) * switch aux == coef / L * the reference's loss on that layer alone
    torch.testing.assert_close(torch.stack(ours), 1e-3 * per_layer_ref / L, rtol=1e-12, atol=0)
    # the sum over layers equals the pooled reference when every layer routes alike ...
    same = [logits[0]] * L
    torch.testing.assert_close(1e-3 * sum(_reference_aux([lg], E, k) for lg in same) / L,
                               1e-3 * _reference_aux(same, E, k), rtol=1e-12, atol=0)
    # ... and differs from it by the cross-layer terms otherwise
    probs = [lg.softmax(-1) for lg in logits]
    c = [torch.zeros(T, E, dtype=torch.float64).scatter_(1, p.topk(k, -1).indices, 1.0).mean(0) for p in probs]
    P = [p.mean(0) for p in probs]
    cross = sum((c[l] * (P[m] - P[l])).sum() for l in range(L) for m in range(L) if l != m) * E / L ** 2
    torch.testing.assert_close(1e-3 * _reference_aux(logits, E, k) - sum(ours), 1e-3 * cross, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("k", [1, 2])
def test_the_pooled_reference_loss_is_the_hf_pooled_loss_float64(k):
    """The reference's exact pooled aux (all layers' rows pooled, counts not divided by k) is HF's pooled loss:
    build the layers with ``losses=[]`` and add ``1e-3 * mr.hf_load_balancing_loss(logits, k)``."""
    torch.manual_seed(11 + k)
    D, F_, E, L, T = 9, 4, 5, 3, 11
    group = RecurrentRouterGroup(D, E, k, L, 6, init_std=0.6, dtype=torch.float64)
    layers = torch.nn.ModuleList(mr.MoELayer(D, F_, E, k, router=group.routers[i], losses=[], dtype=torch.float64)
                                 for i in range(L))
    model = torch.nn.Module()
    model.layers, model.group = layers, group
    x = torch.randn(T, D, dtype=torch.float64)
    with mr.routing_context(model), mr.record_router_logits(model) as logits:
        h = x
        for layer in layers:
            h = h + layer(h)
    assert len(logits) == L
    torch.testing.assert_close(mr.hf_load_balancing_loss(logits, k),
                               _reference_aux([lg.detach() for lg in logits], E, k), rtol=1e-12, atol=0)
