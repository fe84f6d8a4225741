"""moe_routing.convert: upcycling, CMoE carving and Read-ME pre-gating of dense SwiGLU FFNs."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import moe_routing as mr
from moe_routing.ablate.model import SwiGLU, TinyLM
from moe_routing.convert import (PreGatedRouter, activation_markers, capture_inputs, carve, dense_swiglu,
                                 group_neurons, pregate, upcycle)


def swiglu(D=6, Fh=12, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    ffn = SwiGLU(D, Fh).to(dtype)
    for p in ffn.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return ffn


def hf_mlp(kind="llama", D=8, Fh=16):
    transformers = pytest.importorskip("transformers")
    cfg_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[kind]
    cfg = cfg_cls(hidden_size=D, intermediate_size=Fh, num_attention_heads=2, num_key_value_heads=2)
    if kind == "llama":
        from transformers.models.llama.modeling_llama import LlamaMLP as MLP
    else:
        from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP as MLP
    torch.manual_seed(0)
    return MLP(cfg).double()


# --- reading dense FFNs ---
def test_dense_swiglu_reads_ablation_and_hf_modules():
    ffn = swiglu()
    x = torch.randn(5, 6, dtype=torch.float64)
    torch.testing.assert_close(dense_swiglu(ffn)(x), ffn(x))
    mlp = hf_mlp()
    x = torch.randn(5, 8, dtype=torch.float64)
    torch.testing.assert_close(dense_swiglu(mlp)(x), mlp(x))


def test_dense_swiglu_rejects_other_modules():
    with pytest.raises(TypeError, match="dense SwiGLU"):
        dense_swiglu(torch.nn.Linear(3, 3))
    mlp = hf_mlp()
    mlp.act_fn = torch.nn.GELU()
    with pytest.raises(TypeError, match="SiLU"):
        dense_swiglu(mlp)


# --- upcycling ---
@pytest.mark.parametrize("make", [swiglu, lambda: hf_mlp("llama"), lambda: hf_mlp("qwen2")])
def test_upcycled_layer_equals_dense_ffn(make):
    ffn = make()
    layer = upcycle(ffn, num_experts=4, top_k=2)  # top-k then softmax: gates sum to 1
    x = torch.randn(3, 5, layer.hidden_size, dtype=torch.float64)
    torch.testing.assert_close(layer(x), ffn(x))
    assert layer.experts.w_up.dtype == torch.float64


def test_upcycle_k1_switch_gates_scale_by_the_chosen_probability():
    ffn = swiglu()
    layer = upcycle(ffn, num_experts=3, top_k=1)
    x = torch.randn(7, 6, dtype=torch.float64)
    y = layer(x)
    p_T = layer.router(x).weight_N
    torch.testing.assert_close(y, p_T[:, None] * ffn(x))


def test_upcycle_noise_is_seeded_and_scaled():
    ffn = swiglu(D=16, Fh=32)
    a = upcycle(ffn, 4, noise_std=0.1, seed=3)
    b = upcycle(ffn, 4, noise_std=0.1, seed=3)
    torch.testing.assert_close(a.experts.w_up, b.experts.w_up)
    diff = a.experts.w_up - ffn.w_up
    assert not torch.allclose(a.experts.w_up[0], a.experts.w_up[1])
    assert 0.07 < float(diff.detach().std() / ffn.w_up.detach().std()) < 0.13
    with pytest.raises(ValueError, match="noise_std"):
        upcycle(ffn, 4, noise_std=float("nan"))
    with pytest.raises(ValueError, match="ffn_hidden_size"):
        upcycle(ffn, 4, ffn_hidden_size=3)


# --- carving ---
@torch.no_grad()
def naive_markers(x_TD, ffn, sparsity):
    """Per token and neuron: normalised activation, then the ceil(sparsity F) largest |h| marked."""
    T, Fh = x_TD.shape[0], ffn.w_gate.shape[1]
    K = max(1, math.ceil(sparsity * Fh))
    out = torch.zeros(T, Fh, dtype=torch.bool)
    for t in range(T):
        xn = x_TD[t] / x_TD[t].norm()
        h = []
        for j in range(Fh):
            g, u = ffn.w_gate[:, j], ffn.w_up[:, j]
            h.append(abs(float(F.silu(xn @ (g / g.norm())) * (xn @ (u / u.norm())))))
        for j in sorted(range(Fh), key=lambda j: -h[j])[:K]:
            out[t, j] = True
    return out


def naive_grouping(markers_TF, E, S, max_iters=10, tol=1e-3):
    """CMoE's grouping with every balanced assignment enumerated (tiny sizes only)."""
    T, Fh = markers_TF.shape
    m, k = Fh // E, E - S
    M = markers_TF.double()
    rates = [float(M[:, j].mean()) for j in range(Fh)]
    order = sorted(range(Fh), key=lambda j: (-rates[j], j))
    shared, remaining = order[:S * m], sorted(order[S * m:])
    first = sorted(remaining, key=lambda j: (-rates[j], j))[:k]
    centroids = [M[:, j].clone() for j in first]
    labellings = set(itertools.permutations([c for c in range(k) for _ in range(m)]))
    prev = None
    for _ in range(max_iters):
        dist = {(j, c): float((M[:, j] - centroids[c]).abs().sum()) for j in remaining for c in range(k)}
        best = min(labellings, key=lambda lab: sum(dist[j, c] for j, c in zip(remaining, lab)))
        cost = sum(dist[j, c] for j, c in zip(remaining, best))
        if prev is not None and abs(cost - prev) < tol * abs(cost):
            break
        prev = cost
        for c in range(k):
            centroids[c] = torch.stack([M[:, j] for j, lab in zip(remaining, best) if lab == c]).mean(0)
    groups = [[j for j, lab in zip(remaining, best) if lab == c] for c in range(k)]
    reps = [min(g, key=lambda j: float((M[:, j] - centroids[c]).abs().sum())) for c, g in enumerate(groups)]
    return shared, groups, reps


