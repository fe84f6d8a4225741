"""Dispatch-op microbenchmarks: permute, combine and combine-backward over a shape sweep, plus the router ops
(expert sort/counts, fused top-k + softmax vs the unfused torch ops TopKRouter runs).

Reports achieved GB/s (bytes each op must move) and the ratio to a plain device copy of the same number of
bytes, measured in the same run. On CPU it measures the torch backend on a reduced sweep (the full sweep needs
tens of GB); on a CUDA machine the torch and Triton backends on the full sweep (or use benchmarks/gpu_check.py).

    .venv/bin/python -m pytest benchmarks/bench_kernels.py --benchmark-only [-k permute]
    .venv/bin/python benchmarks/bench_kernels.py [--rounds 5] [--out DIR]   # CPU: writes results/kernels_cpu.*
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moe_routing.ops import combine, invert_permutation, permute, sort_by_expert  # noqa: E402
from moe_routing.ops.combine import _combine_backward  # noqa: E402
from moe_routing.ops.topk_softmax import topk_softmax  # noqa: E402
from _machine import cpu_count, cpu_model  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
FULL = list(itertools.product((4096, 16384, 65536), (1024, 4096), (8, 64, 256), (1, 2, 8)))
CPU_SWEEP = list(itertools.product((4096, 16384), (1024,), (8, 64, 256), (1, 2, 8)))
SHAPES = FULL if CUDA else CPU_SWEEP
BACKENDS = ("torch", "triton") if CUDA else ("torch",)
ROUTER_SHAPES = [(T, E, K) for T in (4096, 16384) for E, K in ((8, 2), (64, 8), (256, 8))]


def _inputs(T, D, E, K):
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    experts_TK = torch.rand(T, E, device=DEVICE, generator=gen).topk(K, dim=-1).indices
    token_N = torch.arange(T, device=DEVICE).repeat_interleave(K)
    pair_of_row_N, _, _ = sort_by_expert(experts_TK.reshape(-1), E)
    x = torch.randn(T, D, device=DEVICE, dtype=DTYPE, generator=gen)
    h = torch.randn(T * K, D, device=DEVICE, dtype=DTYPE, generator=gen)
    w = torch.rand(T * K, device=DEVICE, generator=gen)
    return x, h, w, token_N, pair_of_row_N, invert_permutation(pair_of_row_N)


def _copy_seconds(nbytes: int, benchmark_like) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    return benchmark_like(lambda: dst.copy_(src))


def _time(fn, rounds=5) -> float:
    """Median seconds of ``fn`` over ``rounds`` calls after one warm-up."""
    return _interleaved({"fn": fn}, rounds)["fn"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["permute", "combine", "combine_bwd"])
@pytest.mark.parametrize("T,D,E,K", SHAPES)
def test_dispatch_op(benchmark, op, T, D, E, K, backend):
    x, h, w, token_N, pair_of_row_N, row_of_pair_N = _inputs(T, D, E, K)
    item = x.element_size()
    if op == "permute":
        src_token_N = token_N[pair_of_row_N]
        fn, nbytes = (lambda: permute(x, src_token_N, backend)), 2 * T * K * D * item
    elif op == "combine":
        fn, nbytes = (lambda: combine(h, w, row_of_pair_N, token_N, T, K, backend)), (T * K + T) * D * item
    else:
        dy = torch.randn(T, D, device=DEVICE, dtype=DTYPE)
        fn, nbytes = (lambda: _combine_backward(dy, h, w, row_of_pair_N, token_N, backend)), 3 * T * K * D * item
    benchmark.pedantic(fn, rounds=5, warmup_rounds=1)
    seconds = benchmark.stats.stats.median
    copy_s = _copy_seconds(nbytes // 2, _time)  # a copy of nbytes/2 moves nbytes (read + write)
    benchmark.extra_info.update({"GBps": nbytes / seconds / 1e9, "copy_GBps": nbytes / copy_s / 1e9,
                                 "ratio_to_copy": seconds / copy_s, "device": str(DEVICE)})


@pytest.mark.parametrize("op", ["topk_unfused", "topk_softmax", "sort_by_expert"])
@pytest.mark.parametrize("T,E,K", ROUTER_SHAPES)
def test_router_op(benchmark, op, T, E, K):
    fn = _router_fns(T, E, K, BACKENDS[-1])[op]
    benchmark.pedantic(fn, rounds=5, warmup_rounds=1)
    benchmark.extra_info.update({"device": str(DEVICE)})


def _router_fns(T: int, E: int, K: int, backend: str) -> dict:
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    logits = torch.randn(T, E, device=DEVICE, generator=gen)
    expert_N = logits.topk(K, dim=-1).indices.reshape(-1)

    def unfused():  # what TopKRouter runs on the torch backend: softmax, top-k of the scores, gather, softmax
        idx = logits.softmax(-1).topk(K, dim=-1).indices
        return logits.gather(1, idx).softmax(-1), idx

    return {"topk_unfused": unfused, "topk_softmax": lambda: topk_softmax(logits, K, backend),
            "sort_by_expert": lambda: sort_by_expert(expert_N, E, backend)}


def _dispatch_fns(T: int, D: int, E: int, K: int, backend: str) -> dict:
    """name -> (fn, bytes the op must move)."""
    x, h, w, token_N, pair_of_row_N, row_of_pair_N = _inputs(T, D, E, K)
    dy = torch.randn(T, D, device=DEVICE, dtype=DTYPE)
    src_token_N = token_N[pair_of_row_N]
    item = x.element_size()
    return {"permute": (lambda: permute(x, src_token_N, backend), 2 * T * K * D * item),
            "combine": (lambda: combine(h, w, row_of_pair_N, token_N, T, K, backend), (T * K + T) * D * item),
            "combine_bwd": (lambda: _combine_backward(dy, h, w, row_of_pair_N, token_N, backend), 3 * T * K * D * item)}


def _interleaved(fns: dict, rounds: int) -> dict:
    """Median seconds per function, rounds interleaved (A B C A B C ...) so machine-load drift hits all alike."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            if CUDA:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if CUDA:
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _machine() -> dict:
    return {"cpu": cpu_model(), "cpus": cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "device": str(DEVICE), "dtype": str(DTYPE).split(".")[-1]}


