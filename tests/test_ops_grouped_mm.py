"""moe_routing/ops/grouped_mm.py: grouped_mm (torch._grouped_mm or the per-expert loop) against a loop, when
_grouped_mm applies and the fallback without it, gradients (gradcheck, the custom op's backward), and groups
with zero rows."""
from __future__ import annotations

import pytest
import torch

from moe_routing.ops import grouped_mm, grouped_mm_supported
from moe_routing.ops.grouped_mm import _grouped_mm_op, _loop_mm

from conftest import needs_grouped_mm
from helpers import gen


def naive_grouped_mm(x_ND, w_EDF, counts):
    out, start = [], 0
    for e, n in enumerate(counts):
        for r in range(start, start + n):
            out.append(x_ND[r] @ w_EDF[e])
        start += n
    return torch.stack(out) if out else x_ND.new_zeros(0, w_EDF.shape[2])


@pytest.mark.parametrize("impl", ["loop", pytest.param("grouped_mm", marks=needs_grouped_mm), "auto"])
def test_grouped_mm_matches_loop(impl):
    E, D, F = 5, 8, 12
    counts = torch.tensor([3, 0, 5, 1, 0])
    offsets = torch.nn.functional.pad(torch.cumsum(counts, 0), (1, 0))
    x = torch.randn(int(counts.sum()), D, generator=gen(11))
    w = torch.randn(E, D, F, generator=gen(12))
    out = grouped_mm(x, w, counts, offsets, impl)
    torch.testing.assert_close(out, naive_grouped_mm(x, w, counts.tolist()), rtol=1e-5, atol=1e-5)


@needs_grouped_mm
def test_grouped_mm_supported_rules():
    x, w = torch.randn(4, 8), torch.randn(2, 8, 12)
    assert grouped_mm_supported(x, w)
    assert not grouped_mm_supported(x.double(), w.double())          # no float64
    assert not grouped_mm_supported(torch.randn(4, 7), torch.randn(2, 7, 12))  # 28-byte rows
    assert not grouped_mm_supported(x, torch.randn(2, 8, 5))
    assert not grouped_mm_supported(x, w.double())


def test_grouped_mm_all_empty_and_float64_loop():
    counts = torch.zeros(3, dtype=torch.long)
    offsets = torch.zeros(4, dtype=torch.int64)
    out = grouped_mm(torch.zeros(0, 4, dtype=torch.float64), torch.randn(3, 4, 6, dtype=torch.float64),
                     counts, offsets)
    assert out.shape == (0, 6) and out.dtype == torch.float64


def test_grouped_mm_without_torch_grouped_mm_falls_back_to_loop(monkeypatch):
    """A torch without `torch._grouped_mm`: "auto" loops (same result), a forced "grouped_mm" says why."""
    from moe_routing import MoELayer
    from moe_routing.experts import GroupedExperts

    monkeypatch.delattr(torch, "_grouped_mm", raising=False)
    x, w = torch.randn(4, 8, generator=gen(30)), torch.randn(2, 8, 12, generator=gen(31))
    assert not grouped_mm_supported(x, w)
    counts = torch.tensor([1, 3])
    offsets = torch.nn.functional.pad(torch.cumsum(counts, 0), (1, 0))
    torch.testing.assert_close(grouped_mm(x, w, counts, offsets), naive_grouped_mm(x, w, [1, 3]),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"expert_impl='grouped_mm' needs torch._grouped_mm.*'auto'"):
        grouped_mm(x, w, counts, offsets, "grouped_mm")
    with pytest.raises(ValueError, match="needs torch._grouped_mm"):
        GroupedExperts(2, 8, 12, expert_impl="grouped_mm")
    with pytest.raises(ValueError, match="needs torch._grouped_mm"):
        MoELayer(8, 12, 2, 1, expert_impl="grouped_mm")
    layer = MoELayer(16, 8, 4, 2, losses=[])  # auto: fp32, aligned sizes, yet no _grouped_mm -> the loop
    layer(torch.randn(5, 16)).sum().backward()
    assert layer.experts.w_up.grad is not None


