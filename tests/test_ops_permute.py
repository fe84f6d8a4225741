"""moe_routing/ops/permute.py: permute (token rows gathered into expert order) against a loop, its backward (the
rows summed back per token), gradcheck and bad inputs."""
from __future__ import annotations

import pytest
import torch

from moe_routing.ops import permute

from helpers import gen

RTOL64, ATOL64 = 1e-12, 1e-12


def test_permute_matches_loop():
    x = torch.randn(6, 5, generator=gen(1), dtype=torch.float64)
    src_token = torch.tensor([3, 0, 0, 5, 2, 3, 3], dtype=torch.int32)
    out = permute(x, src_token, "torch")
    assert out.shape == (7, 5) and out.dtype == x.dtype
    for n in range(7):
        assert torch.equal(out[n], x[int(src_token[n])])


def test_gradcheck_permute():
    x = torch.randn(5, 3, generator=gen(13), dtype=torch.float64, requires_grad=True)
    src_token = torch.tensor([4, 0, 0, 2, 4, 4, 1])  # token 3 unused, repeats accumulate
    assert torch.autograd.gradcheck(lambda x: permute(x, src_token, "torch"), (x,))


def test_permute_backward_sums_rows():
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    src_token = torch.tensor([1, 1, 3, 1])
    g = torch.randn(4, 3, generator=gen(23), dtype=torch.float64)
    (permute(x, src_token, "torch") * g).sum().backward()
    ref = torch.zeros(4, 3, dtype=torch.float64)
    for n in range(4):
        ref[int(src_token[n])] += g[n]
    torch.testing.assert_close(x.grad, ref, rtol=RTOL64, atol=ATOL64)


def test_permute_rejects_bad_inputs():
    x = torch.randn(4, 3)
    with pytest.raises(TypeError, match="src_token_N"):
        permute(x, torch.tensor([0.0, 1.0]))
    with pytest.raises(TypeError, match="src_token_N"):
        permute(x, torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="x_TD"):
        permute(x[None], torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="backend"):
        permute(x, torch.tensor([0, 1]), backend="bogus")
