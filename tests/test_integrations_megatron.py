"""moe_routing.integrations.megatron against megatron-core itself, on CPU over gloo.

mcore assumes CUDA in a few places; moe_routing.integrations.megatron_cpu points them at the CPU (its docstring
says which): ``cpu_device`` for every test here, ``cpu_streams`` (the all-to-all dispatcher's side stream and
split sizes) where that dispatcher runs. mcore's own ``TopKRouter.forward`` is not run (0.16.1's
``router_gating_linear`` names ``te_general_gemm``, defined only with Transformer Engine); the peer checks call
its routing and loss functions and its ``_apply_*`` loss methods on logits instead.
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

pytest.importorskip("megatron.core", reason="megatron-core is not installed (optional extra 'megatron')")

import moe_routing as mr  # noqa: E402
from moe_routing.integrations import megatron as mg  # noqa: E402
from moe_routing.integrations import megatron_cpu  # noqa: E402
from moe_routing.integrations.megatron_cpu import cpu_device, cpu_process_group  # noqa: E402
from megatron.core.transformer.moe import moe_utils  # noqa: E402

E, D, FF, K = 4, 16, 24, 2


@pytest.fixture(scope="module")
def mcore():
    """A gloo world of size 1 with mcore's model-parallel state (tp = pp = ep = 1), mcore on the CPU."""
    if dist.is_initialized():
        pytest.skip("a torch.distributed process group is already initialised in this process")
    try:
        with cpu_device(), cpu_process_group() as pg:
            yield pg
    finally:
        mg.clear_logged_losses()


@pytest.fixture
def cpu_streams():
    """The all-to-all dispatcher's CUDA side stream and split sizes on the CPU (see megatron_cpu)."""
    with megatron_cpu.cpu_streams():
        yield


def make_config(**overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig

    kw = dict(num_layers=2, hidden_size=D, ffn_hidden_size=FF, num_attention_heads=1, num_moe_experts=E,
              moe_router_topk=K, moe_ffn_hidden_size=FF, use_cpu_initialization=True,
              moe_token_dispatcher_type="allgather", gated_linear_unit=True, activation_func=F.silu,
              add_bias_linear=False, params_dtype=torch.float32, moe_aux_loss_coeff=0.0)
    kw.update(overrides)
    return TransformerConfig(**kw)


def build(spec, config, layer_number=1):
    return mg.build_moe_layer(spec, config, layer_number)


def ours_like(layer, router=None, **kw) -> mr.MoELayer:
    """Our MoELayer with the mcore layer's router and expert weights (SwiGLU: fc1 = [gate; up])."""
    inner = layer.router.router
    ours = mr.MoELayer(D, FF, E, inner.top_k, router=router if router is not None else copy.deepcopy(inner),
                       backend="torch", **kw)
    with torch.no_grad():
        for e, mlp in enumerate(layer.experts.local_experts):
            ours.experts.w_gate[e].copy_(mlp.linear_fc1.weight[:FF].t())
            ours.experts.w_up[e].copy_(mlp.linear_fc1.weight[FF:].t())
            ours.experts.w_down[e].copy_(mlp.linear_fc2.weight.t())
    return ours


def assert_close(got, want, what):
    got, want = got.detach(), want.detach()
    scale = want.abs().max().clamp_min(1e-6)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6 * float(scale), msg=lambda m: f"{what}: {m}")


def run_both(layer, ours, x_SBD, padding_BS=None):
    """Forward + backward of ``sum(y**2)`` through the mcore layer ([S, B, D]) and ours ([B, S, D])."""
    x1 = x_SBD.clone().requires_grad_()
    y1, bias = layer(x1, padding_mask=padding_BS) if padding_BS is not None else layer(x1)
    assert bias is None
    y1.square().sum().backward()
    x2 = x_SBD.transpose(0, 1).clone().requires_grad_()
    ctx = None if padding_BS is None else mr.RoutingContext(padding_mask=padding_BS)
    y2 = ours(x2, ctx)
    y2.square().sum().backward()
    assert_close(y1.transpose(0, 1), y2, "output")
    assert_close(x1.grad.transpose(0, 1), x2.grad, "input gradient")
    return y1, y2


def assert_same_grads(layer, ours):
    for (name, p), q in zip(layer.router.router.named_parameters(), ours.router.parameters()):
        assert_close(p.grad, q.grad, f"router {name} gradient")
    for e, mlp in enumerate(layer.experts.local_experts):
        fc1 = torch.cat([ours.experts.w_gate.grad[e].t(), ours.experts.w_up.grad[e].t()])
        assert_close(mlp.linear_fc1.weight.grad, fc1, f"expert {e} fc1 gradient")
        assert_close(mlp.linear_fc2.weight.grad, ours.experts.w_down.grad[e].t(), f"expert {e} fc2 gradient")


