"""`router_shift_weights` (RSPO), `routing_mismatch` and `logprob_mismatch` against naive float64 loops."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moe_routing.replay import logprob_mismatch, router_shift_weights, routing_mismatch

from helpers import HYP, gen


def random_experts(T, L, E, K, seed, unreported=0.0):
    g = gen(seed)
    out = torch.stack([torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(L)]) for _ in range(T)]) \
        if T else torch.zeros(0, L, K, dtype=torch.long)
    if unreported:
        drop_TL = torch.rand(T, L, generator=g) < unreported
        out[drop_TL] = -1
    return out


def log_softmax_TLE(T, L, E, seed):
    return torch.randn(T, L, E, generator=gen(seed), dtype=torch.float64).log_softmax(-1)


# ---- RSPO ----------------------------------------------------------------------------------------------------

def naive_rspo(lo, ln, ex, gamma_min):
    T, L, K = ex.shape
    out = []
    for t in range(T):
        total, count = 0.0, 0
        for l in range(L):
            if any(int(ex[t, l, k]) < 0 for k in range(K)):
                continue
            for k in range(K):
                e = int(ex[t, l, k])
                total += abs(float(ln[t, l, e]) - float(lo[t, l, e]))
                count += 1
        gamma = math.exp(-total / count) if count else 1.0
        out.append(max(gamma, gamma_min))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("T, L, E, K, unreported", [(7, 3, 8, 2, 0.0), (13, 2, 5, 5, 0.3), (1, 1, 3, 1, 0.0),
                                                    (6, 4, 9, 3, 0.9), (0, 2, 4, 2, 0.0)])
def test_rspo_matches_naive_loop(T, L, E, K, unreported):
    lo = log_softmax_TLE(T, L, E, 1)
    ln = (lo + 0.3 * torch.randn(T, L, E, generator=gen(2), dtype=torch.float64)).log_softmax(-1)
    ex = random_experts(T, L, E, K, 3, unreported)
    for gamma_min in (0.0, 0.8):
        got = router_shift_weights(lo, ln, ex, gamma_min=gamma_min)
        assert got.shape == (T,) and got.dtype == torch.float64
        torch.testing.assert_close(got, naive_rspo(lo, ln, ex, gamma_min), rtol=1e-12, atol=0)


def test_rspo_is_one_without_shift_detached_and_floored():
    lo = log_softmax_TLE(5, 2, 6, 4)
    ex = random_experts(5, 2, 6, 2, 5)
    assert torch.equal(router_shift_weights(lo, lo.clone(), ex), torch.ones(5, dtype=torch.float64))
    ln = (lo * 3).log_softmax(-1).requires_grad_()
    w = router_shift_weights(lo, ln, ex.to(torch.uint8), gamma_min=0.5)
    assert not w.requires_grad and bool((w >= 0.5).all()) and bool((w <= 1).all())
    # only the old choice matters: moving the log-probs of experts nobody chose changes nothing
    lo2 = lo.clone()
    chosen = torch.zeros_like(lo, dtype=torch.bool).scatter_(2, ex, True)
    lo2[~chosen] -= 5.0
    torch.testing.assert_close(router_shift_weights(lo2, lo, ex), torch.ones(5, dtype=torch.float64))


def test_rspo_errors():
    lo = log_softmax_TLE(4, 2, 6, 0)
    ex = random_experts(4, 2, 6, 2, 0)
    with pytest.raises(ValueError, match=r"gamma_min must be a finite number in \[0.0, 1.0\]"):
        router_shift_weights(lo, lo, ex, gamma_min=float("nan"))
    with pytest.raises(TypeError, match=r"gamma_min must be a number"):
        router_shift_weights(lo, lo, ex, gamma_min=True)
    with pytest.raises(ValueError, match=r"logp_old_TLE has shape \(4, 2, 6\) but logp_new_TLE has \(4, 2, 5\)"):
        router_shift_weights(lo, lo[..., :5], ex)
    with pytest.raises(ValueError, match=r"experts_old_TLK has shape \(3, 2, 2\) but .*\[4, 2\]"):
        router_shift_weights(lo, lo, ex[:3])
    with pytest.raises(ValueError, match=r"ids outside \[0, 6\)"):
        router_shift_weights(lo, lo, ex + 6)
    with pytest.raises(TypeError, match=r"integer expert ids"):
        router_shift_weights(lo, lo, ex.double())
    with pytest.raises(ValueError, match=r"logp_new_TLE must be a floating-point \[T, L, E\]"):
        router_shift_weights(lo, lo[0], ex)


# ---- routing mismatch ----------------------------------------------------------------------------------------

def naive_mismatch(a, b, mask=None):
    T, L, K = a.shape
    differ_l, count_l = [0] * L, [0] * L
    jac, n_rows, tok_any, tok_n = 0.0, 0, 0, 0
    for t in range(T):
        if mask is not None and not bool(mask[t]):
            continue
        any_cmp = any_diff = False
        for l in range(L):
            A, B = [int(v) for v in a[t, l]], [int(v) for v in b[t, l]]
            if min(A) < 0 or min(B) < 0:
                continue
            any_cmp = True
            count_l[l] += 1
            sa, sb = set(A), set(B)
            if sa != sb:
                differ_l[l] += 1
                any_diff = True
            jac += len(sa & sb) / len(sa | sb)
            n_rows += 1
        tok_n += any_cmp
        tok_any += any_diff
    per_layer = torch.tensor([d / c if c else 0.0 for d, c in zip(differ_l, count_l)], dtype=torch.float64)
    return per_layer, tok_any / tok_n if tok_n else 0.0, jac / n_rows if n_rows else 1.0, count_l


@pytest.mark.parametrize("T, L, E, K, unreported, masked", [(20, 3, 6, 2, 0.0, False), (17, 4, 5, 3, 0.2, True),
                                                            (9, 2, 4, 4, 0.5, False), (0, 2, 4, 2, 0.0, False),
                                                            (5, 1, 8, 1, 1.0, True)])
def test_routing_mismatch_matches_naive_loop(T, L, E, K, unreported, masked):
    a = random_experts(T, L, E, K, 7, unreported)
    b = a.clone()
    flip = torch.rand(T, L, generator=gen(8)) < 0.4
    b[flip] = random_experts(T, L, E, K, 9)[flip]
    b[torch.rand(T, L, generator=gen(10)) < unreported] = -1
    b = b.flip(-1)  # column order must not matter
    mask = (torch.rand(T, generator=gen(11)) < 0.7) if masked else None
    got = routing_mismatch(a.to(torch.int16), b, mask)
    per_layer, any_layer, jaccard, count_l = naive_mismatch(a, b, mask)
    torch.testing.assert_close(got.per_layer_L, per_layer, rtol=1e-12, atol=0)
    torch.testing.assert_close(got.any_layer, torch.tensor(any_layer, dtype=torch.float64), rtol=1e-12, atol=0)
    torch.testing.assert_close(got.jaccard, torch.tensor(jaccard, dtype=torch.float64), rtol=1e-12, atol=0)
    assert got.compared_L.tolist() == count_l


def test_routing_mismatch_identical_sets_in_any_order_agree():
    a = random_experts(10, 3, 8, 4, 12)
    perm = torch.stack([torch.randperm(4, generator=gen(13)) for _ in range(30)]).view(10, 3, 4)
    b = a.gather(2, perm)
    got = routing_mismatch(a.to(torch.uint8), b)
    assert float(got.any_layer) == 0.0 and float(got.jaccard) == 1.0 and bool((got.per_layer_L == 0).all())


def test_routing_mismatch_errors():
    a = random_experts(4, 2, 6, 2, 0)
    with pytest.raises(ValueError, match=r"a_TLK has shape \(4, 2, 2\) but b_TLK has \(3, 2, 2\)"):
        routing_mismatch(a, a[:3])
    with pytest.raises(ValueError, match=r"token_mask_T must be a bool tensor of shape \[4\]"):
        routing_mismatch(a, a, torch.ones(4))
    with pytest.raises(TypeError, match=r"b_TLK must hold integer expert ids"):
        routing_mismatch(a, a.float())


# ---- log-prob mismatch ---------------------------------------------------------------------------------------

@given(st.integers(0, 40), st.integers(0, 10_000), st.booleans())
@HYP
def test_logprob_mismatch_matches_naive_loop(n, seed, masked):
    g = gen(seed)
    infer = -torch.rand(n, generator=g, dtype=torch.float64) * 5
    train = (infer + torch.randn(n, generator=g, dtype=torch.float64)).float()
    mask = torch.rand(n, generator=g) < 0.6 if masked else None
    got = logprob_mismatch(train, infer, mask)
    terms, big, count = 0.0, 0, 0
    for i in range(n):
        if mask is not None and not bool(mask[i]):
            continue
        d = float(train[i]) - float(infer[i])
        terms += math.exp(d) - 1 - d
        big += abs(d) > math.log(2)
        count += 1
    torch.testing.assert_close(got.k3_kl, torch.tensor(terms / count if count else 0.0, dtype=torch.float64),
                               rtol=1e-10, atol=1e-15)
    assert float(got.frac_ratio_out_2x) == (big / count if count else 0.0)
    assert float(got.num_tokens) == count


def test_logprob_mismatch_masked_entries_may_be_non_finite_and_shapes_checked():
    train = torch.tensor([[-1.0, float("-inf")], [-0.5, float("nan")]])
    infer = torch.tensor([[-1.0, -2.0], [-0.5, -1.0]])
    mask = torch.tensor([[True, False], [True, False]])
    got = logprob_mismatch(train, infer, mask)
    assert float(got.k3_kl) == 0.0 and float(got.frac_ratio_out_2x) == 0.0 and float(got.num_tokens) == 2
    with pytest.raises(ValueError, match=r"logp_train has shape \(2, 2\) but logp_infer has \(4,\)"):
        logprob_mismatch(train, infer.reshape(-1))
    with pytest.raises(ValueError, match=r"mask must be a bool tensor of shape \(2, 2\)"):
        logprob_mismatch(train, infer, mask.float())
    with pytest.raises(TypeError, match=r"logp_infer must be a floating-point tensor"):
        logprob_mismatch(train, infer.long())
