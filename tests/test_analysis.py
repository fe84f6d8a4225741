"""moe_routing/analysis: SRP and SCH against brute-force loops written from the definitions (ljcleo/moe-lrc), the
expert-cache simulator against hand traces, and Belady against an exhaustive search (no policy beats it)."""
import functools
import random

import pytest
import torch

from moe_routing.analysis import hit_rate_curve, plot_hit_rates, sch, simulate_cache, srp


def _random_routing(T, L, K, E, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(L)]) for _ in range(T)])


def _naive_srp(seqs, E, m):
    out = []
    L = seqs[0].shape[1]
    for layer in range(L):
        counts = [sum(1 for t in range(w, w + m) if e in s[t, layer].tolist())
                  for s in seqs for w in range(s.shape[0] - m + 1) for e in range(E)]
        act = sum(counts)
        best = 0.0
        for j in range(m + 1):
            tp = sum(c for c in counts if c >= j)
            pred = m * sum(1 for c in counts if c >= j)
            best = max(best, 2 * tp / max(pred + act, 1))
        out.append(best)
    return out


@pytest.mark.parametrize("m", [1, 3, 4])
def test_srp_matches_brute_force(m):
    x = _random_routing(23, 3, 2, 6, seed=m)
    lens = [10, 2, 11]  # the middle sequence is shorter than some windows
    got = srp(x, 6, m, seq_lens=lens)
    seqs = [s for s in x.split(lens) if s.shape[0] >= m]
    torch.testing.assert_close(got, torch.tensor(_naive_srp(seqs, 6, m), dtype=torch.float64))


def test_srp_of_constant_routing_is_one_and_of_a_sweep_is_low():
    const = torch.tensor([[[0, 1]]] * 12)  # the same two experts every token: every window predicted exactly
    assert srp(const, 4, 4).item() == pytest.approx(1.0)
    sweep = torch.tensor([[[t % 8]] for t in range(64)])  # a new expert every token
    assert srp(sweep, 8, 8).item() < 0.3


def _direct_sch(seq, E, m, C):
    """A cache of exactly C experts simulated directly: every expert of a token is looked up first; a miss with
    the cache full evicts the cached expert of lowest (uses in the look-ahead window, last use); a first access
    with a free slot counts as a hit."""
    s = seq.tolist()
    count, last, cache, seen = [0] * E, [0] * E, [], set()
    for row in s[:m]:
        for x in row:
            count[x] += 1
    hits, ts = 0, 0
    for i, row in enumerate(s):
        free = C - len(seen)
        for x in row:
            if x in cache:
                hits += 1
            elif x not in seen:
                hits += free > 0
                free -= 1
        for x in row:
            seen.add(x)
            if x not in cache:
                if len(cache) == C:
                    cache.remove(min(cache, key=lambda y: (count[y], last[y])))
                cache.append(x)
            ts += 1
            count[x] -= 1
            last[x] = ts
        if i + m < len(s):
            for x in s[i + m]:
                count[x] += 1
    return hits / seq.numel()


@pytest.mark.parametrize("m", [1, 2, 5])
def test_sch_equals_a_cache_of_each_size_simulated_directly(m):
    x = _random_routing(30, 2, 2, 7, seed=10 + m)
    lens = [17, 13]
    got = sch(x, 7, m, seq_lens=lens)
    for layer in range(2):
        want = [sum(_direct_sch(s[:, layer], 7, m, C) for s in x.split(lens)) / 2 for C in range(1, 8)]
        torch.testing.assert_close(got[layer], torch.tensor(want, dtype=torch.float64))
    assert (got.diff(dim=1) >= 0).all() and torch.allclose(got[:, -1], torch.ones(2, dtype=torch.float64))


def test_sch_matches_the_authors_code_on_a_pinned_trace():
    """Output of ljcleo/moe-lrc src/41_sch_calc.py::calc_fsf on this trace (E=4, future length 3)."""
    trace = torch.tensor([[0], [1], [2], [0], [3], [1], [1], [2], [3], [0]])
    got = sch(trace[:, None, :], 4, 3)[0]
    torch.testing.assert_close(got, torch.tensor([0.2, 0.5, 0.8, 1.0], dtype=torch.float64))


def test_cache_policies_on_a_hand_trace():
    trace = torch.tensor([[0], [1], [2], [0], [3], [0], [1]])
    # cache of 2. LRU: 0m 1m 2m(evict 0) 0m(evict 1) 3m(evict 2) 0h 1m -> 1 hit
    assert simulate_cache(trace, 2, "lru") == pytest.approx(1 / 7)
    # LFU: 0m 1m 2m(evict 0: uses 1 each, oldest) 0m(evict 1) 3m(evict 2) 0h 1m -> 1 hit
    assert simulate_cache(trace, 2, "lfu") == pytest.approx(1 / 7)
    # Belady: 0m 1m 2m(evict 1: next use farthest) 0h 3m(evict 2: never again) 0h 1m -> 2 hits
    assert simulate_cache(trace, 2, "belady") == pytest.approx(2 / 7)
    curve = hit_rate_curve(trace, [1, 2, 4])
    assert curve["belady"][-1] == pytest.approx(3 / 7)  # everything fits: only first uses miss


def test_hit_rate_plot_is_written(tmp_path):
    trace = torch.tensor([[0], [1], [2], [0], [3], [0], [1]])
    path = plot_hit_rates([1, 2, 4], hit_rate_curve(trace, [1, 2, 4]), tmp_path / "cache.png", active=1)
    assert path.read_bytes()[:4] == b"\x89PNG"


def _optimal_hits(req, C):
    """Exhaustive search over every eviction choice."""
    @functools.lru_cache(maxsize=None)
    def best(i, cache):
        if i == len(req):
            return 0
        x = req[i]
        if x in cache:
            return 1 + best(i + 1, cache)
        if len(cache) < C:
            return best(i + 1, tuple(sorted(cache + (x,))))
        return max(best(i + 1, tuple(sorted(tuple(c for c in cache if c != y) + (x,)))) for y in cache)

    return best(0, ())


def test_belady_is_optimal_on_random_traces():
    rng = random.Random(0)
    for _ in range(25):
        T, K, E, C = rng.randint(3, 7), rng.randint(1, 2), rng.randint(3, 5), rng.randint(2, 3)
        trace = torch.tensor([rng.sample(range(E), K) for _ in range(T)])
        req = tuple(trace.reshape(-1).tolist())
        belady = simulate_cache(trace, C, "belady")
        assert belady == pytest.approx(_optimal_hits(req, C) / len(req))
        assert belady >= simulate_cache(trace, C, "lru") and belady >= simulate_cache(trace, C, "lfu")


def test_bad_inputs_are_named():
    x = _random_routing(5, 1, 1, 4, 0)
    with pytest.raises(ValueError, match="out of range for num_experts=2"):
        srp(x, 2, 2)
    with pytest.raises(ValueError, match="seq_lens must be non-negative and sum to T=5"):
        sch(x, 4, 2, seq_lens=[2, 2])
    with pytest.raises(ValueError, match="-1 rows"):
        srp(torch.full((3, 1, 1), -1), 4, 2)
    with pytest.raises(ValueError, match="policy must be one of"):
        simulate_cache(x[:, 0], 2, "fifo")
    with pytest.raises(ValueError, match="cache_size must be a positive int"):
        simulate_cache(x[:, 0], True, "lru")
    with pytest.raises(ValueError, match="seg_len must be a positive int"):
        srp(x, 4, 0)
