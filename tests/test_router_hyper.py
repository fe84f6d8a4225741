"""moe_routing/routers/hyper.py: HyperRouter's generated router weight against a naive hypernetwork, the frozen
hypernetwork (only the embedding trains), state dict and dtypes, and argument checks."""
from __future__ import annotations

import pytest
import torch

from moe_routing import MoELayer, SwitchAuxLoss
from moe_routing.routers.hyper import HyperRouter

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
    assert [type(l) for l in r.default_losses()] == [SwitchAuxLoss] and r.default_losses()[0].coeff == 1e-2
    # size-aware init: generated weight std near init_std at a realistic size
    big = HyperRouter(256, 16, 2)
    assert 0.01 < float(big.weight.detach().std()) < 0.04

    layer = MoELayer(D, 5, E, 2, router=HyperRouter(D, E, 2))  # default switch aux loss on
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
    (lambda: HyperRouter(D, 0, 1), ValueError, "num_experts"),
    (lambda: MoELayer(D, 5, E + 1, 2, router=HyperRouter(D, E, 2)), ValueError, "num_experts"),
]


@pytest.mark.parametrize("make,exc,match", BAD)
def test_bad_arguments(make, exc, match):
    with pytest.raises(exc, match=match):
        make()
