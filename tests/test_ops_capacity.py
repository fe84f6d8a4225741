"""moe_routing/ops/capacity.py: expert_capacity (exact for decimal factors; a tensor token count without a host
sync) and capacity_keep_mask (by weight or by position, with padding and ties) against naive loops, and the
capacity-dispatch property."""
from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moe_routing.ops import (capacity_keep_mask, combine, expert_capacity, invert_permutation, permute,
                             sort_by_expert)

from helpers import E, HYP, OpLog, gen, random_routing


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


def test_expert_capacity_is_exact_for_decimal_factors():
    from moe_routing.ops import expert_capacity

    assert expert_capacity(1.1, 100, 1, 10) == 11  # float arithmetic gives 11.000000000000002 -> 12
    assert expert_capacity(1.0, 7, 2, 4) == 4
    assert expert_capacity(1.25, 10, 2, 8) == 4


@pytest.mark.parametrize("cf", [1.0, 1.1, 0.3, 1.25, 2.0, 0.001, 3.7])
def test_tensor_capacity_is_exact_and_matches_int(cf):
    for n in (0, 1, 7, 10, 100, 999):
        got = expert_capacity(cf, torch.tensor(n), 3, 7, max_tokens=1000)
        assert isinstance(got, torch.Tensor) and got.dtype == torch.int64
        exact = min(math.ceil(Fraction(str(cf)) * n * 3 / 7), n)  # an expert takes at most one pair per token
        assert int(got) == exact == expert_capacity(cf, n, 3, 7)
    # no bound, or one that could overflow int64: the count is read on the host and an int comes back
    assert expert_capacity(cf, torch.tensor(10), 3, 7) == expert_capacity(cf, 10, 3, 7)
    assert isinstance(expert_capacity(1.2345678901234567, torch.tensor(10), 3, 7, max_tokens=2 ** 40), int)
    with pytest.raises(ValueError, match="num_tokens"):
        expert_capacity(cf, torch.tensor([3, 4]), 3, 7, max_tokens=10)


def _naive_keep(experts, weights, valid, cap, policy):
    keep = [False] * len(experts)
    for e in range(E):
        mine = [i for i in range(len(experts)) if experts[i] == e and valid[i]]
        if policy == "weight":
            mine.sort(key=lambda i: (-weights[i], i))
        for i in mine[:cap]:
            keep[i] = True
    return keep


@pytest.mark.parametrize("policy", ["weight", "position"])
def test_capacity_mask_with_padding_and_tensor_capacity_has_no_sync(policy):
    g = gen(4)
    expert_N = torch.randint(0, E, (31,), generator=g)
    weight_N = torch.rand(31, generator=g).round(decimals=1)  # ties
    valid_N = torch.rand(31, generator=g) > 0.3
    with OpLog() as log:
        cap = expert_capacity(0.8, valid_N.sum(), 1, E, max_tokens=31)
        keep = capacity_keep_mask(expert_N, weight_N, E, cap, policy, valid_N)
    assert log.syncing() == []
    ref = _naive_keep(expert_N.tolist(), weight_N.tolist(), valid_N.tolist(), int(cap), policy)
    assert keep.tolist() == ref and int(cap) == math.ceil(0.8 * int(valid_N.sum()) / E)


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