def test_activation_markers_match_naive_loop():
    ffn = swiglu(D=5, Fh=12)
    x = torch.randn(9, 5, dtype=torch.float64)
    for sparsity in (0.1, 0.25, 1.0):
        assert torch.equal(activation_markers(x, dense_swiglu(ffn), sparsity), naive_markers(x, ffn, sparsity))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_group_neurons_matches_naive_enumeration(seed):
    # continuous "markers": rates and distances have no ties, so the optimum is unique
    g = torch.Generator().manual_seed(seed)
    markers = torch.rand(11, 12, generator=g, dtype=torch.float64)
    got = group_neurons(markers, num_experts=4, num_shared_experts=1)
    shared, groups, reps = naive_grouping(markers, 4, 1)
    assert got.shared.tolist() == shared
    assert sorted(map(sorted, got.routed.tolist())) == sorted(map(sorted, groups))
    order = [groups.index(sorted(r)) for r in got.routed.tolist()]
    assert got.representatives.tolist() == [reps[i] for i in order]


def test_carved_experts_partition_the_dense_ffn():
    ffn = swiglu(D=6, Fh=16)
    x = torch.randn(40, 6, dtype=torch.float64)
    layer = carve(ffn, x, num_experts=4, top_k=2, num_shared_experts=1)
    groups = layer.carving
    neurons = torch.cat([groups.shared, groups.routed.reshape(-1)])
    assert sorted(neurons.tolist()) == list(range(16))
    # every routed expert with gate 1, plus the shared one, is the dense FFN
    ex = layer.experts
    total = layer.shared_experts(x) + sum(
        (F.silu(x @ ex.w_gate[e]) * (x @ ex.w_up[e])) @ ex.w_down[e] for e in range(layer.num_experts))
    torch.testing.assert_close(total, ffn(x))
    # the router is built from the representatives' normalised columns, and the layer runs
    reps = groups.representatives
    torch.testing.assert_close(layer.router.weight, F.normalize(ffn.w_up[:, reps].t(), dim=-1))
    torch.testing.assert_close(layer.router.gate_weight, F.normalize(ffn.w_gate[:, reps].t(), dim=-1))
    y = layer(x)
    d = layer.router(x)
    logits = ((x @ layer.router.weight.t()) * F.silu(x @ layer.router.gate_weight.t())).abs()
    torch.testing.assert_close(d.logits_TE, logits)
    torch.testing.assert_close(d.weights_TK, logits.softmax(-1).topk(2).values)
    assert y.shape == x.shape and torch.isfinite(y).all()


