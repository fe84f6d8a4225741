"""An expert-cache simulator that replays recorded routing: how often the experts a token needs are already in a
cache of C experts (GPU memory, with the rest offloaded), under LRU, LFU or Belady's optimal policy.

Model: the trace of one layer, ``trace_TK`` [T, K], is served token by token and, within a token, expert by
expert in column order (a flattened request sequence); a request is a hit when the expert is cached, else a
miss that loads it, evicting one expert if the cache is full. The cache starts empty (first uses are misses).
Belady evicts the cached expert whose next request is farthest in the future (never requested again first),
which is optimal for this request sequence: no policy has fewer misses on the same trace.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

POLICIES = ("lru", "lfu", "belady")


def _requests(trace_TK: Tensor) -> np.ndarray:
    if not isinstance(trace_TK, Tensor) or trace_TK.dim() != 2 or trace_TK.is_floating_point():
        raise ValueError(f"trace must be an integer tensor [T, K] (one layer of experts_TLK), got "
                         f"{getattr(trace_TK, 'dtype', type(trace_TK))} {tuple(getattr(trace_TK, 'shape', ()))}")
    req = trace_TK.detach().cpu().to(torch.int64).reshape(-1).numpy()
    if (req < 0).any():
        raise ValueError("trace holds -1 (unreported tokens): drop those rows first")
    return req


def _next_use(req: np.ndarray) -> np.ndarray:
    """For each request, the index of the next request of the same expert (len(req) if none)."""
    nxt = np.full(len(req), len(req), dtype=np.int64)
    last: dict[int, int] = {}
    for i in range(len(req) - 1, -1, -1):
        nxt[i] = last.get(int(req[i]), len(req))
        last[int(req[i])] = i
    return nxt


def simulate_cache(trace: Tensor, cache_size: int, policy: str = "lru") -> float:
    """Hit rate (hits / requests) of a ``cache_size``-expert cache on ``trace`` [T, K] under ``policy``."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if not isinstance(cache_size, int) or isinstance(cache_size, bool) or cache_size < 1:
        raise ValueError(f"cache_size must be a positive int, got {cache_size!r}")
    req = _requests(trace)
    if req.size == 0:
        return float("nan")
    nxt = _next_use(req) if policy == "belady" else None
    cached: dict[int, float] = {}  # expert -> eviction key (the smallest is evicted)
    uses: dict[int, int] = {}
    hits = 0
    for i, x in enumerate(req.tolist()):
        uses[x] = uses.get(x, 0) + 1
        if x in cached:
            hits += 1
        elif len(cached) >= cache_size:
            del cached[min(cached, key=cached.__getitem__)]
        if policy == "lru":
            cached[x] = i
        elif policy == "lfu":  # least used so far, then least recently used
            cached[x] = uses[x] * (len(req) + 1) + i
        else:  # farthest next use evicted first: key = -next use
            cached[x] = -int(nxt[i])
    return hits / req.size


def hit_rate_curve(trace: Tensor, cache_sizes: Sequence[int], policies: Sequence[str] = POLICIES) -> dict:
    """{policy: [hit rate at each cache size]} for one layer's trace."""
    return {p: [simulate_cache(trace, c, p) for c in cache_sizes] for p in policies}


def plot_hit_rates(cache_sizes: Sequence[int], curves: dict, path, active: int | None = None,
                   title: str = "Expert cache hit rate") -> "Path":
    """Hit rate against cache size, one line per entry of ``curves`` ({label: [rate per size]}, e.g. the output
    of `hit_rate_curve` or SCH rows); ``active`` marks multiples of the active experts per token (needs
    matplotlib, the ``ablate`` extra)."""
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, rates in curves.items():
        ax.plot(list(cache_sizes), list(rates), marker="o", ms=3, label=label)
    if active:
        for mult in (1, 2, 4):
            if mult * active <= max(cache_sizes):
                ax.axvline(mult * active, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("cache size (experts)")
    ax.set_ylabel("hit rate")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
