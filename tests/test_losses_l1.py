"""moe_routing/losses/l1.py: the ReLU router's L1 loss (ReLUL1Loss, the default loss of router="relu") against
its formula, token by token."""
import pytest
import torch

import moe_routing as mr


def test_l1_loss_formula():
    torch.manual_seed(1)
    T, E, k = 11, 5, 2
    layer = mr.MoELayer(4, 3, E, k, router="relu")
    layer.router.l1_coeff.fill_(0.3)
    x = torch.randn(T, 4)
    layer.return_aux_loss = True
    _, aux = layer(x)
    R = torch.relu(x @ layer.router.weight.t()).detach()
    expected = 0.0
    for e in range(E):
        f_e = E / (k * T) * sum(1 for t in range(T) if R[t, e] > 0)
        expected += f_e * sum(R[t, e].item() for t in range(T))
    assert aux.item() == pytest.approx(0.3 * expected / T, rel=1e-5)
