"""Bad input raises ValueError/TypeError naming the argument, before any compute; autocast, empty batches and
non-finite input behave as documented."""
from __future__ import annotations

import pytest
import torch

import moe_routing as mr
from moe_routing import MoELayer, RoutingContext, TopKRouter, routing_context
from moe_routing.ops import capacity_keep_mask, combine, grouped_mm, permute, resolve_backend
from moe_routing.routers import ReLURouter

D, F, E = 16, 8, 4


def layer(**kw):
    torch.manual_seed(0)
    return MoELayer(D, F, E, kw.pop("top_k", 2), **kw)


class ComputeSpy:
    """Records whether the router ran: a validation error must come before it."""

    def __init__(self, moe: MoELayer):
        self.calls = 0
        moe.router.register_forward_pre_hook(self._hook)

    def _hook(self, *args):
        self.calls += 1


# --------------------------------------------------------------------------------------------------------------
# Constructor arguments
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(top_k=0), ValueError, "top_k"),
    (dict(top_k=-1), ValueError, "top_k"),
    (dict(top_k=E + 1), ValueError, "top_k"),
    (dict(top_k=1.5), TypeError, "top_k"),
    (dict(top_k=True), TypeError, "top_k"),
    (dict(hidden_size=True), TypeError, "hidden_size"),
    (dict(num_experts=0, top_k=1), ValueError, "num_experts"),
    (dict(num_experts=-2, top_k=1), ValueError, "num_experts"),
    (dict(hidden_size=0), ValueError, "hidden_size"),
    (dict(ffn_hidden_size=0), ValueError, "ffn_hidden_size"),
    (dict(capacity_factor=0.0), ValueError, "capacity_factor"),
    (dict(capacity_factor=-1.0), ValueError, "capacity_factor"),
    (dict(capacity_factor=float("nan")), ValueError, "capacity_factor"),
    (dict(capacity_factor=float("inf")), ValueError, "capacity_factor"),
    (dict(capacity_factor="1.0"), TypeError, "capacity_factor"),
    (dict(capacity_factor=True), TypeError, "capacity_factor"),
    (dict(activation="tanh"), ValueError, "activation"),
    (dict(router="hash-ish"), ValueError, "router"),
    (dict(backend="fortran"), ValueError, "backend"),
    (dict(drop_policy="random"), ValueError, "drop_policy"),
    (dict(expert_impl="magic"), ValueError, "expert_impl"),
    (dict(num_shared_experts=-1), ValueError, "num_shared_experts"),
    (dict(losses=["switch"]), TypeError, "losses"),
    (dict(router_kwargs={"score_func": "relu"}), ValueError, "score_func"),
    (dict(router_kwargs={"num_groups": 3, "topk_groups": 1}), ValueError, "num_groups"),
    (dict(router_kwargs={"num_groups": 2}), ValueError, "topk_groups"),
    (dict(router_kwargs={"num_groups": 2, "topk_groups": 3}), ValueError, "topk_groups"),
    (dict(router_kwargs={"bias_update_rate": 0.0}), ValueError, "bias_update_rate"),
    (dict(router_kwargs={"jitter_eps": 1.0}), ValueError, "jitter_eps"),
])
def test_constructor_rejects_bad_arguments(kwargs, exc, match):
    args = dict(hidden_size=D, ffn_hidden_size=F, num_experts=E, top_k=2)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        MoELayer(**args)


def test_topk_router_rejects_group_config_that_cannot_supply_k():
    with pytest.raises(ValueError, match="topk_groups"):
        TopKRouter(D, 8, 3, num_groups=4, topk_groups=1)  # one group of 2 experts cannot give 3


@pytest.mark.parametrize("E_, D_", [(E + 1, D), (E, D + 1)])
def test_router_instance_with_mismatched_shape(E_, D_):
    with pytest.raises(ValueError, match="num_experts=.*hidden_size="):
        MoELayer(D, F, E, 2, router=TopKRouter(D_, E_, 2))


def test_router_instance_matching_shape_is_used():
    r = TopKRouter(D, E, 2, score_func="sigmoid")
    moe = MoELayer(D, F, E, 2, router=r)
    assert moe.router is r


def test_capacity_factor_accepts_positive_and_none():
    assert MoELayer(D, F, E, 2, capacity_factor=0.5).capacity_factor == 0.5
    assert MoELayer(D, F, E, 2).capacity_factor is None


