"""moe_routing/losses/pooled.py (and `record_router_logits`): Hugging Face's layer-pooled load-balancing loss
against transformers' own ``load_balancing_loss_func`` (Mixtral's and Qwen3-MoE's), values and gradients, over
several layers, with and without an attention mask, at k = 1 and 2; its one-layer relation to our Switch aux.
"""
from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import moe_routing as mr
from moe_routing import MoELayer, RoutingContext, SwitchAuxLoss, hf_load_balancing_loss, record_router_logits

D, F, E = 12, 8, 6
B, S, L = 3, 5, 3


def stack(top_k, num_layers=L, seed=0):
    torch.manual_seed(seed)
    layers = [MoELayer(D, F, E, top_k, losses=[]) for _ in range(num_layers)]
    for layer in layers:
        with torch.no_grad():
            layer.router.weight.normal_(0, 0.5)
    return nn.Sequential(*layers)


def attention_mask_BS():
    mask = torch.ones(B, S, dtype=torch.long)
    mask[0, 3:] = 0  # HF's sense: 1 at real tokens, 0 at padding
    mask[2, 1:] = 0
    return mask


@pytest.mark.parametrize("module", ["mixtral.modeling_mixtral", "qwen3_moe.modeling_qwen3_moe"])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_transformers_load_balancing_loss_func(module, top_k, masked):
    pytest.importorskip("transformers", reason="transformers not installed (extra 'hf')")
    hf = importlib.import_module(f"transformers.models.{module}").load_balancing_loss_func
    model = stack(top_k)
    torch.manual_seed(1)
    x = torch.randn(B, S, D)
    mask = attention_mask_BS() if masked else None
    ctx = RoutingContext(padding_mask=mask == 0) if masked else None
    with record_router_logits(model) as logits, mr.routing_context(model, ctx):
        model(x)
    assert len(logits) == L
    torch.testing.assert_close(logits[0], x.reshape(-1, D) @ model[0].router.weight.t())
    ours = hf_load_balancing_loss(logits, top_k, mask)
    want = hf(tuple(logits), E, top_k, mask)
    torch.testing.assert_close(ours, want, rtol=1e-6, atol=1e-7)
    weights = [layer.router.weight for layer in model]
    g_ours = torch.autograd.grad(ours, weights, retain_graph=True)
    g_hf = torch.autograd.grad(want, weights)
    for a, b in zip(g_ours, g_hf):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # pooling is not the sum (nor the mean) of the layers' own losses
    per_layer = [hf((t.detach(),), E, top_k, mask) for t in logits]
    assert abs(float(sum(per_layer)) / L - float(want.detach())) > 1e-5


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_one_layer_is_k_times_switch_aux(top_k):
    torch.manual_seed(2)
    layer = MoELayer(D, F, E, top_k, losses=[SwitchAuxLoss(1.0)], return_aux_loss=True).double()
    with torch.no_grad():
        layer.router.weight.normal_(0, 0.5)
    x = torch.randn(2, 7, D, dtype=torch.float64)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 4:] = True
    with record_router_logits(layer) as logits:
        _, switch = layer(x, RoutingContext(padding_mask=pad))
    torch.testing.assert_close(hf_load_balancing_loss(logits, top_k, ~pad), top_k * switch, rtol=1e-12, atol=0)


def test_checkpoint_recompute_records_once_and_hooks_are_removed():
    model = stack(2)
    x = torch.randn(4, D, requires_grad=True)
    with record_router_logits(model) as logits:
        y = checkpoint(model, x, use_reentrant=False)
        (y.sum() + hf_load_balancing_loss(logits, 2)).backward()  # backward recomputes the layers
    assert len(logits) == L
    assert all(not layer.router._forward_hooks for layer in model)
    model(x)
    assert len(logits) == L


def test_bad_inputs_are_named():
    a, b = torch.randn(4, E), torch.randn(5, E)
    with pytest.raises(ValueError, match="same shape"):
        hf_load_balancing_loss([a, b], 2)
    with pytest.raises(ValueError, match="attention_mask"):
        hf_load_balancing_loss([a], 2, torch.ones(5))
    with pytest.raises(ValueError, match="logits_LTE"):
        hf_load_balancing_loss([], 2)
    with pytest.raises(ValueError, match="top_k"):
        hf_load_balancing_loss([a], E + 1)
    # an all-padding batch gives 0, not NaN
    assert float(hf_load_balancing_loss([a], 2, torch.zeros(4))) == 0.0
