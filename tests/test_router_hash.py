"""moe_routing/routers/hash.py: the paper's frequency-balanced assignment against a naive greedy loop, token
counting from a stream, the id-balanced random map, the table-free hash against Python integers, the router's
decision from token ids, its token-id errors (without reading device values off the host), and argument checks."""
from __future__ import annotations

import pytest
import torch

from moe_routing import MoELayer, RoutingContext
from moe_routing.routers.hash import (HashRouter, count_tokens, frequency_balanced_expert_map, hash_experts,
                                     id_balanced_expert_map)

D, E, V = 7, 6, 50


@pytest.mark.parametrize("k", [1, 3])
def test_id_balanced_map_is_balanced_distinct_and_seeded(k):
    m = id_balanced_expert_map(103, 8, k, seed=1)
    assert m.shape == (103, k) and m.dtype == torch.long and 0 <= int(m.min()) and int(m.max()) < 8
    counts = torch.bincount(m.flatten(), minlength=8)
    assert int(counts.max() - counts.min()) <= k and int(counts.sum()) == 103 * k
    assert all(len(set(row)) == k for row in m.tolist())
    assert torch.equal(m, id_balanced_expert_map(103, 8, k, seed=1))
    assert not torch.equal(m, id_balanced_expert_map(103, 8, k, seed=2))


def naive_frequency_greedy(counts, n_e, k):
    """Roller et al. 2021 sec. 3: ids from most to least frequent (ties: lower id), each to the k emptiest
    experts (ties: lower expert id); a linear scan instead of a heap."""
    loads = [0.0] * n_e
    table = {}
    for v in sorted(range(len(counts)), key=lambda v: (-counts[v], v)):
        chosen = []
        for _ in range(k):
            chosen.append(min((e for e in range(n_e) if e not in chosen), key=lambda e: (loads[e], e)))
        for e in chosen:
            loads[e] += counts[v]
        table[v] = chosen
    return [table[v] for v in range(len(counts))], loads


@pytest.mark.parametrize("n_e,k", [(1, 1), (5, 1), (8, 3), (4, 4)])
def test_frequency_balanced_map_matches_naive_greedy(n_e, k):
    g = torch.Generator().manual_seed(n_e * 10 + k)
    counts = (1000 * torch.rand(97, generator=g) ** 4).floor()          # Zipf-like, with ties and zeros
    counts[[3, 40]] = 0
    m = frequency_balanced_expert_map(counts, n_e, k)
    ref, loads = naive_frequency_greedy(counts.tolist(), n_e, k)
    assert m.dtype == torch.long and m.tolist() == ref
    assert all(len(set(row)) == k for row in m.tolist())
    # token loads (what the paper balances) vs the ids-balanced table, on the same data
    load = torch.zeros(n_e, dtype=torch.float64).index_add_(0, m.flatten(), counts.double().repeat_interleave(k))
    assert load.tolist() == loads
    if k == 1:
        assert float(load.max() - load.min()) <= float(counts.max())  # the greedy bound
    if n_e > k:
        ids_map = id_balanced_expert_map(97, n_e, k, seed=0)
        ids_load = torch.zeros(n_e, dtype=torch.float64).index_add_(0, ids_map.flatten(),
                                                                   counts.double().repeat_interleave(k))
        assert float(load.max() - load.min()) < float(ids_load.max() - ids_load.min())


def test_count_tokens_from_a_stream_and_the_router_table():
    stream = [torch.tensor([[0, 1, 1], [4, 4, 4]]), torch.tensor([4, 2]), torch.tensor([], dtype=torch.long)]
    counts = count_tokens(stream, 6)
    assert counts.tolist() == [1, 2, 1, 0, 4, 0] and counts.dtype == torch.long
    assert torch.equal(count_tokens(torch.tensor([1, 1, 5]), 6), torch.tensor([0, 2, 0, 0, 0, 1]))
    r = HashRouter(D, 3, 1, token_counts=counts)
    assert r.assignment == "frequency" and r.vocab_size == 6
    # 4 (count 4) -> 0, 1 (2) -> 1, 0 (1) -> 2, 2 (1) -> 2 (load 1 < 2), then the zero counts 3, 5 -> 1 (2 = 2: lower id)
    assert r.expert_map[:, 0].tolist() == [2, 1, 2, 1, 0, 1]
    ids = torch.tensor([4, 4, 1, 0, 5])
    d = r(torch.randn(5, D), RoutingContext(token_ids=ids))
    assert d.experts_TK[:, 0].tolist() == [0, 0, 1, 2, 1]
    assert HashRouter(D, 3, 1, vocab_size=6).assignment == "ids" and HashRouter(D, 3, 1).assignment == "hash"
    with pytest.raises(ValueError, match=r"\[0, 6\)"):
        count_tokens([torch.tensor([0, 6])], 6)
    with pytest.raises(TypeError, match="integer tensors"):
        count_tokens([torch.tensor([0.5])], 6)


def naive_hash(v, n_e, k, seed):
    def mix(h):
        h = (((h >> 16) ^ h) * 0x45D9F3B) % 2**32
        h = (((h >> 16) ^ h) * 0x45D9F3B) % 2**32
        return (h >> 16) ^ h
    chosen = []
    for j in range(k):
        salt = ((seed + 1) * 0x9E3779B9 + j * 0x632BE5AB) % 2**32
        r = mix((v % 2**32) ^ salt) * (n_e - j) // 2**32
        chosen.append([e for e in range(n_e) if e not in chosen][r])
    return chosen


