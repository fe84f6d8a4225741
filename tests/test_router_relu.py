"""moe_routing/routers/relu.py (ReMoE): routing and gradients against a naive loop, the adaptive L1 controller
(pooled over layers, skipped in eval, float32 lambda against the reference's update, optional floor, ceiling,
settling on the quick ablation model), the RMSNorm variant and argument checks. The L1 loss itself: test_losses_l1.py."""
import json

import pytest
import torch
import torch.nn.functional as F

import moe_routing as mr
from reference import assert_output_and_grads_close


def _naive_relu_layer(x_TD, w_r, w_gate, w_up, w_down):
    """y_t = sum_e relu(w_r[e] . x_t) * SwiGLU_e(x_t), one token and one expert at a time."""
    out = []
    for t in range(x_TD.shape[0]):
        acc = torch.zeros_like(x_TD[t])
        for e in range(w_r.shape[0]):
            gate = torch.relu(w_r[e] @ x_TD[t])
            if gate > 0:
                acc = acc + gate * ((F.silu(x_TD[t] @ w_gate[e]) * (x_TD[t] @ w_up[e])) @ w_down[e])
        out.append(acc)
    return torch.stack(out)


def test_layer_matches_naive_loop_with_gradients():
    torch.manual_seed(0)
    layer = mr.MoELayer(7, 5, 6, 2, router="relu", losses=[]).double()
    with torch.no_grad():
        layer.router.weight[3] = 0.0  # an expert no token reaches (ReLU(0) = 0 is inactive)
    x = torch.randn(9, 7, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    params = [layer.router.weight, layer.experts.w_gate, layer.experts.w_up, layer.experts.w_down]
    leaves = [p.detach().clone().requires_grad_() for p in params]
    x_ref = x.detach().clone().requires_grad_()
    y_ref = _naive_relu_layer(x_ref, *leaves)
    assert_output_and_grads_close(y, y_ref, [x, *params], [x_ref, *leaves])
    assert layer.last_stats["tokens_per_expert"][3] == 0
    counts = (x.detach() @ layer.router.weight.detach().t() > 0).sum(-1)
    assert layer.last_stats["experts_per_token"].item() == pytest.approx(counts.double().mean().item())


def test_controller_pools_sparsity_over_layers_and_skips_eval():
    torch.manual_seed(2)
    model = torch.nn.Sequential(mr.MoELayer(8, 4, 4, 1, router="relu"), mr.MoELayer(8, 4, 4, 1, router="relu"))
    with torch.no_grad():
        model[0].router.weight.fill_(1.0)   # all experts active for positive inputs: sparsity 0
        model[1].router.weight.fill_(-1.0)  # none active: sparsity 1
    x = torch.rand(6, 8)
    model(x).sum().backward()
    mr.step(model)  # pooled sparsity 0.5 < target 0.75 -> both lambdas grow by alpha
    for layer in model:
        assert layer.router.l1_coeff.item() == pytest.approx(1.2e-8)
        assert layer.router.active_accum.item() == 0 and layer.router.count_accum.item() == 0
    model.eval()
    model(x)
    assert model[0].router.count_accum.item() == 0
    model.train()
    with torch.no_grad():
        model[0].router.weight.fill_(-1.0)
    model(x).sum().backward()
    mr.step(model)  # sparsity 1 >= 0.75 -> shrink
    assert model[0].router.l1_coeff.item() == pytest.approx(1e-8)


def test_lambda_stays_float32_in_state_dict_under_bf16():
    layer = mr.MoELayer(8, 4, 4, 1, router="relu").to(torch.bfloat16)
    assert layer.router.l1_coeff.dtype == torch.float32
    assert "router.l1_coeff" in layer.state_dict()
    assert layer.double().router.l1_coeff.dtype == torch.float64


def test_rmsnorm_variant_keeps_zeros_and_trains():
    torch.manual_seed(3)
    layer = mr.MoELayer(8, 4, 6, 2, router="relu", router_kwargs={"norm": "rmsnorm"})
    x = torch.randn(10, 8)
    decision = layer.router(x)
    logits = x @ layer.router.weight.detach().t()
    assert torch.equal(decision.scores_TE.detach() > 0, logits > 0)
    layer(x).sum().backward()
    assert layer.router.weight.grad.abs().sum() > 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="norm"):
        mr.ReLURouter(8, 4, 1, norm="layernorm")
    with pytest.raises(ValueError, match="top_k"):
        mr.ReLURouter(8, 4, 5)
    with pytest.raises(ValueError, match="alpha"):
        mr.ReLURouter(8, 4, 1, alpha=1.0)
    with pytest.raises(TypeError, match="ReLURouter"):
        mr.MoELayer(8, 4, 4, 1, losses=[mr.ReLUL1Loss()])(torch.randn(3, 8))


