"""moe_routing/multihash.py (MultiHash layer, Roller et al. 2021 sec. 3): output and gradients against a naive
per-token, per-segment loop in float64, N = 1 as the plain hash layer, the hash tables, and argument checks."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_routing import MoELayer, RoutingContext
from moe_routing.multihash import MultiHashFFN
from moe_routing.routers.hash import HashRouter, hash_experts, id_balanced_expert_map


def naive_multihash(x_TD, buckets_TN, w_gate, w_up, w_down, activation):
    """v_t = [act_i(x_t, bucket k_i, hidden segment i)]_i, y_t = [v_t @ w_down[k_i][:, output segment i]]_i."""
    T, D = x_TD.shape
    N = buckets_TN.shape[1]
    Fn, Dn = w_up.shape[2] // N, D // N
    rows = []
    for t in range(T):
        v = []
        for i in range(N):
            k = int(buckets_TN[t, i])
            cols = slice(i * Fn, (i + 1) * Fn)
            up = x_TD[t] @ w_up[k][:, cols]
            if activation == "swiglu":
                v.append(F.silu(x_TD[t] @ w_gate[k][:, cols]) * up)
            else:
                v.append(torch.relu(up) if activation == "relu" else F.gelu(up))
        v = torch.cat(v)
        rows.append(torch.cat([v @ w_down[int(buckets_TN[t, i])][:, i * Dn:(i + 1) * Dn] for i in range(N)]))
    return torch.stack(rows)


@pytest.mark.parametrize("activation,N,T,vocab", [("swiglu", 3, 11, 40), ("relu", 2, 1, 40), ("gelu", 4, 9, None),
                                                  ("swiglu", 1, 6, None)])
def test_matches_naive_loop_with_gradients_float64(activation, N, T, vocab):
    torch.manual_seed(N * 100 + T)
    D, Fh, K = 12, 24, 5
    layer = MultiHashFFN(D, Fh, K, N, vocab_size=vocab, activation=activation, seed=3, dtype=torch.float64)
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 40, (T,))
    y = layer(x, token_ids=ids)
    buckets = layer.buckets(ids)
    assert buckets.shape == (T, N) and int(buckets.min()) >= 0 and int(buckets.max()) < K
    ex = layer.experts
    params = [p for p in (ex.w_gate, ex.w_up, ex.w_down) if p is not None]
    leaves = [p.detach().clone().requires_grad_() for p in params]
    x_ref = x.detach().clone().requires_grad_()
    gate = leaves[0] if activation == "swiglu" else None
    y_ref = naive_multihash(x_ref, buckets, gate, *leaves[-2:], activation)
    torch.testing.assert_close(y, y_ref, rtol=1e-11, atol=1e-12)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *params], dy)
    grads_ref = torch.autograd.grad(y_ref, [x_ref, *leaves], dy)
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_one_hash_is_the_plain_hash_layer_and_segments_mix_buckets():
    torch.manual_seed(1)
    D, Fh, K, V = 8, 6, 4, 30
    mh = MultiHashFFN(D, Fh, K, 1, vocab_size=V, dtype=torch.float64)
    layer = MoELayer(D, Fh, K, 1, router=HashRouter(D, K, 1, vocab_size=V), losses=[]).double()
    layer.experts.load_state_dict(mh.experts.state_dict())
    layer.router.expert_map.copy_(mh.hash_map)
    x, ids = torch.randn(2, 7, D, dtype=torch.float64), torch.randint(0, V, (2, 7))
    torch.testing.assert_close(mh(x, ctx=RoutingContext(token_ids=ids)), layer(x, RoutingContext(token_ids=ids)),
                               rtol=1e-12, atol=1e-13)
    # N = 2 differs from routing the token to its first hash's whole expert (segments take other buckets)
    mh2 = MultiHashFFN(D, Fh, K, 2, vocab_size=V, dtype=torch.float64)
    b = mh2.buckets(ids.flatten())
    assert bool((b[:, 0] != b[:, 1]).any())


def test_hash_tables_are_seeded_per_hash():
    mh = MultiHashFFN(8, 8, 5, 4, vocab_size=50, seed=7)
    assert mh.hash_map.shape == (50, 4) and "hash_map" in mh.state_dict()
    for i in range(4):
        assert torch.equal(mh.hash_map[:, i], id_balanced_expert_map(50, 5, 1, 7 + i)[:, 0])
    free = MultiHashFFN(8, 8, 5, 2, seed=2)
    ids = torch.tensor([0, 3, 2**35 + 1])
    assert torch.equal(free.buckets(ids)[:, 1], hash_experts(ids, 5, 1, 3)[:, 0])


@pytest.mark.parametrize("impl", ["auto", "loop"])
def test_float32_matches_float64(impl):
    torch.manual_seed(2)
    layer = MultiHashFFN(16, 32, 4, 4, vocab_size=30, expert_impl=impl)  # aligned sizes: _grouped_mm where it exists
    x, ids = torch.randn(21, 16), torch.randint(0, 30, (21,))
    y = layer(x, token_ids=ids)
    y64 = layer.double()(x.double(), token_ids=ids)
    torch.testing.assert_close(y.double(), y64, rtol=1e-4, atol=1e-5)


def test_bf16_forward_backward():
    layer = MultiHashFFN(8, 8, 3, 2, vocab_size=20).to(torch.bfloat16)
    x = torch.randn(2, 5, 8, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x, token_ids=torch.randint(0, 20, (2, 5)))
    assert y.shape == x.shape and y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.experts.w_down.grad is not None and torch.isfinite(x.grad.float()).all()


BAD = [
    (lambda: MultiHashFFN(10, 8, 4, 4), ValueError, "num_hashes must divide"),
    (lambda: MultiHashFFN(8, 6, 4, 4), ValueError, "num_hashes must divide"),
    (lambda: MultiHashFFN(8, 8, 0, 2), ValueError, "num_buckets"),
    (lambda: MultiHashFFN(8, 8, 4, True), TypeError, "num_hashes"),
    (lambda: MultiHashFFN(8, 8, 4, 2, activation="tanh"), ValueError, "activation"),
    (lambda: MultiHashFFN(8, 8, 4, 2, vocab_size=0), ValueError, "vocab_size"),
    (lambda: MultiHashFFN(8, 8, 4, 2)(torch.randn(3, 8)), ValueError, "needs token ids"),
    (lambda: MultiHashFFN(8, 8, 4, 2)(torch.randn(3, 8), token_ids=torch.tensor([1, 2])), ValueError, "3 tokens"),
    (lambda: MultiHashFFN(8, 8, 4, 2, vocab_size=5)(torch.randn(2, 8), token_ids=torch.tensor([1, 5])),
     ValueError, r"\[0, 5\)"),
    (lambda: MultiHashFFN(8, 8, 4, 2)(torch.randn(2, 8), token_ids=torch.tensor([0.0, 1.0])), TypeError, "integer"),
    (lambda: MultiHashFFN(8, 8, 4, 2)(torch.randn(2, 7), token_ids=torch.tensor([0, 1])), ValueError, r"\[\.\.\., 8\]"),
]


@pytest.mark.parametrize("make,exc,match", BAD)
def test_bad_arguments(make, exc, match):
    with pytest.raises(exc, match=match):
        make()
