"""moe_routing.ops against naive Python loops: permute, combine, sort_by_expert, invert_permutation,
capacity_keep_mask, grouped_mm; gradcheck of every custom autograd op; hypothesis properties; bad inputs."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_routing.ops import (capacity_keep_mask, combine, expert_capacity, grouped_mm, grouped_mm_supported,
                             invert_permutation, permute, resolve_backend, sort_by_expert)
from moe_routing.ops.grouped_mm import _grouped_mm_op, _loop_mm
from conftest import needs_grouped_mm

RTOL64, ATOL64 = 1e-12, 1e-12
HYP = settings(max_examples=25, deadline=None)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def random_routing(T, E, k, seed):
    """Fixed-k routing: k distinct experts per token, token-sorted pairs."""
    g = gen(seed)
    experts = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) if T else torch.zeros(0, k)
    token_N = torch.arange(T).repeat_interleave(k)
    return token_N, experts.reshape(-1).long()


# ------------------------------------------------------------------------------------------ naive loops
def naive_sort(expert_N, E):
    order = []
    for e in range(E):
        order += [i for i in range(expert_N.numel()) if int(expert_N[i]) == e]
    counts = [sum(1 for v in expert_N.tolist() if v == e) for e in range(E)]
    return order, counts


def naive_combine(h_ND, weight_N, row_of_pair_N, token_N, T):
    y = torch.zeros(T, h_ND.shape[1], dtype=torch.float64)
    for p in range(weight_N.numel()):
        y[int(token_N[p])] += float(weight_N[p]) * h_ND[int(row_of_pair_N[p])].double()
    return y


def naive_keep(expert_N, weight_N, E, cap, policy, valid_N=None):
    keep = [False] * expert_N.numel()
    for e in range(E):
        mine = [i for i in range(expert_N.numel()) if int(expert_N[i]) == e
                and (valid_N is None or bool(valid_N[i]))]
        if policy == "weight":
            mine.sort(key=lambda i: (-float(weight_N[i]), i))
        for i in mine[:cap]:
            keep[i] = True
    return keep


def naive_grouped_mm(x_ND, w_EDF, counts):
    out, start = [], 0
    for e, n in enumerate(counts):
        for r in range(start, start + n):
            out.append(x_ND[r] @ w_EDF[e])
        start += n
    return torch.stack(out) if out else x_ND.new_zeros(0, w_EDF.shape[2])


# ------------------------------------------------------------------------------------------ forward values
def test_sort_by_expert_is_stable_and_counts():
    expert_N = torch.tensor([2, 0, 2, 1, 0, 2, 2, 0, 4])
    pair_of_row, counts, offsets = sort_by_expert(expert_N, 5)
    ref_order, ref_counts = naive_sort(expert_N, 5)
    assert pair_of_row.tolist() == ref_order
    assert counts.tolist() == ref_counts == [3, 1, 4, 0, 1]
    assert offsets.dtype == torch.int64 and offsets.tolist() == [0, 3, 4, 8, 8, 9]  # CSR [E+1]
    assert pair_of_row.dtype == torch.int64


def test_invert_permutation():
    pair_of_row = torch.randperm(17, generator=gen(0))
    row_of_pair = invert_permutation(pair_of_row)
    for j in range(17):
        assert int(row_of_pair[int(pair_of_row[j])]) == j
    assert torch.equal(pair_of_row[row_of_pair], torch.arange(17))


def test_permute_matches_loop():
    x = torch.randn(6, 5, generator=gen(1), dtype=torch.float64)
    src_token = torch.tensor([3, 0, 0, 5, 2, 3, 3], dtype=torch.int32)
    out = permute(x, src_token, "torch")
    assert out.shape == (7, 5) and out.dtype == x.dtype
    for n in range(7):
        assert torch.equal(out[n], x[int(src_token[n])])


@pytest.mark.parametrize("fixed_k", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_combine_matches_loop(fixed_k, dtype):
    T, E, k, D = 9, 5, 3, 6
    token_N, expert_N = random_routing(T, E, k, seed=2)
    if not fixed_k:  # variable k: drop some pairs (token 4 loses all of them)
        keep = torch.ones_like(token_N, dtype=torch.bool)
        keep[[0, 5, 12, 13, 14, 20]] = False
        token_N, expert_N = token_N[keep], expert_N[keep]
    N = token_N.numel()
    pair_of_row, _, _ = sort_by_expert(expert_N, E)
    row_of_pair = invert_permutation(pair_of_row)
    h = torch.randn(N, D, generator=gen(3)).to(dtype)
    w = torch.rand(N, generator=gen(4), dtype=torch.float32)
    y = combine(h, w, row_of_pair, token_N, T, k if fixed_k else None, "torch")
    assert y.dtype == dtype and y.shape == (T, D)
    ref = naive_combine(h, w, row_of_pair, token_N, T)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol)
    if not fixed_k:
        assert torch.count_nonzero(y[4]) == 0


def test_combine_fixed_and_variable_paths_agree():
    T, E, k, D = 11, 4, 2, 7
    token_N, expert_N = random_routing(T, E, k, seed=5)
    pair_of_row, _, _ = sort_by_expert(expert_N, E)
    row_of_pair = invert_permutation(pair_of_row)
    h = torch.randn(T * k, D, generator=gen(6), dtype=torch.float64)
    w = torch.rand(T * k, generator=gen(7), dtype=torch.float64)
    torch.testing.assert_close(combine(h, w, row_of_pair, token_N, T, k, "torch"),
                               combine(h, w, row_of_pair, token_N, T, None, "torch"), rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("policy", ["weight", "position"])
def test_capacity_keep_mask_matches_loop(policy):
    T, E, k = 23, 4, 2
    token_N, expert_N = random_routing(T, E, k, seed=8)
    w = torch.rand(T * k, generator=gen(9))
    w[3] = w[10] = w[17] = 0.5  # some ties
    for cap in (0, 1, 3, 7, 100):
        keep = capacity_keep_mask(expert_N, w, E, cap, policy)
        assert keep.dtype == torch.bool
        assert keep.tolist() == naive_keep(expert_N, w, E, cap, policy), cap
    valid_N = torch.rand(T, generator=gen(10))[token_N] > 0.3
    keep = capacity_keep_mask(expert_N, w, E, 4, policy, valid_N)
    assert keep.tolist() == naive_keep(expert_N, w, E, 4, policy, valid_N)
    assert not bool(keep[~valid_N].any())


def test_capacity_weight_ties_prefer_earlier_pair():
    expert_N = torch.zeros(6, dtype=torch.long)
    w = torch.tensor([0.2, 0.7, 0.7, 0.1, 0.7, 0.9])
    assert capacity_keep_mask(expert_N, w, 1, 3, "weight").tolist() == [False, True, True, False, False, True]
    assert capacity_keep_mask(expert_N, w, 1, 3, "position").tolist() == [True, True, True, False, False, False]


def test_expert_capacity():
    assert expert_capacity(1.0, 10, 2, 4) == 5
    assert expert_capacity(1.25, 10, 2, 4) == math.ceil(1.25 * 20 / 4) == 7
    assert expert_capacity(0.01, 1, 1, 8) == 1
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="capacity_factor"):
            expert_capacity(bad, 10, 2, 4)


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


# ---------------------------------------------------------------------------------------------- gradients
def test_gradcheck_permute():
    x = torch.randn(5, 3, generator=gen(13), dtype=torch.float64, requires_grad=True)
    src_token = torch.tensor([4, 0, 0, 2, 4, 4, 1])  # token 3 unused, repeats accumulate
    assert torch.autograd.gradcheck(lambda x: permute(x, src_token, "torch"), (x,))


@pytest.mark.parametrize("fixed_k", [True, False])
def test_gradcheck_combine(fixed_k):
    T, E, k, D = 5, 4, 2, 3
    token_N, expert_N = random_routing(T, E, k, seed=14)
    if not fixed_k:
        keep = torch.tensor([True, False, True, True, False, False, True, True, True, False])
        token_N, expert_N = token_N[keep], expert_N[keep]
    N = token_N.numel()
    row_of_pair = invert_permutation(sort_by_expert(expert_N, E)[0])
    h = torch.randn(N, D, generator=gen(15), dtype=torch.float64, requires_grad=True)
    w = torch.rand(N, generator=gen(16), dtype=torch.float64, requires_grad=True)
    top_k = k if fixed_k else None
    assert torch.autograd.gradcheck(lambda h, w: combine(h, w, row_of_pair, token_N, T, top_k, "torch"), (h, w))


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


def test_permute_backward_sums_rows():
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    src_token = torch.tensor([1, 1, 3, 1])
    g = torch.randn(4, 3, generator=gen(23), dtype=torch.float64)
    (permute(x, src_token, "torch") * g).sum().backward()
    ref = torch.zeros(4, 3, dtype=torch.float64)
    for n in range(4):
        ref[int(src_token[n])] += g[n]
    torch.testing.assert_close(x.grad, ref, rtol=RTOL64, atol=ATOL64)


# ------------------------------------------------------------------------------------------------ properties
@HYP
@given(T=st.integers(1, 12), E=st.integers(1, 6), data=st.data())
def test_prop_permute_then_combine_gives_k_times_x(T, E, data):
    k = data.draw(st.integers(1, E))
    seed = data.draw(st.integers(0, 2 ** 16))
    D = data.draw(st.integers(1, 9))
    token_N, expert_N = random_routing(T, E, k, seed)
    pair_of_row, counts, _ = sort_by_expert(expert_N, E)
    x = torch.randn(T, D, generator=gen(seed), dtype=torch.float64)
    x_ND = permute(x, token_N[pair_of_row], "torch")
    # rows are grouped by expert, in token order within an expert
    assert torch.equal(expert_N[pair_of_row], torch.sort(expert_N, stable=True).values)
    ones = torch.ones(T * k, dtype=torch.float64)
    row_of_pair = invert_permutation(pair_of_row)
    for top_k in (k, None):
        y = combine(x_ND, ones, row_of_pair, token_N, T, top_k, "torch")
        torch.testing.assert_close(y, x * k, rtol=1e-14, atol=1e-14)
        if k == 1:
            assert torch.equal(y, x)


@HYP
@given(T=st.integers(1, 20), E=st.integers(1, 6), policy=st.sampled_from(["weight", "position"]),
       cf=st.floats(0.1, 2.0), data=st.data())
def test_prop_capacity_dispatch_rows(T, E, policy, cf, data):
    k = data.draw(st.integers(1, E))
    seed = data.draw(st.integers(0, 2 ** 16))
    token_N, expert_N = random_routing(T, E, k, seed)
    w = torch.rand(T * k, generator=gen(seed + 1))
    cap = expert_capacity(cf, T, k, E)
    keep = capacity_keep_mask(expert_N, w, E, cap, policy)
    pair_of_row, counts, offsets = sort_by_expert(expert_N[keep], E)
    routed, kept = T * k, int(keep.sum())
    drops = routed - kept
    # dispatched rows == routed pairs - drops; no expert above capacity; each expert keeps min(load, cap)
    assert int(counts.sum()) == pair_of_row.numel() == routed - drops
    assert int(counts.max()) <= cap
    load = torch.bincount(expert_N, minlength=E)
    assert torch.equal(counts, load.clamp(max=cap))
    assert keep.tolist() == naive_keep(expert_N, w, E, cap, policy)
    # and the dispatched-then-combined output covers exactly the kept pairs
    x = torch.randn(T, 3, generator=gen(seed + 2), dtype=torch.float64)
    tok = token_N[keep]
    y = combine(permute(x, tok[pair_of_row], "torch"), w[keep].double(), invert_permutation(pair_of_row), tok, T, None,
                "torch")
    ref = torch.zeros(T, 3, dtype=torch.float64)
    for p in range(T * k):
        if keep[p]:
            ref[int(token_N[p])] += float(w[p]) * x[int(token_N[p])]
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------ bad inputs
def test_combine_rejects_bad_inputs():
    h = torch.randn(6, 4)
    row_of_pair = torch.arange(6)
    tok = torch.arange(3).repeat_interleave(2)
    with pytest.raises(ValueError, match="weight_N"):
        combine(h, torch.ones(5), row_of_pair, tok, 3, 2)
    with pytest.raises(ValueError, match="top_k"):
        combine(h, torch.ones(6), row_of_pair, tok, 3, 4)
    with pytest.raises(ValueError, match="row_of_pair_N"):
        combine(h, torch.ones(6), row_of_pair[:4], tok, 3, 2)
    with pytest.raises(ValueError, match="h_ND"):
        combine(h[None], torch.ones(6), row_of_pair, tok, 3, 2)
    with pytest.raises(ValueError, match="backend"):
        combine(h, torch.ones(6), row_of_pair, tok, 3, 2, backend="nope")


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


def test_other_bad_inputs():
    with pytest.raises(ValueError, match="drop_policy"):
        capacity_keep_mask(torch.tensor([0, 1]), torch.ones(2), 2, 1, "random")
    counts = torch.tensor([2])
    with pytest.raises(ValueError, match="expert_impl"):
        grouped_mm(torch.randn(2, 4), torch.randn(1, 4, 4), counts, counts.int(), "fast")
    with pytest.raises(ValueError, match="grouped_mm"):
        grouped_mm(torch.randn(2, 4, dtype=torch.float64), torch.randn(1, 4, 4, dtype=torch.float64), counts,
                   counts.int(), "grouped_mm")
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("tpu")


def test_triton_backend_unavailable_on_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("MOE_ROUTING_BACKEND", raising=False)
    with pytest.raises(ValueError, match="triton backend is unavailable"):
        resolve_backend("triton", torch.device("cpu"))
    with pytest.raises(ValueError, match="cuda backend is unavailable"):
        resolve_backend("cuda", torch.device("cpu"))
    assert resolve_backend("auto", torch.device("cpu")) == "torch"


def test_layer_with_unavailable_triton_backend_raises_before_compute(monkeypatch):
    from moe_routing import MoELayer

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("MOE_ROUTING_BACKEND", raising=False)
    layer = MoELayer(8, 4, 4, 2, backend="triton", losses=[])
    with pytest.raises(ValueError, match="triton backend is unavailable"):
        layer(torch.randn(3, 8))
    assert layer.last_stats == {}  # nothing ran


def test_expert_capacity_is_exact_for_decimal_factors():
    from moe_routing.ops import expert_capacity

    assert expert_capacity(1.1, 100, 1, 10) == 11  # float arithmetic gives 11.000000000000002 -> 12
    assert expert_capacity(1.0, 7, 2, 4) == 4
    assert expert_capacity(1.25, 10, 2, 8) == 4


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_combine_rejects_unsorted_or_out_of_range_tokens_on_every_backend(backend):
    """Checked before the backend is chosen: the kernels' CSR offsets would silently misassign such pairs."""
    h = torch.randn(4, 3)
    w = torch.ones(4)
    rows = torch.arange(4)
    for token_N, match in ((torch.tensor([0, 1, 0, 1]), "non-decreasing"), (torch.tensor([0, 0, 1, 5]), "outside"),
                           (torch.tensor([-1, 0, 1, 1]), "outside")):
        with pytest.raises(ValueError, match=match):
            combine(h, w, rows, token_N, 2, backend=backend)
    with pytest.raises(ValueError, match="row_of_pair_N has values"):
        combine(h, w, torch.tensor([0, 1, 2, 9]), torch.tensor([0, 0, 1, 1]), 2, backend=backend)