def _write_md(payload: dict, path: Path) -> None:
    m = payload["machine"]
    busy = max(payload["load_before"][0], payload["load_after"][0]) > 0.5 * m["cpus"]
    lines = [f"# Dispatch and router kernels on CPU ({payload['date']})", "",
             f"{m['cpus']} CPUs ({m['cpu']}), torch {m['torch']} ({m['torch_threads']} threads), {m['dtype']}, "
             f"backend `{payload['backend']}`, median of {payload['rounds']} interleaved rounds, "
             f"{payload['wall_s']} s wall.", "",
             f"**Machine state: shared{' and busy' if busy else ''}** (load average "
             f"{payload['load_before'][0]:.1f} before, "
             f"{payload['load_after'][0]:.1f} after, on {m['cpus']} CPUs): other jobs ran throughout, so absolute "
             "numbers are pessimistic and noisy (±15% or worse); compare rows within this file only. The Triton "
             "interpreter and the CUDA twins are not timed here (CPU emulation says nothing about GPU speed).", "",
             "## Dispatch ops", "", "| op | T | D | E | K | ms | GB/s | copy GB/s | time / copy |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in payload["dispatch"]:
        lines.append(f"| {r['op']} | {r['T']} | {r['D']} | {r['E']} | {r['K']} | {r['s'] * 1e3:.2f} | "
                     f"{r['GBps']:.2f} | {r['copy_GBps']:.2f} | {r['ratio_to_copy']:.2f} |")
    lines += ["", "## Router ops", "",
              "`topk_unfused` is TopKRouter's default path (softmax, top-k of the scores, gather, softmax over k); "
              "`topk_softmax` the fused op's torch backend (torch.topk, rows with ties redone by a stable sort so the "
              "lowest id wins).", "",
              "| T | E | K | topk_unfused ms | topk_softmax ms | sort_by_expert ms |",
              "|---:|---:|---:|---:|---:|---:|"]
    for r in payload["router"]:
        lines.append(f"| {r['T']} | {r['E']} | {r['K']} | {r['topk_unfused_s'] * 1e3:.3f} | "
                     f"{r['topk_softmax_s'] * 1e3:.3f} | {r['sort_by_expert_s'] * 1e3:.3f} |")
    path.write_text("\n".join(lines) + "\n")


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds per shape (median reported)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--name", default="kernels_cpu", help="results file stem")
    p.add_argument("--threads", type=int, help="torch intra-op threads (1 avoids OpenMP stalls on a busy machine)")
    args = p.parse_args(argv)
    if args.rounds < 1:
        raise SystemExit("--rounds must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    backend = BACKENDS[-1]
    started, load_before = time.time(), os.getloadavg()
    dispatch, router = [], []
    for T, D, E, K in SHAPES:
        fns = _dispatch_fns(T, D, E, K, backend)
        biggest = max(n for _, n in fns.values())
        src = torch.empty(biggest // 2, dtype=torch.uint8, device=DEVICE)
        dst = torch.empty_like(src)
        timed = _interleaved({**{k: f for k, (f, _) in fns.items()}, "copy": lambda: dst.copy_(src)}, args.rounds)
        copy_bw = biggest / timed["copy"]  # bytes read + written per second
        for name, (_, nbytes) in fns.items():
            sec = timed[name]
            dispatch.append({"op": name, "T": T, "D": D, "E": E, "K": K, "s": sec, "GBps": nbytes / sec / 1e9,
                             "copy_GBps": copy_bw / 1e9, "ratio_to_copy": sec / (nbytes / copy_bw)})
        print(f"T={T} D={D} E={E} K={K}: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in timed.items()), flush=True)
        del fns, src, dst
    for T, E, K in ROUTER_SHAPES:
        timed = _interleaved(_router_fns(T, E, K, backend), args.rounds)
        router.append({"T": T, "E": E, "K": K, **{f"{k}_s": v for k, v in timed.items()}})
        print(f"router T={T} E={E} K={K}: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in timed.items()),
              flush=True)
    payload = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": _machine(),
               "backend": backend, "rounds": args.rounds, "wall_s": round(time.time() - started, 1),
               "load_before": list(load_before), "load_after": list(os.getloadavg()),
               "dispatch": dispatch, "router": router}
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = args.out / f"{args.name}.json.tmp"
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(args.out / f"{args.name}.json")
    _write_md(payload, args.out / f"{args.name}.md")
    print(f"wrote {args.out / (args.name + '.json')} and {args.out / (args.name + '.md')}")
    return payload


if __name__ == "__main__":
    main()