def test_table_free_hash_matches_python_ints_and_spreads():
    ids = torch.tensor([0, 1, 2, 49, 2**31 + 5, 2**40 + 3, 123456789])
    for k, seed in [(1, 0), (3, 7)]:
        assert hash_experts(ids, E, k, seed).tolist() == [naive_hash(v, E, k, seed) for v in ids.tolist()]
    out = hash_experts(torch.arange(24000), 8, 2)
    assert all(len(set(row)) == 2 for row in out[:500].tolist())
    counts = torch.bincount(out.flatten(), minlength=8).double()
    assert (counts / counts.mean() - 1).abs().max() < 0.05


@pytest.mark.parametrize("vocab", [V, None])
def test_hash_router_decision(vocab):
    r = HashRouter(D, E, 2, vocab_size=vocab, seed=3)
    ids = torch.randint(0, V, (2, 5))
    d = r(torch.randn(10, D), RoutingContext(token_ids=ids))
    expect = r.expert_map[ids.flatten()] if vocab else hash_experts(ids.flatten(), E, 2, 3)
    assert torch.equal(d.experts_TK, expect) and d.scores_normalized
    assert torch.equal(d.weights_TK, torch.full((10, 2), 0.5)) and torch.equal(d.logits_TE, torch.zeros(10, E))
    assert torch.equal(d.scores_TE, torch.zeros(10, E).scatter_(1, expect, 0.5))
    if vocab:
        assert "expert_map" in r.state_dict() and r.default_losses() == []
    forced = torch.zeros(10, 2, dtype=torch.long) + torch.tensor([4, 2])
    assert torch.equal(r(torch.randn(10, D), RoutingContext(token_ids=ids, forced_experts={1: forced}), 1).experts_TK,
                       forced)


def test_hash_router_token_id_errors():
    r = HashRouter(D, E, 1, vocab_size=V)
    x = torch.randn(4, D)
    with pytest.raises(ValueError, match="routing_context"):
        r(x)
    with pytest.raises(ValueError, match="routing_context"):
        MoELayer(D, 5, E, 1, router=r)(x)
    with pytest.raises(ValueError, match=r"\[0, 50\)"):
        r(x, RoutingContext(token_ids=torch.tensor([0, 1, 50, 2])))
    with pytest.raises(ValueError, match="token_ids"):
        HashRouter(D, E, 1)(x, RoutingContext(token_ids=torch.tensor([0, -1, 5, 2])))
    with pytest.raises(ValueError, match="4 tokens"):
        r(x, RoutingContext(token_ids=torch.tensor([0, 1])))


@pytest.mark.parametrize("vocab", [V, None])
def test_hash_router_reads_no_device_values_off_the_host(vocab, monkeypatch):
    """The id-range check read two values back to the host in every forward (a sync per hash layer on GPU).
    Off the CPU it now runs only with MOE_ROUTING_DEBUG=1; the meta device stands in for an accelerator here:
    any host read of its values raises."""
    r = HashRouter(D, E, 2, vocab_size=vocab, seed=1).to("meta")
    ctx = RoutingContext(token_ids=torch.zeros(2, 5, dtype=torch.long, device="meta"))
    monkeypatch.delenv("MOE_ROUTING_DEBUG", raising=False)
    d = r.route(torch.empty(10, D, device="meta"), ctx, None)  # Router.forward's autocast guard has no meta
    assert d.experts_TK.shape == (10, 2) and d.experts_TK.device.type == "meta"
    assert d.scores_TE.shape == (10, E)
    monkeypatch.setenv("MOE_ROUTING_DEBUG", "1")
    with pytest.raises(RuntimeError, match="meta"):  # the debug check does read the values
        r.route(torch.empty(10, D, device="meta"), ctx, None)


BAD = [
    (lambda: HashRouter(D, E, 0), ValueError, "top_k"),
    (lambda: HashRouter(D, E, 1, vocab_size=0), ValueError, "vocab_size"),
    (lambda: HashRouter(D, E, 1, seed=1.5), TypeError, "seed"),
    (lambda: HashRouter(D, E, 1, token_counts=torch.ones(5), vocab_size=6), ValueError, "vocab_size=6"),
    (lambda: HashRouter(D, E, 1, token_counts=torch.ones(2, 3)), ValueError, "1-D"),
    (lambda: HashRouter(D, E, 1, token_counts=torch.tensor([1.0, -2.0])), ValueError, ">= 0"),
    (lambda: HashRouter(D, E, 1, token_counts=torch.tensor([1.0, float("nan")])), ValueError, "finite"),
    (lambda: frequency_balanced_expert_map(torch.ones(4), 3, 4), ValueError, "top_k"),
    (lambda: frequency_balanced_expert_map(torch.ones(0), 3, 1), ValueError, "non-empty"),
    (lambda: count_tokens(torch.tensor([1]), 0), ValueError, "vocab_size"),
]


@pytest.mark.parametrize("make,exc,match", BAD)
def test_bad_arguments(make, exc, match):
    with pytest.raises(exc, match=match):
        make()