@pytest.mark.slow  # trains the quick ablation model (~40 s)
def test_controller_settles_sparsity_within_two_points_on_the_quick_ablation_model(tmp_path):
    """ReMoE acceptance: `moe-ablate --preset quick --steps 500` (2-layer byte-level LM on Shakespeare, E=8, k=2,
    500 steps, ~17 s on one CPU thread). Sparsity starts dense, the controller raises lambda until sparsity
    reaches the target 0.75, and from step 250 on every logged value stays within 2 points of it."""
    from moe_routing.ablate.cli import main
    from moe_routing.ablate.data import default_text_files

    try:
        default_text_files()
    except FileNotFoundError as e:
        pytest.skip(f"corpus not installed: {e}")
    assert main(["--preset", "quick", "--steps", "500", "--routers", "relu", "--seeds", "0", "--no-progress",
                 "--no-plots", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "relu" / "seed0" / "result.json").read_text())
    history = result["history"]
    target = 0.75
    assert history[0]["relu_sparsity"] < target - 0.3                        # starts (nearly) dense
    late = [h["relu_sparsity"] for h in history if h["step"] >= 250]
    assert all(abs(s - target) <= 0.02 for s in late), late
    assert abs(sum(late) / len(late) - target) <= 0.01
    assert result["final_val_loss"] < 2.2                                     # and the model learns


def _reference_lambda_updates(sparsities, lambda0=1e-8, multiplier=1.2, target=0.75):
    """thu-ml/ReMoE megatron/training/training.py: a float32 lambda, ``*= m`` below target else ``/= m``."""
    lam = torch.tensor(lambda0, dtype=torch.float32)
    out = []
    for s in sparsities:
        lam = lam * multiplier if s < target else lam / multiplier
        out.append(lam.item())
    return out


def _controller_step(r, sparsity):
    r.active_accum.fill_(round(10 * (1 - sparsity))), r.count_accum.fill_(10)
    type(r).moe_step_all([r])
    return r.l1_coeff.item()


def test_lambda_default_follows_the_reference_update_without_a_floor():
    layer = mr.MoELayer(8, 4, 4, 1, router="relu")
    sparsities = [1.0] * 40 + [0.0] * 5 + [0.8, 0.7, 0.75, 0.5, 0.9] * 4   # 0.75 = target: not below, shrink
    got = [_controller_step(layer.router, s) for s in sparsities]
    assert got == _reference_lambda_updates(sparsities)                   # bit-identical, float32
    assert min(got) < 1e-9                                                # no floor at lambda_0


def test_lambda_floor_option_and_ceiling_keep_the_controller_alive():
    # A float32 lambda divided by 1.2 for ~600 steps becomes a subnormal that 1.2x no longer changes (the
    # reference's controller then freezes): the default clamps at the smallest normal float32 instead.
    r = mr.ReLURouter(8, 4, 1)
    for _ in range(700):
        _controller_step(r, 1.0)
    assert r.l1_coeff.item() == torch.finfo(torch.float32).tiny
    assert _controller_step(r, 0.0) > torch.finfo(torch.float32).tiny     # still moves up
    layer = mr.MoELayer(8, 4, 4, 1, router="relu", router_kwargs={"max_l1_coeff": 1e-6, "min_l1_coeff": 1e-8})
    r = layer.router
    for _ in range(50):
        _controller_step(r, 1.0)
    assert r.l1_coeff.item() == pytest.approx(1e-8)        # the optional floor (lambda_0 here)
    assert _controller_step(r, 0.0) == pytest.approx(1.2e-8)
    for _ in range(200):
        _controller_step(r, 0.0)
    assert r.l1_coeff.item() == pytest.approx(1e-6)        # ceiling
    with pytest.raises(ValueError, match="min_l1_coeff"):
        mr.ReLURouter(8, 4, 1, l1_coeff=1e-8, min_l1_coeff=1e-7)
    with pytest.raises(ValueError, match="min_l1_coeff"):
        mr.ReLURouter(8, 4, 1, min_l1_coeff=float("nan"))
    with pytest.raises(ValueError, match="max_l1_coeff"):
        mr.ReLURouter(8, 4, 1, max_l1_coeff=float("inf"))