def test_grouped_mm_available_checks_the_device_kernel(monkeypatch):
    from moe_routing.ops import grouped_mm_available

    assert not grouped_mm_available(torch.device("meta"))  # only CPU and CUDA are used
    monkeypatch.delattr(torch, "_grouped_mm", raising=False)
    assert not grouped_mm_available(torch.device("cpu"))
    assert not grouped_mm_available(torch.device("cuda"))


def test_gradcheck_grouped_mm_loop():
    counts = torch.tensor([2, 0, 3])
    offsets = torch.nn.functional.pad(torch.cumsum(counts, 0), (1, 0))
    x = torch.randn(5, 3, generator=gen(17), dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 3, 4, generator=gen(18), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: grouped_mm(x, w, counts, offsets, "loop"), (x, w))


@needs_grouped_mm
def test_grouped_mm_op_backward_matches_loop_fp32():
    """`_grouped_mm_op` (custom op around torch._grouped_mm, fp32 only) backward vs autograd of the loop."""
    E, D, F = 4, 8, 12
    counts = torch.tensor([4, 0, 7, 2])
    ends = torch.cumsum(counts, 0).to(torch.int32)  # the private op takes _grouped_mm's end offsets
    x = torch.randn(13, D, generator=gen(19))
    w = torch.randn(E, D, F, generator=gen(20))
    g = torch.randn(13, F, generator=gen(21))
    grads = []
    for fn in (lambda x, w: _grouped_mm_op(x, w, ends), lambda x, w: _loop_mm(x, w, counts)):
        xi, wi = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        out = fn(xi, wi)
        # a non-contiguous incoming gradient: the op's backward must cope
        (out * g.t().contiguous().t()).sum().backward()
        grads.append((out.detach(), xi.grad, wi.grad))
    (o1, gx1, gw1), (o2, gx2, gw2) = grads
    torch.testing.assert_close(o1, o2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx1, gx2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw1, gw2, rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(gw1[1]) == 0
    # and with a transposed (non-contiguous) dy fed straight into autograd.grad
    xi, wi = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    out = _grouped_mm_op(xi, wi, ends)
    dy = torch.randn(F, 13, generator=gen(22)).t()
    gx, gw = torch.autograd.grad(out, (xi, wi), dy)
    xl, wl = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    gxl, gwl = torch.autograd.grad(_loop_mm(xl, wl, counts), (xl, wl), dy)
    torch.testing.assert_close(gx, gxl, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, gwl, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", [pytest.param("grouped_mm", marks=needs_grouped_mm), "loop"])
@pytest.mark.parametrize("counts", [[0, 0, 0], [3, 0, 2], [0, 5, 0]])
def test_grouped_mm_zero_rows_forward_backward(impl, counts):
    counts_E = torch.tensor(counts)
    offsets_E1 = torch.nn.functional.pad(torch.cumsum(counts_E, 0), (1, 0))
    N = sum(counts)
    x = torch.randn(N, 8, generator=gen(15), requires_grad=True)
    w = torch.randn(3, 8, 4, generator=gen(16), requires_grad=True)
    out = grouped_mm(x, w, counts_E, offsets_E1, impl)
    out.sum().backward()  # an expanded (stride-0) incoming gradient, as sum() gives
    assert out.shape == (N, 4) and x.grad.shape == (N, 8) and w.grad is not None and w.grad.shape == w.shape
    ref_out, ref_gw, start = torch.zeros(N, 4), torch.zeros(3, 8, 4), 0
    for e, n in enumerate(counts):
        for r in range(start, start + n):
            ref_out[r] = x[r].detach() @ w[e].detach()
            ref_gw[e] += torch.outer(x[r].detach(), torch.ones(4))
        start += n
    torch.testing.assert_close(out.detach(), ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad, ref_gw, rtol=1e-5, atol=1e-5)
