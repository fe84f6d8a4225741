"""Memory of one forward+backward call, for bench_layer.py (see its docstring for what the numbers mean).

A variant is anything with ``grads`` (tensors whose ``.grad`` the call fills), ``reset()`` (sets them to None)
and ``__call__`` (reset, then one forward + backward).
"""
from __future__ import annotations

import gc

from torch import Tensor


def peak_alloc_bytes(v) -> tuple[int, int]:
    """(peak bytes held by tensors allocated during one call, bytes of the gradients it leaves): the gradients
    are part of the peak."""
    from torch.profiler import ProfilerActivity, profile
    v.reset()
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        v()
    grads = sum(t.grad.untyped_storage().nbytes() for t in v.grads if t.grad is not None)
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    held = peak = 0
    for e in events:
        held += e.nbytes()
        peak = max(peak, held)
    v.reset()
    return peak, grads


def saved_bytes(v) -> int:
    """Bytes of distinct storages autograd saves for backward during one call, leaves excluded."""
    import torch
    leaves = {t.untyped_storage().data_ptr() for t in v.grads}
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in leaves:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        v()
    v.reset()
    return sum(seen.values())
