"""Dispatch-op microbenchmarks: permute, combine and combine-backward over a shape sweep.

Reports achieved GB/s (bytes each op must move) and the ratio to a plain device copy of the same number of
bytes, measured in the same run. On CPU it measures the torch backend on a reduced sweep (the full sweep needs
tens of GB); on a CUDA machine the torch and Triton backends on the full sweep (or use benchmarks/gpu_check.py).

    .venv/bin/python -m pytest benchmarks/bench_kernels.py --benchmark-only [-k permute]
"""
from __future__ import annotations

import itertools

import pytest
import torch

from moe_routing.ops import combine, inverse_order, permute, sort_by_expert
from moe_routing.ops.combine import _combine_backward

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
FULL = list(itertools.product((4096, 16384, 65536), (1024, 4096), (8, 64, 256), (1, 2, 8)))
CPU_SWEEP = list(itertools.product((4096, 16384), (1024,), (8, 64, 256), (1, 2, 8)))
SHAPES = FULL if CUDA else CPU_SWEEP
BACKENDS = ("torch", "triton") if CUDA else ("torch",)


def _inputs(T, D, E, K):
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    experts_TK = torch.rand(T, E, device=DEVICE, generator=gen).topk(K, dim=-1).indices
    token_N = torch.arange(T, device=DEVICE).repeat_interleave(K)
    order_N, _, _ = sort_by_expert(experts_TK.reshape(-1), E)
    x = torch.randn(T, D, device=DEVICE, dtype=DTYPE, generator=gen)
    h = torch.randn(T * K, D, device=DEVICE, dtype=DTYPE, generator=gen)
    w = torch.rand(T * K, device=DEVICE, generator=gen)
    return x, h, w, token_N, order_N, inverse_order(order_N)


def _copy_seconds(nbytes: int, benchmark_like) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    return benchmark_like(lambda: dst.copy_(src))


def _time(fn, rounds=5) -> float:
    import time

    fn()
    best = []
    for _ in range(rounds):
        if CUDA:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if CUDA:
            torch.cuda.synchronize()
        best.append(time.perf_counter() - t0)
    return sorted(best)[len(best) // 2]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["permute", "combine", "combine_bwd"])
@pytest.mark.parametrize("T,D,E,K", SHAPES)
def test_dispatch_op(benchmark, op, T, D, E, K, backend):
    x, h, w, token_N, order_N, row_N = _inputs(T, D, E, K)
    item = x.element_size()
    if op == "permute":
        rows_N = token_N[order_N]
        fn, nbytes = (lambda: permute(x, rows_N, backend)), 2 * T * K * D * item
    elif op == "combine":
        fn, nbytes = (lambda: combine(h, w, row_N, token_N, T, K, backend)), (T * K + T) * D * item
    else:
        dy = torch.randn(T, D, device=DEVICE, dtype=DTYPE)
        fn, nbytes = (lambda: _combine_backward(dy, h, w, row_N, token_N, backend)), 3 * T * K * D * item
    benchmark.pedantic(fn, rounds=5, warmup_rounds=1)
    seconds = benchmark.stats.stats.median
    copy_s = _copy_seconds(nbytes // 2, _time)  # a copy of nbytes/2 moves nbytes (read + write)
    benchmark.extra_info.update({"GBps": nbytes / seconds / 1e9, "copy_GBps": nbytes / copy_s / 1e9,
                                 "ratio_to_copy": seconds / copy_s, "device": str(DEVICE)})