# ---- routing replay of a routing map ---------------------------------------------------------------------------
def _naive_forced_layer(x_TD, w_r, w_gate, w_up, w_down, map_TE):
    """y_t = sum_{e in map_t} relu(w_r[e] . x_t) * SwiGLU_e(x_t): the replayed experts, relu gates."""
    out = []
    for t in range(x_TD.shape[0]):
        acc = torch.zeros_like(x_TD[t])
        for e in range(w_r.shape[0]):
            if map_TE[t, e]:
                gate = torch.relu(w_r[e] @ x_TD[t])
                acc = acc + gate * ((F.silu(x_TD[t] @ w_gate[e]) * (x_TD[t] @ w_up[e])) @ w_down[e])
        out.append(acc)
    return torch.stack(out)


def test_replayed_map_routes_those_pairs_with_relu_gates_and_gradients():
    torch.manual_seed(20)
    layer = mr.MoELayer(7, 5, 6, 2, router="relu", losses=[], layer_idx=0).double()
    x = torch.randn(9, 7, dtype=torch.float64)
    map_TE = torch.rand(9, 6, generator=torch.Generator().manual_seed(21)) < 0.5
    logits = x @ layer.router.weight.detach().t()
    assert ((logits <= 0) & map_TE).any() and ((logits > 0) & map_TE).any()  # both cases are exercised
    d = layer.router(x, mr.RoutingContext(forced_experts={0: map_TE}), 0)
    assert torch.equal(torch.stack([d.token_N, d.expert_N], 1), map_TE.nonzero())
    torch.testing.assert_close(d.weight_N, torch.relu(logits)[map_TE])
    with mr.replay_routing(layer, map_TE[:, None]):
        y = layer(x)
    w = torch.randn_like(y)
    (y * w).sum().backward()
    params = [p.detach().clone().requires_grad_(True) for p in (layer.router.weight, layer.experts.w_gate,
                                                                 layer.experts.w_up, layer.experts.w_down)]
    y_ref = _naive_forced_layer(x, *params, map_TE)
    torch.testing.assert_close(y, y_ref)
    (y_ref * w).sum().backward()
    torch.testing.assert_close(layer.router.weight.grad, params[0].grad)


def test_replayed_expert_with_a_non_positive_logit_gets_zero_gate_and_no_gradient():
    torch.manual_seed(22)
    layer = mr.MoELayer(4, 3, 3, 1, router="relu", losses=[], layer_idx=0)
    x = torch.randn(1, 4)
    with torch.no_grad():
        layer.router.weight.copy_(torch.stack([x[0], -x[0], 0.5 * x[0]]))  # logits: +, -, +
    forced = torch.tensor([[True, True, False]])
    with mr.record_routing(layer) as rec, mr.replay_routing(layer, forced[:, None]):
        y = layer(x)
    assert torch.equal(rec.routing_map_TLE[:, 0], forced)  # still dispatched: N is the replayed count
    assert layer.last_stats  # the layer ran normally
    y.square().sum().backward()
    g = layer.router.weight.grad
    assert g[0].abs().sum() > 0 and torch.equal(g[1], torch.zeros(4)) and torch.equal(g[2], torch.zeros(4))
    # the zero-gate expert contributes nothing: the output equals routing to expert 0 alone
    with mr.replay_routing(layer, torch.tensor([[[True, False, False]]])):
        assert torch.equal(layer(x), y.detach())


def test_relu_record_replay_round_trip_after_weights_move_and_native_rows(tmp_path):
    torch.manual_seed(23)
    model = torch.nn.Sequential(mr.MoELayer(6, 4, 5, 2, router="relu"), mr.MoELayer(6, 4, 5, 2, router="relu"))
    x = torch.randn(8, 6)
    with mr.record_routing(model) as rec:
        model(x)
    assert rec.experts_TLK is None and rec.routing_map_TLE.shape == (8, 2, 5)
    rec.save(tmp_path / "relu.safetensors")
    rec = mr.RoutingRecord.load(tmp_path / "relu.safetensors", model=model)
    with torch.no_grad():
        for layer in model:
            layer.router.weight.add_(torch.randn_like(layer.router.weight))
    mask = torch.ones(8, dtype=torch.bool)
    mask[0] = False
    with mr.record_routing(model) as native:
        model(x)
    with mr.record_routing(model) as again, mr.replay_routing(model, rec, token_mask_T=mask):
        model(x)
    assert torch.equal(again.routing_map_TLE[1:], rec.routing_map_TLE[1:])
    assert torch.equal(again.routing_map_TLE[0, 0], native.routing_map_TLE[0, 0])  # the masked token: native
