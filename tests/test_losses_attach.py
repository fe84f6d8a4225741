"""moe_routing/losses/attach.py: aux losses injected into the gradient of the layer's output: the router gets
exactly the aux gradient and the main gradient is unchanged, gradient accumulation over micro-batches with aux
scale 1/N equals one big batch (Switch aux, z-loss, sequence aux), and a non-reentrant checkpoint counts the aux
gradient once. The aux-loss scale itself: test_control.py."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from moe_routing import SequenceAuxLoss, SwitchAuxLoss, ZLoss, set_aux_loss_scale

from helpers import LOSS_SIZES, loss_layer as make_layer

D, F, E = LOSS_SIZES


def test_aux_loss_gradient_reaches_router_weight():
    layer = make_layer([SwitchAuxLoss(1.0)])
    torch.manual_seed(11)
    x = torch.randn(3, 5, D, dtype=torch.float64)
    y = layer(x)
    (y * 0).sum().backward()
    injected = layer.router.weight.grad.clone()
    assert injected.abs().max() > 1e-4
    # the main path carried zero gradient: the experts get none, the router only the aux term
    assert layer.experts.w_up.grad.abs().max() == 0

    layer.zero_grad()
    layer.return_aux_loss = True
    y2, aux = layer(x)
    torch.testing.assert_close(y2, y.detach(), rtol=0, atol=0)
    (direct,) = torch.autograd.grad(aux, layer.router.weight)
    torch.testing.assert_close(injected, direct, rtol=1e-12, atol=1e-15)


def test_aux_loss_injection_leaves_main_gradient_unchanged():
    torch.manual_seed(12)
    x = torch.randn(10, D, dtype=torch.float64)
    with_aux = make_layer([SwitchAuxLoss(1.0)])
    without = make_layer([])
    (with_aux(x) ** 2).sum().backward()
    (without(x) ** 2).sum().backward()
    for name in ("experts.w_gate", "experts.w_up", "experts.w_down"):
        torch.testing.assert_close(with_aux.get_parameter(name).grad, without.get_parameter(name).grad,
                                   rtol=1e-12, atol=1e-14)
    with_aux.return_aux_loss = True
    _, aux = with_aux(x)
    (g_aux,) = torch.autograd.grad(aux, with_aux.router.weight)
    torch.testing.assert_close(with_aux.router.weight.grad, without.router.weight.grad + g_aux,
                               rtol=1e-10, atol=1e-13)


# ---- gradient accumulation -----------------------------------------------------------------------------------------
class _Model(nn.Module):
    def __init__(self, losses):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(D, D, dtype=torch.float64)
        self.moe = make_layer(losses, seed=1)
        self.head = nn.Linear(D, 1, dtype=torch.float64)

    def forward(self, x):
        h = self.proj(x)
        return self.head(h + self.moe(h))


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("identical", [False, True])
def test_gradient_accumulation_matches_one_big_batch(identical):
    N, T = 4, 6
    torch.manual_seed(14)
    if identical:  # switch aux is not linear in tokens: micro-batches must be copies for equality
        losses = [SwitchAuxLoss(0.5), ZLoss(1e-2)]
        micro = [torch.randn(T, D, dtype=torch.float64)] * N
    else:  # z-loss is a mean over tokens: linear, any equal-size micro-batches
        losses = [ZLoss(1e-2)]
        micro = [torch.randn(T, D, dtype=torch.float64) for _ in range(N)]
    targets = [torch.randn(T, 1, dtype=torch.float64) for _ in range(N)]

    big = _Model(losses)
    nn.functional.mse_loss(big(torch.cat(micro)), torch.cat(targets)).backward()
    g_big = _grads(big)

    acc = _Model(losses)
    set_aux_loss_scale(acc, 1.0 / N)
    for x, t in zip(micro, targets):
        (nn.functional.mse_loss(acc(x), t) / N).backward()
    g_acc = _grads(acc)
    for name in g_big:
        torch.testing.assert_close(g_acc[name], g_big[name], rtol=1e-10, atol=1e-13, msg=name)

    # the aux term matters: accumulating without the 1/N scale gives a different router gradient
    wrong = _Model(losses)
    for x, t in zip(micro, targets):
        (nn.functional.mse_loss(wrong(x), t) / N).backward()
    diff = (wrong.moe.router.weight.grad - g_big["moe.router.weight"]).abs().max()
    assert diff > 1e-6


def test_gradient_accumulation_sequence_aux_sigmoid_bsd():
    # sequence aux averages over sequences: with equally many sequences per micro-batch it is linear, so
    # 4 micro-batches of 2 sequences (main loss / 4, aux scale 1/4) equal one batch of 8 sequences exactly
    N, B, S = 4, 2, 5
    losses = [SequenceAuxLoss(0.3), ZLoss(1e-2)]
    torch.manual_seed(16)
    micro = [torch.randn(B, S, D, dtype=torch.float64) for _ in range(N)]
    targets = [torch.randn(B, S, 1, dtype=torch.float64) for _ in range(N)]

    def model():
        m = _Model(losses)
        m.moe = make_layer(losses, seed=1, router_kwargs={"score_func": "sigmoid"})
        return m

    big = model()
    nn.functional.mse_loss(big(torch.cat(micro)), torch.cat(targets)).backward()
    acc = model()
    set_aux_loss_scale(acc, 1.0 / N)
    for x, t in zip(micro, targets):
        (nn.functional.mse_loss(acc(x), t) / N).backward()
    g_big, g_acc = _grads(big), _grads(acc)
    for name in g_big:
        torch.testing.assert_close(g_acc[name], g_big[name], rtol=1e-10, atol=1e-13, msg=name)
    # the aux part of the router gradient is not negligible
    plain = model()
    for m_ in plain.moe.losses:
        m_.coeff = 0.0
    nn.functional.mse_loss(plain(torch.cat(micro)), torch.cat(targets)).backward()
    assert (plain.moe.router.weight.grad - g_big["moe.router.weight"]).abs().max() > 1e-6


# ---- activation checkpointing --------------------------------------------------------------------------------------
def test_injected_aux_gradient_under_non_reentrant_checkpoint():
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(17)
    x = torch.randn(2, 6, D, dtype=torch.float64)
    plain = make_layer([SwitchAuxLoss(0.5), ZLoss(0.1)])
    ckpt = make_layer([SwitchAuxLoss(0.5), ZLoss(0.1)])
    (plain(x) ** 2).sum().backward()
    (checkpoint(ckpt, x, use_reentrant=False) ** 2).sum().backward()
    for (name, p), (_, q) in zip(plain.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-12, atol=1e-14, msg=name)
    # and the aux part is in there exactly once: subtracting autograd.grad of the returned aux leaves the
    # router gradient of the main path alone
    ref = make_layer([])
    (ref(x) ** 2).sum().backward()
    plain.return_aux_loss = True
    _, aux = plain(x)
    (g_aux,) = torch.autograd.grad(aux, plain.router.weight)
    torch.testing.assert_close(ckpt.router.weight.grad, ref.router.weight.grad + g_aux, rtol=1e-10, atol=1e-13)
