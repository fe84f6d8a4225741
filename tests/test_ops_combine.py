"""moe_routing/ops/combine.py: combine (expert rows, gate-weighted, summed back per token) for fixed and variable
k against a loop, gradcheck, a backward that skips the gradient nobody needs, the permute-then-combine property,
and bad inputs."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moe_routing.ops import combine, invert_permutation, permute, sort_by_expert

from helpers import E, HYP, gen, random_routing


def naive_combine(h_ND, weight_N, row_of_pair_N, token_N, T):
    y = torch.zeros(T, h_ND.shape[1], dtype=torch.float64)
    for p in range(weight_N.numel()):
        y[int(token_N[p])] += float(weight_N[p]) * h_ND[int(row_of_pair_N[p])].double()
    return y


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


def _routing(T=6, k=2, seed=11):
    g = gen(seed)
    token_N = torch.arange(T).repeat_interleave(k)
    expert_N = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).reshape(-1)
    return token_N, invert_permutation(sort_by_expert(expert_N, E)[0])


@pytest.mark.parametrize("fixed_k", [True, False])
def test_combine_backward_skips_weight_grad_when_not_needed(fixed_k):
    token_N, row_of_pair_N = _routing()
    h = torch.randn(12, 5, generator=gen(12), dtype=torch.float64, requires_grad=True)
    w = torch.rand(12, generator=gen(13), dtype=torch.float64)
    top_k = 2 if fixed_k else None
    y = combine(h, w, row_of_pair_N, token_N, 6, top_k, "torch")
    dy = torch.randn(6, 5, generator=gen(14), dtype=torch.float64)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        (d_h,) = torch.autograd.grad(y, h, dy)
    assert not any(e.name == "aten::bmm" for e in prof.events())  # d_weight (a batched dot) not computed
    ref = torch.zeros(12, 5, dtype=torch.float64)
    for p in range(12):
        ref[int(row_of_pair_N[p])] = float(w[p]) * dy[int(token_N[p])]
    torch.testing.assert_close(d_h, ref, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda hh: combine(hh, w, row_of_pair_N, token_N, 6, top_k, "torch"), (h,))
    # only the weights need grad: h gets none, d_w still right
    wg = w.clone().requires_grad_(True)
    (d_w,) = torch.autograd.grad(combine(h.detach(), wg, row_of_pair_N, token_N, 6, top_k, "torch"), wg, dy)
    ref_w = [float(dy[int(token_N[p])] @ h.detach()[int(row_of_pair_N[p])]) for p in range(12)]
    torch.testing.assert_close(d_w, torch.tensor(ref_w, dtype=torch.float64), rtol=1e-12, atol=1e-12)


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