def test_carve_hf_mlp_and_bad_arguments():
    mlp = hf_mlp(D=8, Fh=16)
    x = torch.randn(30, 8, dtype=torch.float64)
    layer = carve(mlp, x, num_experts=4, top_k=1, num_shared_experts=2)
    assert layer.num_experts == 2 and layer.shared_experts.w_up.shape == (8, 8)
    assert layer(x).shape == x.shape
    with pytest.raises(ValueError, match="num_experts must divide"):
        carve(mlp, x, num_experts=3)
    with pytest.raises(ValueError, match="calibration"):
        carve(mlp, x[:, :4], num_experts=4)


# --- model level: the ablation model's dense baseline, and pre-gating ---
def tiny_dense_lm(layers=2, D=16, Fh=32, seed=0):
    return TinyLM(50, D, 2, 12, [SwiGLU(D, Fh) for _ in range(layers)], seed=seed).double()


def test_upcycled_tiny_lm_equals_dense_and_capture_inputs():
    model = tiny_dense_lm()
    ids = torch.randint(0, 50, (2, 10))
    want = model(ids)
    with capture_inputs({str(i): b.ffn for i, b in enumerate(model.blocks)}) as seen:
        model(ids)
    assert seen["0"][0].shape == (20, 16)
    for block in model.blocks:
        block.ffn = upcycle(block.ffn, 4, top_k=2, noise_std=0.0)
    torch.testing.assert_close(model(ids), want)


def test_pregate_k1_on_upcycled_model_is_dense_and_reads_the_plan():
    model = tiny_dense_lm()
    ids = torch.randint(0, 50, (2, 10))
    want = model(ids)
    for block in model.blocks:
        block.ffn = upcycle(block.ffn, 4, top_k=2)
    pre = pregate(model, top_k=1, dim=8).double()
    assert all(isinstance(b.ffn.router, PreGatedRouter) and b.ffn.top_k == 1 for b in model.blocks)
    torch.testing.assert_close(pre.run(model, ids), want)  # gate 1 on identical experts: the dense FFN
    plan = pre(ids).reshape(-1, 4).argmax(-1)
    for block in model.blocks:  # every layer routed by the one plan
        assert torch.equal(block.ffn.last_stats["tokens_per_expert"].long(), torch.bincount(plan, minlength=4))
    with pytest.raises(RuntimeError, match="no routing plan"):
        model(ids)


def test_pregate_k2_trains_the_pregate_and_replay_overrides():
    model = tiny_dense_lm()
    for block in model.blocks:
        block.ffn = upcycle(block.ffn, 4, top_k=2, noise_std=0.5, seed=1)
    pre = pregate(model, dim=8, num_layers=1).double()
    ids = torch.randint(0, 50, (2, 10))
    logits = pre.run(model, ids)
    logits.sum().backward()
    assert pre.proj.weight.grad is not None and pre.proj.weight.grad.abs().sum() > 0
    loss = pre.distillation_loss(pre(ids), torch.zeros(2, 10, dtype=torch.long))
    assert loss.ndim == 0 and torch.isfinite(loss)
    forced = torch.tensor([[0, 1]] * 20)
    with mr.routing_context(model, forced_experts={0: forced}) as ctx:
        pre.plan(ids, ctx)
        model(ids)
        d = model.blocks[0].ffn.router(torch.zeros(20, 16, dtype=torch.float64), ctx, 0)
    assert torch.equal(d.experts_TK, forced)


def test_pregate_needs_moe_layers():
    with pytest.raises(ValueError, match="no MoELayer"):
        pregate(tiny_dense_lm())