CASES = {
    "topk_softmax": ("topk", {"score_func": "softmax"}, lambda: [mr.SwitchAuxLoss(1e-1), mr.ZLoss(1e-2)]),
    "topk_sigmoid": ("topk", {"score_func": "sigmoid"},
                     lambda: [mr.SwitchAuxLoss(1e-1), mr.SequenceAuxLoss(1e-1), mr.ZLoss(1e-2)]),
    "relu": ("relu", {"l1_coeff": 1e-1}, lambda: None),  # ReMoE's L1 (the default loss)
    "expert_choice": ("expert_choice", {}, lambda: [mr.ZLoss(1e-2)]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_mcore_layer_with_our_router_equals_our_layer(mcore, case):
    router, kwargs, losses = CASES[case]
    torch.manual_seed(0)
    layer = build(mg.moe_layer_spec(router, num_experts=E, losses=losses(), **kwargs), make_config())
    assert isinstance(layer.router, mg.MegatronRouter)
    ours = ours_like(layer, losses=losses())
    run_both(layer, ours, torch.randn(7, 3, D))
    assert_same_grads(layer, ours)
    for name, value in ours.last_aux_losses.items():
        assert_close(layer.router.last_aux_losses[name], value, f"{name} value")


def test_erc_and_dpsl_losses_read_the_bound_experts(mcore):
    losses = lambda: [mr.ERCLoss(0.5, generator=torch.Generator().manual_seed(0)), mr.DPSLoss(0.1)]  # noqa: E731
    torch.manual_seed(8)
    layer = build(mg.moe_layer_spec("topk", num_experts=E, losses=losses()), make_config())
    with pytest.raises(ValueError, match="bind_experts"):
        layer(torch.randn(3, 2, D))
    assert mg.bind_experts(layer) == 1
    ours = ours_like(layer, losses=losses())
    run_both(layer, ours, torch.randn(7, 3, D))
    assert_same_grads(layer, ours)
    assert set(layer.router.last_aux_losses) == {"erc", "dpsl"}


def test_padding_mask_reaches_the_losses(mcore):
    losses = lambda: [mr.SwitchAuxLoss(1e-1), mr.SequenceAuxLoss(1e-1), mr.ZLoss(1e-2)]  # noqa: E731
    torch.manual_seed(1)
    layer = build(mg.moe_layer_spec("topk", num_experts=E, losses=losses()), make_config())
    ours = ours_like(layer, losses=losses())
    padding_BS = torch.zeros(3, 7, dtype=torch.bool)
    padding_BS[0, 5:] = True
    padding_BS[2, 1:] = True
    run_both(layer, ours, torch.randn(7, 3, D), padding_BS)
    assert_same_grads(layer, ours)


def test_recurrent_router_state_flows_between_mcore_layers(mcore):
    torch.manual_seed(2)
    builder = mg.router_builder("recurrent", proj_dim=8, losses=[mr.SwitchAuxLoss(1e-1)])
    spec = mg.with_router(mg.moe_layer_spec("topk", num_experts=E), builder)
    cfg = make_config()
    layers = [build(spec, cfg, 1), build(spec, cfg, 2)]
    group = builder.group
    assert [l.router.router for l in layers] == group.routers
    ours_group = mr.RecurrentRouterGroup(D, E, K, 2, proj_dim=8)
    ours_group.load_state_dict(group.state_dict())
    ours = torch.nn.ModuleList(ours_like(l, router=r, losses=[mr.SwitchAuxLoss(1e-1)])
                               for l, r in zip(layers, ours_group.routers))
    for _ in range(2):  # a second forward starts a fresh context at layer 0
        x = torch.randn(5, 3, D)
        x1 = x.clone().requires_grad_()
        y1 = layers[1](layers[0](x1)[0])[0]
        y1.square().sum().backward()
        x2 = x.transpose(0, 1).clone().requires_grad_()
        with mr.routing_context(ours):
            y2 = ours[1](ours[0](x2))
        y2.square().sum().backward()
        assert_close(y1.transpose(0, 1), y2, "output")
        assert_close(x1.grad.transpose(0, 1), x2.grad, "input gradient")
    for (name, p), q in zip(group.named_parameters(), ours_group.parameters()):
        assert_close(p.grad, q.grad, f"recurrent group {name} gradient")


def test_variable_k_router_refuses_the_dropless_all_to_all_dispatcher(mcore):
    with pytest.raises(ValueError, match="variable number of experts"):
        build(mg.moe_layer_spec("relu", num_experts=E), make_config(moe_token_dispatcher_type="alltoall"))


@pytest.mark.parametrize("setting", ["alltoall_capacity", "alltoall_topk_E", "allgather_topk_E"])
def test_variable_k_router_under_each_dispatch_setting(mcore, cpu_streams, setting):
    dispatcher, how = setting.split("_", 1)
    overrides = ({"moe_expert_capacity_factor": float(E), "moe_router_load_balancing_type": "none"}
                 if how == "capacity" else {"moe_router_topk": E})
    torch.manual_seed(3)
    spec = mg.moe_layer_spec("relu", num_experts=E, top_k=K, l1_coeff=1e-1)
    layer = build(spec, make_config(moe_token_dispatcher_type=dispatcher, **overrides))
    ours = ours_like(layer)
    run_both(layer, ours, torch.randn(6, 2, D))
    assert_same_grads(layer, ours)


@pytest.mark.parametrize("per_token", [False, True])
def test_aux_loss_gradient_follows_mcore_scaling(mcore, per_token):
    torch.manual_seed(4)
    losses = lambda: [mr.SwitchAuxLoss(1e-1), mr.ZLoss(1e-2)]  # noqa: E731
    layer = build(mg.moe_layer_spec("topk", num_experts=E, losses=losses()),
                  make_config(calculate_per_token_loss=per_token))
    ours = ours_like(layer, losses=losses())
    S, B = 5, 3
    x = torch.randn(S, B, D)
    moe_utils.MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(0.25))
    try:
        (layer(x)[0] * 0).sum().backward()  # only the aux loss reaches the router
    finally:
        moe_utils.MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    mr.set_aux_loss_scale(ours, 0.25 * (S * B if per_token else 1))
    (ours(x.transpose(0, 1)) * 0).sum().backward()
    assert ours.router.weight.grad.abs().max() > 0
    assert_close(layer.router.router.weight.grad, ours.router.weight.grad, "router gradient from the aux loss")


def test_losses_are_logged_in_mcore_tracker_without_coefficient(mcore):
    mg.clear_logged_losses()
    layer = build(mg.moe_layer_spec("topk", num_experts=E, losses=[mr.SwitchAuxLoss(0.5), mr.ZLoss(0.25)]),
                  make_config(), layer_number=2)
    layer(torch.randn(4, 2, D))
    for name, coeff in (("switch_aux", 0.5), ("z_loss", 0.25)):
        values = mg.logged_losses()[name]
        assert values.shape == (2,) and values[0] == 0
        assert_close(values[1], layer.router.last_aux_losses[name] / coeff, name)
    mg.clear_logged_losses()


def test_controllers_run_through_finalize_model_grads(mcore):
    torch.manual_seed(5)
    layer = build(mg.moe_layer_spec("relu", num_experts=E), make_config())
    ours = ours_like(layer)
    calls = []
    finalize = mg.with_controllers(lambda model, *a, **k: calls.append(len(model)) or "finalized")
    for _ in range(3):
        run_both(layer, ours, torch.randn(4, 2, D))
        assert layer.router.router.count_accum > 0
        assert finalize([layer]) == "finalized"
        mr.step(ours)
        assert layer.router.router.count_accum == 0
        assert_close(layer.router.router.l1_coeff, ours.router.l1_coeff, "ReMoE lambda")
    assert calls == [1, 1, 1]


# --- peer checks: our routing and losses against mcore's functions on the same logits ---

TOPK_SETTINGS = {
    # ours (TopKRouter kwargs) <-> mcore (topk_routing_with_score_function kwargs)
    "softmax_after_topk": ({"softmax_before_topk": False}, {"use_pre_softmax": False}),
    "softmax_before_topk": ({"softmax_before_topk": True}, {"use_pre_softmax": True}),
    "sigmoid_scaled": ({"score_func": "sigmoid", "scaling_factor": 2.5},
                       {"score_function": "sigmoid", "scaling_factor": 2.5}),
    "sigmoid_groups": ({"score_func": "sigmoid", "num_groups": 4, "topk_groups": 2, "group_score": "topk_sum"},
                       {"score_function": "sigmoid", "num_groups": 4, "group_topk": 2}),
}


@pytest.mark.parametrize("setting", sorted(TOPK_SETTINGS))
def test_topk_routing_equals_mcore(setting):
    ours_kw, mcore_kw = TOPK_SETTINGS[setting]
    torch.manual_seed(6)
    router = mr.TopKRouter(D, 8, 4, **ours_kw)
    decision = router(torch.randn(37, D))
    probs, routing_map = mg.decision_to_probs_map(decision)
    want_probs, want_map = moe_utils.topk_routing_with_score_function(decision.logits_TE.detach(), 4, **mcore_kw)
    assert torch.equal(routing_map, want_map)
    assert_close(probs.detach(), want_probs, "probs")


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_balance_losses_equal_mcore(mcore, score_func):
    """Coefficient conventions: SwitchAuxLoss(c) == mcore aux_loss with moe_aux_loss_coeff c; SequenceAuxLoss(c)
    with the B columns of [S, B] as sequences == mcore seq_aux_loss with coeff c; ZLoss(c) == moe_z_loss_coeff c
    (at tensor x context parallel size 1; mcore divides the z-loss coefficient by that size, so does the adapter).
    Megatron-Core has no sequence_load_balancing_loss_func since its router-fusion change (not in 0.16 nor
    0.19): its seq aux loss is ``TopKRouter._apply_seq_aux_loss``, checked here through its tracker value."""
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.moe.router import TopKRouter as McoreTopKRouter

    S, B, c_aux, c_seq, c_z = 9, 3, 0.3, 0.2, 0.1
    cfg = make_config(moe_router_load_balancing_type=["aux_loss", "seq_aux_loss"], moe_aux_loss_coeff=[c_aux, c_seq],
                      moe_z_loss_coeff=c_z, moe_router_score_function=score_func)
    peer = McoreTopKRouter(cfg, pg_collection=get_default_pg_collection())
    peer.set_layer_number(1)
    mg.clear_logged_losses()

    torch.manual_seed(7)
    router = mr.TopKRouter(D, E, K, score_func=score_func)
    decision = router(torch.randn(S * B, D))
    logits = decision.logits_TE.detach()
    inputs = mr.LossInputs(decision=decision, top_k=K, seq_T=torch.arange(S * B) % B, num_seqs=B)

    routing_map, scores = moe_utils.compute_routing_scores_for_aux_loss(logits, K, score_func)
    switch = moe_utils.switch_load_balancing_loss_func(scores, routing_map.sum(0), S * B, K, E, c_aux)
    assert_close(mr.SwitchAuxLoss(c_aux)(inputs).value.detach(), switch, "switch aux loss")
    assert_close(mr.ZLoss(c_z)(inputs).value.detach(), moe_utils.z_loss_func(logits, c_z), "z-loss")

    probs = torch.zeros(S * B, E, requires_grad=True)
    with torch.enable_grad():
        peer._apply_aux_loss(probs, scores, routing_map)
        peer._apply_seq_aux_loss(probs, scores, routing_map, S, B)
        peer.apply_z_loss(logits)
    tracker = mg.logged_losses()
    assert_close(mr.SwitchAuxLoss(1.0)(inputs).value.detach(), tracker["load_balancing_loss"][0],
                 "switch aux loss (mcore router path)")
    assert_close(mr.SequenceAuxLoss(1.0)(inputs).value.detach(), tracker["seq_load_balancing_loss"][0],
                 "sequence aux loss")
    assert_close(mr.ZLoss(1.0)(inputs).value.detach(), tracker["z_loss"][0], "z-loss (mcore router path)")
    mg.clear_logged_losses()


def test_spec_goes_into_a_gpt_layer_spec(mcore):
    """docs/integrations.md's example builds a GPTModel whose MoE layers route with ours (its attention needs mcore's CUDA
    RNG tracker, so only an MoE layer runs here)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    config = make_config(num_attention_heads=2)
    layer_spec = get_gpt_layer_local_spec(num_experts=E)
    layer_spec.submodules.mlp = mg.moe_layer_spec("relu", num_experts=E)
    model = GPTModel(config=config, transformer_layer_spec=layer_spec, vocab_size=32, max_sequence_length=8)
    moe = [layer.mlp for layer in model.decoder.layers]
    assert [m.router.layer_number for m in moe] == [1, 2]
    assert all(isinstance(m.router, mg.MegatronRouter) for m in moe)
    y, _ = moe[1](torch.randn(3, 2, D))
    assert y.shape == (3, 2, D) and torch.isfinite(y).all()


def test_builder_accepts_newer_keywords_and_checks_its_router(mcore):
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    cfg = make_config()
    builder = mg.router_builder("topk", score_func="sigmoid")
    built = builder(config=cfg, pg_collection=get_default_pg_collection(), is_mtp_layer=True, name="mlp.router")
    assert built.is_mtp_layer and built.router.top_k == K
    assert built.router.weight.std().item() == pytest.approx(cfg.init_method_std, rel=0.5)
    with pytest.raises(ValueError, match="router must be one of"):
        mg.router_builder("nope")
    with pytest.raises(TypeError, match="router must be a name"):
        mg.router_builder(3)


# --- expert-model-parallel size 2: two gloo processes ---



@pytest.mark.slow
@pytest.mark.parametrize("dispatcher,router", [("alltoall", "topk"), ("alltoall", "relu"), ("allgather", "topk")])
def test_expert_parallel_2_over_gloo_equals_our_layer(tmp_path, dispatcher, router):
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mcore_ep2_worker.py")
    root = os.path.dirname(os.path.dirname(script))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    rdzv = str(tmp_path / "rdzv")
    procs = [subprocess.Popen([sys.executable, script, str(r), rdzv, dispatcher, router], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=900)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for r, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0 and f"ok {r}" in out, out[-4000:]
