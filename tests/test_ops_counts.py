"""moe_routing/ops/counts.py: sort_by_expert (stable order, counts, CSR offsets), invert_permutation,
expert_counts and csr_offsets against naive loops, without a host sync (no bincount)."""
from __future__ import annotations

import torch

from moe_routing.ops import invert_permutation
from moe_routing.ops.counts import csr_offsets, expert_counts, sort_by_expert

from helpers import OpLog, gen


def naive_sort(expert_N, E):
    order = []
    for e in range(E):
        order += [i for i in range(expert_N.numel()) if int(expert_N[i]) == e]
    counts = [sum(1 for v in expert_N.tolist() if v == e) for e in range(E)]
    return order, counts


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


def test_counts_and_offsets_without_bincount():
    expert_N = torch.tensor([3, 0, 3, 3, 1])
    with OpLog() as log:
        counts = expert_counts(expert_N, 5)
        weighted = expert_counts(expert_N, 5, torch.tensor([1, 0, 1, 1, 0]))
        pair_of_row, counts2, offsets = sort_by_expert(expert_N, 5, "torch")
        csr = csr_offsets(torch.tensor([0, 0, 2, 2, 2, 4]), 6)
    assert log.syncing() == []
    assert counts.tolist() == counts2.tolist() == [1, 1, 0, 3, 0] and counts.dtype == torch.int64
    assert weighted.tolist() == [0, 0, 0, 3, 0] and offsets.tolist() == [0, 1, 2, 2, 5, 5]
    assert csr.tolist() == [0, 2, 2, 5, 5, 6, 6] and csr_offsets(csr, 3, top_k=2).tolist() == [0, 2, 4, 6]