# --------------------------------------------------------------------------------------------------------------
# Forward input checks (before any compute)
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("x,exc,match", [
    (torch.ones(3, D, dtype=torch.long), TypeError, "x must be a floating-point"),
    (torch.ones(3, D, dtype=torch.bool), TypeError, "x must be a floating-point"),
    (torch.randn(3, D + 1), ValueError, "hidden_size"),
    (torch.randn(2, 3, D - 1), ValueError, "hidden_size"),
    (torch.tensor(1.0), ValueError, "hidden_size"),
    (torch.randn(3, D, dtype=torch.bfloat16), TypeError, "dtype"),
    (torch.randn(3, D, dtype=torch.float64), TypeError, "dtype"),
    (torch.randn(3, D, device="meta"), ValueError, "x is on meta"),
])
def test_forward_rejects_bad_x_before_compute(x, exc, match):
    moe = layer()
    spy = ComputeSpy(moe)
    with pytest.raises(exc, match=match):
        moe(x)
    assert spy.calls == 0


def test_forward_rejects_non_tensor():
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        layer()([[0.0] * D])


def test_padding_mask_checks():
    moe = layer()
    spy = ComputeSpy(moe)
    x = torch.randn(2, 3, D)
    with pytest.raises(ValueError, match="padding_mask"):
        moe(x, RoutingContext(padding_mask=torch.zeros(5, dtype=torch.bool)))
    with pytest.raises(ValueError, match="padding_mask"):
        moe(x, RoutingContext(padding_mask=torch.zeros(3, 2, 2, dtype=torch.bool)))
    assert spy.calls == 0
    with pytest.raises(TypeError, match="padding_mask"):
        RoutingContext(padding_mask=torch.zeros(2, 3))
    # the right number of elements in another layout is fine: [T] for a [B, S, D] input
    y = moe(x, RoutingContext(padding_mask=torch.zeros(6, dtype=torch.bool)))
    assert y.shape == x.shape


def test_token_ids_checks():
    with pytest.raises(TypeError, match="token_ids"):
        RoutingContext(token_ids=torch.zeros(3))
    with pytest.raises(ValueError, match="token_ids"):
        RoutingContext(token_ids=torch.zeros(3, dtype=torch.long)).token_ids_T(4)


@pytest.mark.parametrize("losses", [None, []])
def test_seq_lens_must_sum_to_token_count(losses):
    moe = layer(losses=losses)
    spy = ComputeSpy(moe)
    x = torch.randn(7, D)
    with pytest.raises(ValueError, match="seq_lens"):
        moe(x, RoutingContext(seq_lens=[3, 3]))
    with pytest.raises(ValueError, match="seq_lens"):
        moe(x, RoutingContext(seq_lens=[4, 4]))
    with pytest.raises(ValueError, match="seq_lens"):
        moe(x, RoutingContext(seq_lens=[9, -2]))
    assert spy.calls == 0
    assert moe(x, RoutingContext(seq_lens=[3, 4])).shape == x.shape


def test_forced_experts_checks():
    moe = layer(layer_idx=0)
    x = torch.randn(5, D)
    good = torch.tensor([[0, 1]] * 5)
    for bad, what in [(torch.full((5, 2), E), "outside"), (torch.full((5, 2), -2), "outside"),
                      (torch.zeros(5, 3, dtype=torch.long), "shape"), (torch.zeros(4, 2, dtype=torch.long), "shape"),
                      (torch.zeros(10, dtype=torch.long), "shape"), (torch.zeros(5, 2), "integer")]:
        with pytest.raises(ValueError, match=rf"forced_experts\[0\].*{what}"):
            moe(x, RoutingContext(forced_experts={0: bad}))
    assert moe(x, RoutingContext(forced_experts={0: good})).shape == x.shape
    # through routing_context the key is the layer's index
    with routing_context(moe, forced_experts={0: torch.full((5, 2), 99)}):
        with pytest.raises(ValueError, match="forced_experts"):
            moe(x)


# --------------------------------------------------------------------------------------------------------------
# Non-finite input
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_raises_on_cpu(bad):
    moe = layer()
    x = torch.randn(6, D)
    x[3, 5] = bad
    with pytest.raises(ValueError, match="NaN/inf"):
        moe(x)
    # the router alone raises too, never handing out-of-range expert ids to dispatch
    with pytest.raises(ValueError, match="NaN/inf"):
        moe.router(x)


def test_non_finite_router_weight_raises_on_cpu():
    moe = layer()
    with torch.no_grad():
        moe.router.weight[1, 0] = float("nan")
    with pytest.raises(ValueError, match="router logits contain NaN/inf for 4 token"):
        moe(torch.randn(4, D))


