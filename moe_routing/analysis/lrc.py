"""Local routing consistency (Liang et al. 2025, "Not All Models Suit Expert Offloading: On Local Routing
Consistency of Mixture-of-Expert Models", arXiv 2505.16056; definitions follow the authors' code,
github ljcleo/moe-lrc ``src/30_srp_calc.py``, ``31_srp_refine.py`` and ``41_sch_calc.py``).

Both metrics read recorded routing, ``experts_TLK`` [T, L, K] (the replay record's layout), split into
sequences; windows never cross a sequence boundary.

SRP (segment routing best performance), per layer and segment length m: over every window of m consecutive
tokens (stride 1) and every expert, let c be how many of the window's tokens route to the expert. Predicting
"the expert serves the whole window" whenever c >= j gives TP_j = sum_{c>=j} c, predictions m * #{c >= j} and
actual activations A = sum c; SRP is the best F1 = 2 TP_j / (pred_j + A) over thresholds j = 0..m, one threshold
for the whole layer (the authors' layer-level statistic; their bootstrap intervals are not reproduced here).

SCH (segment cache best hit rate), per layer, segment length m and cache size C: a cache of C experts that knows
the routing of the next m tokens and, on a miss, evicts the cached expert with the lowest priority (uses among
tokens i..i+m-1, then the least recent use); the hit rate of all accesses. The first access of each expert
counts as a hit when fewer than C distinct experts came before it (a free slot), as in the authors' code. All
experts of a token are looked up before any of them is loaded. Averaged per sequence, then over sequences. The
authors compute every C at once with Mattson's stack processing (a priority policy has the inclusion
property); so does `sch`, and the tests check it against a cache of each size simulated directly.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor


def split_sequences(experts_TLK: Tensor, seq_lens: Optional[Sequence[int]] = None) -> list[np.ndarray]:
    """[S_i, L, K] int64 numpy arrays, one per sequence (one sequence when ``seq_lens`` is None); rows holding the
    sentinel -1 (tokens the engine did not report) are an error here: these metrics need every token."""
    if not isinstance(experts_TLK, Tensor) or experts_TLK.dim() != 3 or experts_TLK.is_floating_point():
        raise ValueError(f"experts_TLK must be an integer tensor [T, L, K], got "
                         f"{getattr(experts_TLK, 'dtype', type(experts_TLK))} {tuple(getattr(experts_TLK, 'shape', ()))}")
    arr = experts_TLK.detach().cpu().to(torch.int64).numpy()
    if (arr < 0).any():
        raise ValueError("experts_TLK holds -1 rows (unreported tokens): drop them or split around them first")
    T = arr.shape[0]
    lens = [T] if seq_lens is None else [int(n) for n in seq_lens]
    if any(n < 0 for n in lens) or sum(lens) != T:
        raise ValueError(f"seq_lens must be non-negative and sum to T={T}, got sum {sum(lens)}")
    bounds = np.cumsum([0] + lens)
    return [arr[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def _check(num_experts: int, seg_len: int, seqs: list[np.ndarray]) -> None:
    for name, v in (("num_experts", num_experts), ("seg_len", seg_len)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    top = max((int(s.max()) for s in seqs if s.size), default=-1)
    if top >= num_experts:
        raise ValueError(f"experts_TLK holds expert id {top}, out of range for num_experts={num_experts}")


def srp(experts_TLK: Tensor, num_experts: int, seg_len: int, seq_lens: Optional[Sequence[int]] = None) -> Tensor:
    """Segment routing best performance per layer: float64 [L] (see the module docstring). Sequences shorter
    than ``seg_len`` contribute no window; a layer with no window at all gets NaN."""
    seqs = split_sequences(experts_TLK, seq_lens)
    _check(num_experts, seg_len, seqs)
    L = experts_TLK.shape[1]
    hist = np.zeros((L, seg_len + 1), dtype=np.int64)  # hist[l, c]: (window, expert) pairs with count c
    for s in seqs:
        S = s.shape[0]
        if S < seg_len:
            continue
        onehot = np.zeros((S + 1, L, num_experts), dtype=np.int64)
        np.add.at(onehot, (np.arange(1, S + 1)[:, None, None], np.arange(L)[None, :, None], s), 1)
        csum = onehot.cumsum(0)
        counts = csum[seg_len:] - csum[:-seg_len]  # [W, L, E]: uses of each expert in each window
        for layer in range(L):
            hist[layer] += np.bincount(counts[:, layer].ravel(), minlength=seg_len + 1)
    c = np.arange(seg_len + 1)
    tp = np.flip(np.flip(hist * c, 1).cumsum(1), 1)          # sum_{c >= j} c * hist[c]
    pred = np.flip(np.flip(hist, 1).cumsum(1), 1) * seg_len  # m * #{c >= j}
    act = tp[:, :1]
    f1 = 2 * tp / np.maximum(pred + act, 1)
    best = f1.max(1).astype(np.float64)
    best[hist.sum(1) == 0] = np.nan
    return torch.from_numpy(best)


def sch(experts_TLK: Tensor, num_experts: int, seg_len: int, seq_lens: Optional[Sequence[int]] = None) -> Tensor:
    """Segment cache best hit rate per layer and cache size: float64 [L, E], column C-1 for a cache of C experts
    (see the module docstring)."""
    seqs = split_sequences(experts_TLK, seq_lens)
    _check(num_experts, seg_len, seqs)
    L, E = experts_TLK.shape[1], num_experts
    curves = [_sch_one(s, E, seg_len) for s in seqs if s.shape[0] > 0]
    if not curves:
        return torch.full((L, E), float("nan"), dtype=torch.float64)
    return torch.from_numpy(np.mean(curves, axis=0))


def _sch_one(seq_SLK: np.ndarray, E: int, m: int) -> np.ndarray:
    """Hit-rate curve [L, E] of one sequence, layer by layer (pure Python: O(S K E) per layer)."""
    S, L, K = seq_SLK.shape
    return np.stack([_sch_layer(seq_SLK[:, layer].tolist(), E, m, S * K) for layer in range(L)])


def _sch_layer(seq: list[list[int]], E: int, m: int, accesses: int) -> np.ndarray:
    """Mattson's stack processing for the priority (uses in the look-ahead window, last use): one stack gives
    the hit count of every cache size (an access at depth d hits every cache larger than d). On an access the
    expert moves to the top and the item pushed down competes level by level with the items below it: the
    higher priority keeps the level, the lower one moves on, until the accessed expert's old level (or a new
    bottom level) takes it."""
    count, last = [0] * E, [0] * E
    for row in seq[:m]:
        for x in row:
            count[x] += 1
    stack: list[int] = []
    hits = [0] * (E + 1)
    distinct = ts = 0
    for i, row in enumerate(seq):
        for x in row:  # depths before this token's updates
            if x in stack:
                hits[stack.index(x)] += 1
            else:  # a first access: a hit for caches with a free slot left
                hits[distinct] += 1
                distinct += 1
        for x in row:
            depth = stack.index(x) if x in stack else len(stack)
            if depth:
                carried = stack[0]
                for j in range(1, depth):
                    y = stack[j]
                    if (count[y], last[y]) < (count[carried], last[carried]):
                        stack[j], carried = carried, y
                if depth < len(stack):
                    stack[depth] = carried
                else:
                    stack.append(carried)
                stack[0] = x
            elif not stack:
                stack.append(x)
            ts += 1
            count[x] -= 1
            last[x] = ts
        if i + m < len(seq):
            for x in seq[i + m]:
                count[x] += 1
    return np.cumsum(hits[:E]) / accesses
