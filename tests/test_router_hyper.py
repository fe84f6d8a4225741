"""moe_routing/routers/hyper.py: HyperRouter's generated router weight against a naive hypernetwork, the frozen
hypernetwork (only the embedding trains), state dict and dtypes, and argument checks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from moe_routing import MoELayer, SwitchAuxLoss
from moe_routing.routers.hyper import TOP_K_SCHEDULES, HyperRouter, hyper_top_k, set_hyper_top_k

from reference import naive_hypernet

D, E = 7, 6


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
    assert r.default_losses() == []                                    # the reference: --load_balance 0
    aux = HyperRouter(D, E, 2, aux_coeff=1e-2).default_losses()
    assert [type(l) for l in aux] == [SwitchAuxLoss] and aux[0].coeff == 1e-2
    # size-aware init: generated weight std near init_std at a realistic size
    big = HyperRouter(256, 16, 2, hyper_init="scaled")
    assert 0.01 < float(big.weight.detach().std()) < 0.04

    layer = MoELayer(D, 5, E, 2, router=HyperRouter(D, E, 2, aux_coeff=1e-2))  # switch aux loss on
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


BAD = [
    (lambda: HyperRouter(D, E, 2, embed_dim=0), ValueError, "embed_dim"),
    (lambda: HyperRouter(D, E, 2, hyper_hidden=-3), ValueError, "hyper_hidden"),
    (lambda: HyperRouter(D, E, 2, bias="yes"), TypeError, "bias"),
    (lambda: HyperRouter(D, E, 2, hyper_init="xavier"), ValueError, "hyper_init must be one of"),
    (lambda: HyperRouter(D, E, 2, aux_coeff=float("inf")), ValueError, "aux_coeff"),
    (lambda: hyper_top_k(0, 100, 3, 2), ValueError, "k_max"),
    (lambda: hyper_top_k(-1, 100, 2, 4), ValueError, "step"),
    (lambda: hyper_top_k(0, 0, 2, 4), ValueError, "total_steps"),
    (lambda: hyper_top_k(0, 100, 2, 4, mode="step"), ValueError, "mode must be one of"),
    (lambda: hyper_top_k(0, 100, 2, 4, mode="exp_increase"), ValueError, "total_steps >= 300"),
    (lambda: hyper_top_k(100, 100, 1, 16, mode="multi_step_increase"), ValueError, "step must be < total_steps"),
    (lambda: hyper_top_k(True, 100, 1, 16), TypeError, "step"),
    (lambda: set_hyper_top_k(MoELayer(D, 5, E, 2, router=HyperRouter(D, E, 2)), E + 1), ValueError, "top_k"),
    (lambda: set_hyper_top_k(MoELayer(D, 5, E, 2, router=HyperRouter(D, E, 2)), 1), ValueError, "exactly 1"),
    (lambda: HyperRouter(D, 0, 1), ValueError, "num_experts"),
    (lambda: MoELayer(D, 5, E + 1, 2, router=HyperRouter(D, E, 2)), ValueError, "num_experts"),
]


@pytest.mark.parametrize("make,exc,match", BAD)
def test_bad_arguments(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_reference_init_normal_hypernet_zero_bias():
    torch.manual_seed(0)
    r = HyperRouter(64, 16, 2, hyper_hidden=64)
    first, last = r.hypernet[0], r.hypernet[2]
    for w in (first.weight, last.weight):
        assert float(w.std()) == pytest.approx(0.02, rel=0.05) and abs(float(w.mean())) < 0.002
    assert not first.bias.any() and not last.bias.any()
    assert float(r.embedding.detach().std()) == pytest.approx(1.0, rel=0.3)    # randn, as the reference's embedding


def _reference_gate_number(steps, mode, overall, lo, hi):
    """giangdip2410/HyperRouter new_utils.py calculate_gate_number, transcribed."""
    if mode == "linear_increase":
        n = round((hi - lo) * steps / overall) + lo
    elif mode == "linear_decrease":
        n = round((lo - hi) * steps / overall) + hi
    elif mode == "cosine_decrease":
        n = round((hi - lo) * np.cos(np.pi * steps / (2 * overall))) + lo
    elif mode == "cosine_increase":
        n = round((lo - hi) * np.cos(np.pi * steps / (2 * overall))) + hi
    elif mode == "exp_increase":
        n = round((lo - hi) * 0.99 ** (steps // (overall // 300))) + hi
    else:
        ladder = [1, 2, 4, 8, 16] if mode == "multi_step_increase" else [16, 8, 4, 2, 1]
        n = ladder[int(len(ladder) * steps / overall)]
    return int(np.clip(n, lo, hi))


@pytest.mark.parametrize("mode", TOP_K_SCHEDULES)
def test_top_k_schedule_matches_the_reference(mode):
    lo, hi = (1, 16) if mode.startswith("multi_step") else (8, 16)   # the enwik8 script: 8 -> 16
    for total in (400, 1000, 4003):
        got = [hyper_top_k(s, total, lo, hi, mode) for s in range(total)]
        assert got == [_reference_gate_number(s, mode, total, lo, hi) for s in range(total)]
        assert min(got) >= lo and max(got) <= hi and len(set(got)) > 1
    assert hyper_top_k(0, 400, 8, 16) == 8 and hyper_top_k(399, 400, 8, 16) == 16
    assert hyper_top_k(25, 400, 8, 16) == 8    # round(0.5) = 0: Python rounds halves to even, as the reference


def test_set_hyper_top_k_changes_layer_and_router_and_routes_k_experts():
    torch.manual_seed(3)
    model = torch.nn.Sequential(MoELayer(D, 5, E, 2, router=HyperRouter(D, E, 2)),
                                MoELayer(D, 5, E, 2, router="topk"),
                                MoELayer(D, 5, E, 2, router=HyperRouter(D, E, 2)))
    assert set_hyper_top_k(model, 4) == 2
    assert [m.top_k for m in model] == [4, 2, 4] and [m.router.top_k for m in model] == [4, 2, 4]
    x = torch.randn(7, D)
    d = model[0].router(x)
    assert d.experts_TK.shape == (7, 4)
    logits = x @ model[0].router.weight.t() + model[0].router.bias_E
    torch.testing.assert_close(d.weights_TK, logits.gather(1, d.experts_TK).softmax(-1))
    assert torch.equal(d.experts_TK.sort(1).values, logits.topk(4, dim=-1).indices.sort(1).values)
    model(x).sum().backward()                                          # the layers run at the new k
    assert model[0].last_stats["tokens_per_expert"].sum() == 7 * 4
