"""Forward+backward speed of `MoELayer` against a dense FFN, Hugging Face's Qwen3-MoE block and the
balanced-expert floor, all measured in one run.

Variants (T tokens, D=512, F=1024, k=2, fp32):
  moe        MoELayer (router, aux loss, sort, permute, grouped experts, combine, stats)
  dense      one expert-sized SwiGLU FFN over T*k rows (same active FLOPs)
  floor      the same expert matmuls with exactly T*k/E rows per expert and no routing (bmm or _grouped_mm,
             whichever is faster): the honest floor for routing overhead
  hf_grouped Hugging Face `Qwen3MoeSparseMoeBlock`, `_experts_implementation="grouped_mm"` (if installed)
  hf_eager   the same block with its eager per-expert loop

Run the full measurement (interleaved, medians of repeats, writes benchmarks/results/layer_cpu.{json,md}):
    .venv/bin/python benchmarks/bench_layer.py [--quick] [--repeats 5]
or the pytest-benchmark view of the same variants:
    .venv/bin/python -m pytest benchmarks/bench_layer.py --benchmark-only   (MOE_BENCH_QUICK=1 for small sizes)

"saved MB" is the bytes autograd saves for backward (activations kept between forward and backward), counted
with saved-tensor hooks: a device-independent stand-in for peak training memory on CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import date
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import moe_routing as mr

D, FFN, K = 512, 1024, 2
RESULTS = Path(__file__).parent / "results"


def _swiglu(x, w_gate, w_up, w_down):
    return (F.silu(x @ w_gate) * (x @ w_up)) @ w_down


def make_variants(T: int, E: int, with_hf_eager: bool = True) -> dict[str, Callable[[], torch.Tensor]]:
    """Each variant is a closure running one forward+backward; inputs are created once."""
    torch.manual_seed(0)
    x = torch.randn(1, T, D, requires_grad=True)
    variants: dict[str, Callable[[], torch.Tensor]] = {}

    layer = mr.MoELayer(D, FFN, E, K)

    def moe():
        layer(x).sum().backward()
    variants["moe"] = moe

    dense_w = [torch.randn(D, FFN, requires_grad=True) * 0.02 for _ in range(2)] + \
        [torch.randn(FFN, D) * 0.02]
    dense_w = [w.detach().requires_grad_() for w in dense_w]
    xk = x.detach().reshape(T, D).repeat_interleave(K, 0).requires_grad_()

    def dense():
        _swiglu(xk, *dense_w).sum().backward()
    variants["dense"] = dense

    rows = T * K // E
    xe = x.detach().reshape(T, D).repeat_interleave(K, 0)[: rows * E].contiguous().requires_grad_()
    we = [(torch.randn(E, D, FFN) * 0.02).requires_grad_(), (torch.randn(E, D, FFN) * 0.02).requires_grad_(),
          (torch.randn(E, FFN, D) * 0.02).requires_grad_()]
    offs = (torch.arange(1, E + 1) * rows).to(torch.int32)

    def floor_bmm():
        xb = xe.view(E, rows, D)
        (torch.bmm(F.silu(torch.bmm(xb, we[0])) * torch.bmm(xb, we[1]), we[2])).sum().backward()

    def floor_grouped():
        g = lambda a, w: mr.ops.grouped_mm(a, w, None, offs, "grouped_mm")  # noqa: E731
        g(F.silu(g(xe, we[0])) * g(xe, we[1]), we[2]).sum().backward()
    variants["floor_bmm"] = floor_bmm
    variants["floor_grouped"] = floor_grouped

    try:
        from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
    except ImportError:
        return variants
    for impl in ("grouped_mm", "eager"):
        cfg = Qwen3MoeConfig(hidden_size=D, moe_intermediate_size=FFN, num_experts=E, num_experts_per_tok=K,
                             norm_topk_prob=True)
        cfg._experts_implementation = impl
        block = Qwen3MoeSparseMoeBlock(cfg)
        for p in block.parameters():
            torch.nn.init.normal_(p, std=0.02)

        def hf(block=block):
            block(x).sum().backward()
        variants[f"hf_{impl.replace('_mm', '')}"] = hf
    if not with_hf_eager:
        variants.pop("hf_eager")
    return variants


def saved_bytes(fn: Callable[[], None]) -> int:
    """Bytes of activations autograd saves for backward in one forward+backward (distinct storages; weights
    and inputs, i.e. leaves and views of leaves, are not counted)."""
    seen: dict[int, int] = {}

    def pack(t):
        base = t._base if t._base is not None else t
        if not (base.is_leaf and base.requires_grad):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def measure(T: int, E: int, repeats: int, with_hf_eager: bool) -> dict[str, dict[str, float]]:
    variants = make_variants(T, E, with_hf_eager)
    for fn in variants.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):  # interleaved: machines drift, so every variant sees the same drift
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    out = {name: {"median_s": statistics.median(ts), "saved_mb": saved_bytes(variants[name]) / 2**20}
           for name, ts in times.items()}
    best_floor = min(("floor_bmm", "floor_grouped"), key=lambda n: out[n]["median_s"])
    out["floor"] = dict(out[best_floor], impl=best_floor)
    return out


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return f"{os.cpu_count()} cores, {cpu}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def table(results: dict, T: int) -> str:
    lines = [f"T={T}, D={D}, F={FFN}, k={K}, fp32, fwd+bwd, median of repeats ({date.today()}, {machine()})", "",
             "| E | variant | median s | saved MB | MoE / variant |", "|---|---|---|---|---|"]
    for E, res in results.items():
        moe = res["moe"]["median_s"]
        for name in ("moe", "floor", "dense", "hf_grouped", "hf_eager"):
            if name in res:
                r = res[name]
                label = f"floor ({r['impl']})" if name == "floor" else name
                lines.append(f"| {E} | {label} | {r['median_s']:.3f} | {r['saved_mb']:.0f} | "
                             f"{moe / r['median_s']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="T=1024, 2 repeats (checks the script runs)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--hf-eager", action="store_true", help="also time HF's eager expert loop (slow)")
    args = parser.parse_args()
    T, repeats = (1024, 2) if args.quick else (8192, args.repeats)
    results = {E: measure(T, E, repeats, args.hf_eager) for E in (8, 64)}
    text = table(results, T)
    print(text)
    if not args.quick:
        args.out.mkdir(parents=True, exist_ok=True)
        payload = {"date": str(date.today()), "machine": machine(), "T": T, "D": D, "F": FFN, "k": K,
                   "repeats": repeats, "results": {str(E): r for E, r in results.items()}}
        tmp = args.out / "layer_cpu.json.tmp"
        tmp.write_text(json.dumps(payload, indent=2))
        tmp.replace(args.out / "layer_cpu.json")
        (args.out / "layer_cpu.md").write_text(text + "\n")


# pytest-benchmark view: one benchmark per (E, variant)
try:
    import pytest

    _T = 1024 if os.environ.get("MOE_BENCH_QUICK") else 8192

    @pytest.mark.parametrize("E", [8, 64])
    @pytest.mark.parametrize("variant", ["moe", "dense", "floor_bmm", "floor_grouped", "hf_grouped", "hf_eager"])
    def test_layer_fwd_bwd(benchmark, E, variant):
        variants = make_variants(_T, E)
        if variant not in variants:
            pytest.skip("transformers is not installed")
        benchmark.pedantic(variants[variant], rounds=5, warmup_rounds=1)
except ImportError:  # running as a script without pytest
    pass


if __name__ == "__main__":
    main()
