"""moe_routing/layer.py: MoELayer (float64) against the naive per-token loop in `reference.py`: outputs and
gradients of x, the router weight and every expert weight; plus grouped_mm vs loop experts (fp32) and bitwise
determinism."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_routing import MoELayer
from moe_routing.ops import capacity_keep_mask, expert_capacity

from conftest import needs_grouped_mm
from reference import layer_params, leaves_from_layer, reference_moe

torch.backends.cuda.matmul.allow_tf32 = False  # irrelevant on CPU, harmless

# float64 everywhere: layer and reference differ only by summation order
RTOL64, ATOL64 = 1e-10, 1e-12


def make_layer(D, F, E, k, *, seed=0, activation="swiglu", capacity_factor=None, drop_policy="weight",
               num_shared_experts=0, losses=(), **kw) -> MoELayer:
    torch.manual_seed(seed)
    layer = MoELayer(D, F, E, k, activation=activation, capacity_factor=capacity_factor, drop_policy=drop_policy,
                     num_shared_experts=num_shared_experts, losses=None if losses is None else list(losses),
                     backend="torch", **kw)
    # the default router init (std 0.02) gives near-uniform scores; a larger spread makes the choices and the
    # gate weights clearly distinct, so a wrong gate or a wrong expert shows up well above rounding
    with torch.no_grad():
        layer.router.weight.normal_(0.0, 1.0 / D ** 0.5 * 2.0)
    return layer.double()


def compare_with_reference(layer: MoELayer, x: torch.Tensor, *, seed=1, switch_aux_coeff=0.0, **ref_kw):
    """Run layer and reference on ``x`` with the same loss ``sum(y * g)`` (+ aux); compare y and all grads."""
    assert layer.router.weight.dtype == torch.float64 and layer.experts.w_up.dtype == torch.float64
    D = layer.hidden_size
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(x.shape, generator=gen, dtype=torch.float64)

    x_layer = x.detach().clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    y = layer(x_layer)
    assert y.shape == x.shape and y.dtype == x.dtype
    (y * g).sum().backward()

    leaves = leaves_from_layer(layer)
    x_ref = x.detach().clone().reshape(-1, D).requires_grad_(True)
    ref = reference_moe(x_ref, leaves, layer.top_k, layer.experts.activation,
                        capacity_factor=layer.capacity_factor, drop_policy=layer.drop_policy,
                        switch_aux_coeff=switch_aux_coeff, **ref_kw)
    loss_ref = (ref.y * g.reshape(-1, D)).sum()
    if ref.aux is not None:
        loss_ref = loss_ref + ref.aux
    names = list(leaves.named())
    grads = torch.autograd.grad(loss_ref, [x_ref] + [leaves.named()[n] for n in names], allow_unused=True)

    torch.testing.assert_close(y.detach().reshape(-1, D), ref.y.detach(), rtol=RTOL64, atol=ATOL64)
    torch.testing.assert_close(x_layer.grad.reshape(-1, D), grads[0], rtol=RTOL64, atol=ATOL64)
    params = layer_params(layer)
    assert set(params) == set(names)
    for name, ref_grad in zip(names, grads[1:]):
        got = params[name].grad
        if ref_grad is None:  # e.g. router weight with no gradient path: the layer must not invent one
            assert got is None or torch.count_nonzero(got) == 0, name
            continue
        assert got is not None, f"{name} got no gradient"
        torch.testing.assert_close(got, ref_grad, rtol=RTOL64, atol=ATOL64, msg=lambda m: f"{name}: {m}")

    stats = layer.last_stats
    assert stats["tokens_per_expert"].tolist() == ref.counts
    assert int(stats["dropped"]) == ref.dropped
    return ref


def rand_x(*shape, seed=123):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ------------------------------------------------------------------------------------------- the main grid
@pytest.mark.parametrize("activation", ["swiglu", "gelu", "relu"])
@pytest.mark.parametrize("mode", ["dropless", "cap-weight", "cap-position"])
@pytest.mark.parametrize("num_shared", [0, 1])
def test_layer_matches_naive_loop(activation, mode, num_shared):
    cf, policy = {"dropless": (None, "weight"), "cap-weight": (0.75, "weight"),
                  "cap-position": (0.75, "position")}[mode]
    D, F, E, k, T = 7, 5, 4, 2, 16
    seed = {"swiglu": 0, "gelu": 10, "relu": 20}[activation] + {"dropless": 0, "cap-weight": 3}.get(mode, 6)
    layer = make_layer(D, F, E, k, seed=seed + num_shared, activation=activation,
                       capacity_factor=cf, drop_policy=policy, num_shared_experts=num_shared)
    x = rand_x(T, D, seed=7)
    ref = compare_with_reference(layer, x)
    if cf is None:
        assert ref.dropped == 0 and sum(ref.counts) == T * k
    else:
        # capacity ceil(0.75 * 16 * 2 / 4) = 6 slots per expert: 24 < 32 pairs, so drops must happen
        assert ref.dropped >= T * k - 6 * E
        assert max(ref.counts) <= 6
        assert sum(ref.counts) == T * k - ref.dropped


@pytest.mark.parametrize("policy", ["weight", "position"])
def test_capacity_policies_drop_different_pairs(policy):
    """With capacity 1 and a single expert both policies must keep exactly one token; "position" keeps token 0,
    "weight" keeps the largest gate (sigmoid gates differ per token, softmax over one expert is always 1)."""
    D, F, E, k, T = 5, 3, 1, 1, 6
    layer = make_layer(D, F, E, k, capacity_factor=1.0 / T, drop_policy=policy,
                       router_kwargs={"score_func": "sigmoid", "normalize": False})
    x = rand_x(T, D, seed=3)
    ref = compare_with_reference(layer, x, score_func="sigmoid", normalize=False)
    assert ref.dropped == T - 1 and ref.counts == [1]
    kept_tokens = [t for (t, _, _), keep in zip(ref.pairs, ref.kept) if keep]
    if policy == "position":
        assert kept_tokens == [0]
    else:
        weights = [float(w.detach()) for (_, _, w) in ref.pairs]
        assert kept_tokens == [max(range(T), key=lambda t: weights[t])]
    # tokens whose only pair was dropped get exactly zero output
    y = layer(x)
    dropped_tokens = [t for t in range(T) if t not in kept_tokens]
    assert torch.count_nonzero(y[dropped_tokens]) == 0


def test_capacity_ties_keep_token_order():
    """E=1, k=1 softmax: every gate is exactly 1.0, so the weight policy must fall back to token order."""
    D, F, T = 6, 4, 9
    for policy in ("weight", "position"):
        layer = make_layer(D, F, 1, 1, capacity_factor=0.5, drop_policy=policy)
        x = rand_x(T, D, seed=11)
        ref = compare_with_reference(layer, x)
        kept_tokens = [t for (t, _, _), keep in zip(ref.pairs, ref.kept) if keep]
        assert kept_tokens == list(range(5))  # ceil(0.5 * 9) = 5
        y = layer(x)
        assert torch.count_nonzero(y[5:]) == 0 and torch.count_nonzero(y[:5], dim=-1).min() > 0


# ------------------------------------------------------------------------------------------------- sizes
@pytest.mark.parametrize("D,F,E,k,shape", [
    (7, 5, 4, 2, (1, 7)),            # T = 1
    (33, 9, 5, 2, (11, 33)),         # odd hidden size
    (33, 7, 3, 1, (2, 5, 33)),       # odd hidden, [B, S, D]
    (7, 5, 1, 1, (9, 7)),            # E = 1
    (7, 5, 3, 3, (10, 7)),           # k = E
    (7, 5, 3, 3, (1, 1, 7)),         # k = E, T = 1, [B, S, D]
    (8, 6, 6, 4, (3, 4, 8)),         # [B, S, D], many experts per token
])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_sizes(D, F, E, k, shape, activation):
    layer = make_layer(D, F, E, k, activation=activation, seed=D * 100 + E * 10 + k)
    x = rand_x(*shape, seed=D + E)
    ref = compare_with_reference(layer, x)
    T = x.numel() // D
    assert sum(ref.counts) == T * k
    if k == E:  # every token goes to every expert
        assert ref.counts == [T] * E


@pytest.mark.parametrize("shared", [0, 1])
def test_bsd_and_td_inputs_agree(shared):
    """[B, S, D] gives exactly the [T, D] result reshaped (no sequence-dependent behaviour with losses=[])."""
    layer = make_layer(7, 5, 4, 2, num_shared_experts=shared)
    x = rand_x(3, 4, 7)
    with torch.no_grad():
        assert torch.equal(layer(x).reshape(12, 7), layer(x.reshape(12, 7)))


def test_expert_with_zero_tokens_gets_exactly_zero_grad():
    """Bias the router so expert 2 is never chosen: its count is 0 and its weight gradients are exactly 0."""
    D, F, E, k, T = 7, 5, 4, 2, 20
    for capacity_factor in (None, 1.0):
        layer = make_layer(D, F, E, k, capacity_factor=capacity_factor)
        x = rand_x(T, D, seed=5)
        x[:, 0] = x[:, 0].abs() + 1.0                  # feature 0 is always >= 1 ...
        with torch.no_grad():
            layer.router.weight[2] = 0.0
            layer.router.weight[2, 0] = -50.0          # ... so expert 2's logit is <= -50 for every token
        ref = compare_with_reference(layer, x)
        assert ref.counts[2] == 0
        assert int(layer.last_stats["tokens_per_expert"][2]) == 0
        assert int(layer.last_stats["dead_experts"]) >= 1
        for w in (layer.experts.w_gate, layer.experts.w_up, layer.experts.w_down):
            assert w.grad is not None
            assert torch.count_nonzero(w.grad[2]) == 0
            assert torch.count_nonzero(w.grad[[0, 1, 3]]) > 0  # the others do learn
        # top-k-then-softmax with losses=[]: an unchosen expert's logit gets no gradient either
        assert torch.count_nonzero(layer.router.weight.grad[2]) == 0


@pytest.mark.parametrize("router_kwargs,ref_kw", [
    ({"score_func": "sigmoid"}, {"score_func": "sigmoid"}),
    ({"softmax_before_topk": True}, {"softmax_before_topk": True}),
    ({"softmax_before_topk": True, "normalize": True}, {"softmax_before_topk": True, "normalize": True}),
])
def test_router_variants(router_kwargs, ref_kw):
    layer = make_layer(7, 5, 5, 2, router_kwargs=router_kwargs, capacity_factor=0.8)
    x = rand_x(13, 7, seed=17)
    ref = compare_with_reference(layer, x, **ref_kw)
    assert ref.dropped > 0


# ------------------------------------------------------------------------------------------- default losses
def test_default_losses_switch_aux_in_gradients():
    """losses=None (TopK softmax default: switch aux 1e-2): the aux loss's gradient reaches the router weight
    without the user adding it; the reference adds coeff * E * sum f_i P_i to its loss explicitly."""
    D, F, E, k, T = 7, 5, 4, 2, 12
    layer = make_layer(D, F, E, k, losses=None)
    x = rand_x(2, 6, D, seed=21)
    ref = compare_with_reference(layer, x, switch_aux_coeff=1e-2)
    # the aux value the layer logs equals the independent computation
    (logged,) = layer.last_aux_losses.values()
    torch.testing.assert_close(logged.double(), ref.aux.detach(), rtol=1e-10, atol=1e-14)

    # the forward value is untouched by the injected aux loss: same output as the losses=[] layer
    plain = make_layer(D, F, E, k, losses=())
    plain.load_state_dict(layer.state_dict())
    with torch.no_grad():
        assert torch.equal(layer(x), plain(x))

    # and it matters: without it, the router gradient differs by more than rounding
    router_grad_with_aux = layer.router.weight.grad.clone()
    layer.losses = []
    compare_with_reference(layer, x)
    diff = (router_grad_with_aux - layer.router.weight.grad).abs().max()
    assert diff > 1e-6


# ------------------------------------------------------------------------------------- grouped_mm vs loop
@needs_grouped_mm
@pytest.mark.parametrize("activation", ["swiglu", "relu"])
@pytest.mark.parametrize("capacity_factor", [None, 0.75])
def test_grouped_mm_matches_loop_fp32(activation, capacity_factor):
    D, F, E, k, T = 8, 12, 5, 2, 37
    torch.manual_seed(0)
    loop = MoELayer(D, F, E, k, activation=activation, capacity_factor=capacity_factor, expert_impl="loop",
                    losses=[], num_shared_experts=1)
    grouped = MoELayer(D, F, E, k, activation=activation, capacity_factor=capacity_factor,
                       expert_impl="grouped_mm", losses=[], num_shared_experts=1)
    grouped.load_state_dict(loop.state_dict())
    with torch.no_grad():  # make expert 4 empty so the grouped path sees a zero-size group
        for layer in (loop, grouped):
            layer.router.weight[4] = -1.0
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(4)).abs()  # x >= 0: expert 4's logit < 0
    g = torch.randn(T, D, generator=torch.Generator().manual_seed(5))
    outs = []
    for layer in (loop, grouped):
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        (y * g).sum().backward()
        outs.append((y.detach(), xi.grad, {n: p.grad for n, p in layer.named_parameters()}))
    assert int(loop.last_stats["tokens_per_expert"][4]) == 0
    assert loop.last_stats["tokens_per_expert"].tolist() == grouped.last_stats["tokens_per_expert"].tolist()
    (y_l, gx_l, gp_l), (y_g, gx_g, gp_g) = outs
    torch.testing.assert_close(y_g, y_l, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx_g, gx_l, rtol=1e-5, atol=1e-5)
    assert set(gp_l) == set(gp_g)
    for name in gp_l:
        torch.testing.assert_close(gp_g[name], gp_l[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    assert torch.count_nonzero(gp_g["experts.w_up"][4]) == 0


@needs_grouped_mm
def test_grouped_mm_rejects_unaligned_sizes():
    layer = MoELayer(7, 12, 4, 2, expert_impl="grouped_mm", losses=[])
    with pytest.raises(ValueError, match="grouped_mm"):
        layer(torch.randn(5, 7))


def test_auto_impl_float64_uses_loop_and_matches_reference():
    """expert_impl='auto' on a float64 layer with aligned sizes must fall back to the loop (no float64
    _grouped_mm) and still be exact."""
    layer = make_layer(8, 4, 4, 2, expert_impl="auto")
    compare_with_reference(layer, rand_x(9, 8, seed=2))


# ------------------------------------------------------------------------------------------------ determinism
@pytest.mark.parametrize("dtype,impl", [(torch.float64, "loop"),
                                        pytest.param(torch.float32, "grouped_mm", marks=needs_grouped_mm),
                                        (torch.float32, "loop")])
@pytest.mark.parametrize("capacity_factor", [None, 0.8])
def test_bitwise_deterministic(dtype, impl, capacity_factor):
    torch.manual_seed(0)
    layer = MoELayer(16, 8, 6, 2, capacity_factor=capacity_factor, expert_impl=impl,
                     num_shared_experts=1).to(dtype)
    x = torch.randn(4, 9, 16, generator=torch.Generator().manual_seed(1), dtype=dtype)
    results = []
    for _ in range(2):
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        y.square().sum().backward()
        results.append((y.detach(), xi.grad, [p.grad.clone() for p in layer.parameters()]))
    (y1, gx1, gp1), (y2, gx2, gp2) = results
    assert torch.equal(y1, y2)
    assert torch.equal(gx1, gx2)
    assert all(torch.equal(a, b) for a, b in zip(gp1, gp2))


# ------------------------------------------------------------------------------- conservation of routed pairs
@settings(max_examples=25, deadline=None)
@given(T=st.integers(1, 40), E=st.integers(1, 8), data=st.data())
def test_dispatched_rows_equal_routed_minus_dropped(T, E, data):
    """Rows the experts actually receive == routed pairs - drops, with drops from `last_stats["dropped"]`
    checked against an independent `capacity_keep_mask` on the router's own decision."""
    K = data.draw(st.integers(1, E))
    cf = data.draw(st.one_of(st.none(), st.sampled_from([0.25, 0.5, 1.0, 1.5])))
    policy = data.draw(st.sampled_from(["weight", "position"]))
    seed = data.draw(st.integers(0, 2 ** 16))
    torch.manual_seed(seed)
    layer = MoELayer(4, 4, E, K, capacity_factor=cf, drop_policy=policy, losses=[], backend="torch")
    dispatched = []
    layer.experts.register_forward_hook(lambda mod, args, out: dispatched.append(
        (args[0].shape[0], args[1].clone())))
    x = torch.randn(T, 4)
    with torch.no_grad():
        decision = layer.router(x)
        y = layer(x)
    assert y.shape == (T, 4)
    (rows, counts_E), = dispatched
    dropped = int(layer.last_stats["dropped"])
    routed = decision.token_N.numel()
    assert routed == T * K
    assert rows == routed - dropped == int(counts_E.sum())
    assert layer.last_stats["tokens_per_expert"].tolist() == counts_E.tolist()
    if cf is None:
        assert dropped == 0
    else:
        cap = expert_capacity(cf, T, K, E)
        keep = capacity_keep_mask(decision.expert_N, decision.weight_N, E, cap, policy)
        assert rows == int(keep.sum())
        assert int(counts_E.max()) <= cap
        full = torch.bincount(decision.expert_N, minlength=E)
        assert dropped == int((full - full.clamp(max=cap)).sum())
        torch.testing.assert_close(layer.last_stats["drop_rate"].double(),
                                   torch.tensor(dropped / routed, dtype=torch.float64), rtol=1e-12, atol=0.0)