def test_finite_extreme_input_gives_in_range_experts():
    moe = layer()
    x = torch.randn(8, D) * 1e30  # huge but finite logits: softmax saturates, ids stay valid
    d = moe.router(x)
    assert bool(((d.expert_N >= 0) & (d.expert_N < E)).all())


# --------------------------------------------------------------------------------------------------------------
# Empty batches
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(0, D), (2, 0, D), (0, 3, D)])
def test_empty_batch_returns_empty_output(shape):
    moe = layer()
    x = torch.randn(*shape, requires_grad=True)
    y = moe(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    y.sum().backward()
    assert x.grad.shape == x.shape
    moe.return_aux_loss = True
    y2, aux = moe(x)
    assert y2.shape == x.shape and aux.item() == 0.0


def test_empty_batch_still_validates():
    moe = layer()
    with pytest.raises(ValueError, match="hidden_size"):
        moe(torch.randn(0, D + 1))
    with pytest.raises(TypeError, match="floating-point"):
        moe(torch.zeros(0, D, dtype=torch.long))


# --------------------------------------------------------------------------------------------------------------
# Autocast
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_bf16_autocast_on_cpu(x_dtype):
    moe = layer(num_shared_experts=1)
    torch.manual_seed(1)
    x32 = torch.randn(4, 6, D)
    ref = moe(x32.to(x_dtype).float())
    x = x32.to(x_dtype).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = moe(x)
    assert y.dtype == x_dtype and y.shape == x.shape
    torch.testing.assert_close(y.float(), ref, rtol=5e-2, atol=3e-2 * ref.abs().max().item())
    # not identical: the experts really ran in bf16
    assert not torch.equal(y.float(), ref)
    y.float().square().sum().backward()
    assert moe.router.weight.grad.dtype == torch.float32 and moe.router.weight.grad.abs().max() > 0
    assert moe.experts.w_up.grad.dtype == torch.float32
    assert x.grad.dtype == x_dtype


def test_dtype_mismatch_outside_autocast_names_dtypes():
    moe = layer()
    with pytest.raises(TypeError, match=r"x has dtype torch.bfloat16 but the expert weights are torch.float32"):
        moe(torch.randn(3, D, dtype=torch.bfloat16))
    # a layer cast to the input dtype accepts it
    moe_bf16 = layer().to(torch.bfloat16)
    assert moe_bf16(torch.randn(3, D, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_bf16_autocast_output_tracks_fp32_for_bsd_and_td_shapes():
    # the same tokens as [B, S, D] and as [T, D] give the same autocast output; both close to the fp32 layer
    moe = layer(losses=[])
    torch.manual_seed(3)
    x = torch.randn(2, 5, D)
    ref = moe(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_bsd = moe(x)
        y_td = moe(x.reshape(-1, D))
    assert y_bsd.dtype == torch.float32 and y_td.dtype == torch.float32
    torch.testing.assert_close(y_td.reshape(2, 5, D), y_bsd, rtol=0, atol=0)
    torch.testing.assert_close(y_bsd, ref, rtol=5e-2, atol=3e-2 * ref.abs().max().item())


@pytest.mark.parametrize("router", [TopKRouter(D, E, top_k=1), ReLURouter(D, E, top_k=3)])
def test_router_instance_with_other_top_k_raises(router):
    with pytest.raises(ValueError, match=rf"router has top_k={router.top_k} but the layer has top_k=2"):
        MoELayer(D, F, E, 2, router=router)


def test_hint_arguments_are_checked():
    x, rows = torch.randn(3, 4), torch.tensor([0, 1, 2, 0])
    for kw, match in ((dict(top_k=0), "top_k"), (dict(top_k=2), "top_k=2 needs N = T\\*K = 6"),
                      (dict(max_pairs=-1), "max_pairs"), (dict(max_pairs=1.5), "max_pairs")):
        with pytest.raises(ValueError, match=match):
            permute(x, rows, "torch", **kw)
    with pytest.raises(ValueError, match="max_pairs"):
        combine(torch.randn(4, 2), torch.rand(4), torch.arange(4), torch.tensor([0, 0, 1, 2]), 3, None, "torch", 0)


# --------------------------------------------------------------------------------------------------------------
# Finite numbers, bools that are not ints, across the package (one helper: moe_routing.validation)
# --------------------------------------------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("make,error,match", [
    (lambda: mr.SwitchAuxLoss(NAN), ValueError, "SwitchAuxLoss coeff must be a finite number >= 0"),
    (lambda: mr.ZLoss(INF), ValueError, "ZLoss coeff"),
    (lambda: mr.SequenceAuxLoss(True), TypeError, "SequenceAuxLoss coeff must be a number"),
    (lambda: mr.ERCLoss(coeff=-1.0), ValueError, "ERCLoss coeff"),
    (lambda: mr.ERCLoss(alpha=NAN), ValueError, "alpha must be a finite number"),
    (lambda: mr.ERCLoss(chunk_size=True), TypeError, "chunk_size must be an int"),
    (lambda: mr.DPSLoss(concentration=NAN), ValueError, "concentration"),
    (lambda: mr.TopKRouter(D, E, 2, scaling_factor=NAN), ValueError, "scaling_factor must be a finite number"),
    (lambda: mr.TopKRouter(D, E, 2, bias_update_rate=INF), ValueError, "bias_update_rate must be a finite"),
    (lambda: mr.TopKRouter(D, E, 2, init_std=NAN), ValueError, "init_std must be a finite number"),
    (lambda: mr.TopKRouter(D, E, 2, jitter_eps=NAN), ValueError, "jitter_eps"),
    (lambda: mr.ReLURouter(D, E, 2, alpha=INF), ValueError, "alpha must be a finite number"),
    (lambda: mr.ReLURouter(D, E, 2, l1_coeff=NAN), ValueError, "l1_coeff"),
    (lambda: mr.SinkhornRouter(D, E, 2, tol=NAN), ValueError, "tol must be a finite number"),
    (lambda: mr.SinkhornRouter(D, E, 2, max_iters=True), TypeError, "max_iters must be an int"),
    (lambda: mr.ExpertChoiceRouter(D, E, 2, capacity_factor=INF), ValueError, "capacity_factor"),
    (lambda: mr.HashRouter(D, E, 2, vocab_size=True), TypeError, "vocab_size must be an int"),
    (lambda: mr.HyperRouter(D, E, 2, hyper_hidden=True), TypeError, "hyper_hidden must be an int"),
    (lambda: mr.RecurrentRouterGroup(D, E, 2, num_layers=True), TypeError, "num_layers must be an int"),
    (lambda: mr.GroupedExperts(E, D, True), TypeError, "ffn_hidden_size must be an int"),
    (lambda: mr.MoELayer(D, 4, E, 2, capacity_factor=1e308 * 10), ValueError, "capacity_factor"),
    (lambda: mr.MoELayer(D, 4, E, 2, layer_idx=True), TypeError, "layer_idx must be an int"),
    (lambda: mr.MoELayer(D, 4, E, 2, track_stats=1), TypeError, "track_stats must be a bool"),
])
def test_non_finite_numbers_and_bools_are_rejected_with_the_argument_named(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_huge_capacity_factor_runs_dropless():
    """1e308 is finite: capacity is min(ceil(cf*T*k/E), T), so nothing overflows and nothing drops."""
    layer = mr.MoELayer(D, 4, E, 2, capacity_factor=1e308)
    x = torch.randn(11, D)
    y = layer(x)
    dropless = mr.MoELayer(D, 4, E, 2)
    dropless.load_state_dict(layer.state_dict())
    torch.testing.assert_close(y, dropless(x), rtol=0, atol=0)
    assert int(layer.last_stats["dropped"]) == 0


def test_empty_batch_clears_the_previous_batch_stats():
    moe = mr.MoELayer(D, 4, E, 2)
    moe(torch.randn(5, D))
    assert moe.last_stats and mr.aux_losses(moe)[""]
    moe(torch.randn(0, D))
    assert moe.last_stats == {} and mr.aux_losses(moe)[""] == {}
    assert mr.routing_report(moe) == {}


def test_other_bad_inputs():
    with pytest.raises(ValueError, match="drop_policy"):
        capacity_keep_mask(torch.tensor([0, 1]), torch.ones(2), 2, 1, "random")
    counts = torch.tensor([2])
    with pytest.raises(ValueError, match="expert_impl"):
        grouped_mm(torch.randn(2, 4), torch.randn(1, 4, 4), counts, counts.int(), "fast")
    with pytest.raises(ValueError, match="grouped_mm"):
        grouped_mm(torch.randn(2, 4, dtype=torch.float64), torch.randn(1, 4, 4, dtype=torch.float64), counts,
                   counts.int(), "grouped_mm")
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("tpu")
