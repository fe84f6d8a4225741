"""Dispatch ops: one op per file, each with a torch reference backend (the one kernels are checked against)."""
from .backend import BACKENDS, resolve_backend
from .capacity import DROP_POLICIES, capacity_keep_mask, expert_capacity
from .combine import combine
from .counts import csr_offsets, expert_counts, invert_permutation, sort_by_expert
from .grouped_mm import grouped_mm, grouped_mm_available, grouped_mm_supported
from .permute import permute
from .topk_softmax import topk_softmax

__all__ = ["BACKENDS", "resolve_backend", "DROP_POLICIES", "capacity_keep_mask", "expert_capacity", "combine",
           "csr_offsets", "expert_counts", "invert_permutation", "sort_by_expert", "grouped_mm", "grouped_mm_available",
           "grouped_mm_supported", "permute", "topk_softmax"]
