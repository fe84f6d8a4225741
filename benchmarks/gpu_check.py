"""One script for a GPU machine: check every dispatch backend against torch, then time it.

    PYTHONPATH=. python benchmarks/gpu_check.py [--out DIR] [--build]   # on a CUDA machine, <= 4 minutes
    TRITON_INTERPRET=1 python benchmarks/gpu_check.py --smoke            # same code paths, tiny sizes, on CPU

Order: copy-bandwidth ceiling and `torch._grouped_mm` rate first, then per shape: correctness of the Triton
permute / combine / combine-backward against the torch backend on fresh random inputs (raises on mismatch),
then median timings (`triton.testing.do_bench` on GPU), GB/s, % of copy bandwidth and ratio vs torch; then the
router ops (expert sort/counts and the fused top-k + softmax) per (T, E, K); last the full MoE layer fwd+bwd
(E=64, k=8, d=4096, ffn=1024) with backend="triton" vs "torch". The CUDA extension's kernels (csrc/, the
extension moe_routing._C) are checked and timed in the same rows when `cuda_ext.is_available()`; ``--build``
first builds the extension when it is missing (``MOE_ROUTING_BUILD_CUDA=1 pip install -e . --no-build-isolation
--no-deps`` for the GPU's arch; needs nvcc). Otherwise the JSON says why not (``cuda.reason``) and the run goes
on. JSON is rewritten after every step, so a run cut short still leaves its results. Needs torch + triton.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import moe_routing as mr  # noqa: E402
from moe_routing.ops import combine, invert_permutation, permute, sort_by_expert  # noqa: E402
from moe_routing.ops import cuda_ext, grouped_mm_available  # noqa: E402
from moe_routing.ops.combine import _combine_backward  # noqa: E402
from moe_routing.ops.topk_softmax import topk_softmax  # noqa: E402


def bench(fn, device: torch.device, reps: int) -> float:
    """Median seconds of ``fn``."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, return_mode="median") / 1e3
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def routed_pairs(T: int, E: int, K: int, device):
    experts_TK = torch.rand(T, E, device=device).topk(K, dim=-1).indices
    token_N = torch.arange(T, device=device).repeat_interleave(K)
    pair_of_row_N, _, _ = sort_by_expert(experts_TK.reshape(-1), E)
    return token_N, pair_of_row_N, invert_permutation(pair_of_row_N)


def check_close(name: str, got: torch.Tensor, ref: torch.Tensor, rtol: float, atol: float) -> None:
    try:
        torch.testing.assert_close(got, ref, rtol=rtol, atol=atol)
    except AssertionError as err:
        raise SystemExit(f"MISMATCH in {name}: {err}")


def check_topk(name: str, logits: torch.Tensor, got, ref) -> None:
    """Same weights; same ids except where the logits tie exactly (then the values must match)."""
    (gw, gi), (rw, ri) = got, ref
    if not torch.equal(gi, ri):
        differ = gi != ri
        if not torch.equal(logits.gather(1, gi)[differ], logits.gather(1, ri)[differ]):
            raise SystemExit(f"MISMATCH in {name}: different experts for non-tied logits")
    check_close(name, gw, rw, rtol=2e-6, atol=1e-6)


def router_rows(T: int, E: int, K: int, device, reps: int, cuda_ok: bool) -> list[dict]:
    """Expert sort/counts and the fused top-k + softmax: each backend checked against torch, then timed."""
    logits = torch.randn(T, E, device=device)
    expert_N = logits.topk(K, dim=-1).indices.reshape(-1)
    ops = {
        "sort_by_expert": {"torch": lambda: sort_by_expert(expert_N, E, "torch"),
                           "triton": lambda: sort_by_expert(expert_N, E, "triton"),
                           "cuda": lambda: sort_by_expert(expert_N, E, "cuda")},
        "topk_softmax": {b: (lambda b=b: topk_softmax(logits, K, b)) for b in ("torch", "triton", "cuda")},
    }
    rows = []
    for name, fns in ops.items():
        backends = ["torch", "triton"] + (["cuda"] if cuda_ok else [])
        ref = fns["torch"]()
        for b in backends[1:]:
            got = fns[b]()
            tag = f"{name} ({b}) T={T} E={E} K={K}"
            if name == "topk_softmax":
                check_topk(tag, logits, got, ref)
            elif not all(torch.equal(g, r) for g, r in zip(got, ref)):
                raise SystemExit(f"MISMATCH in {tag}: order/counts/offsets differ")
        row = {"op": name, "T": T, "D": 0, "E": E, "K": K, "dtype": "float32"}
        for b in backends:
            row[f"{b}_s"] = bench(fns[b], device, reps)
        row["speedup_vs_torch"] = row["torch_s"] / row["triton_s"]
        rows.append(row)
    return rows


def op_rows(T: int, D: int, E: int, K: int, dtype, device, reps: int, cuda_ok: bool = False) -> list[dict]:
    token_N, pair_of_row_N, row_of_pair_N = routed_pairs(T, E, K, device)
    x = torch.randn(T, D, dtype=dtype, device=device)
    h = torch.randn(T * K, D, dtype=dtype, device=device)
    w = torch.rand(T * K, dtype=torch.float32, device=device)
    dy = torch.randn(T, D, dtype=dtype, device=device)
    src_token_N = token_N[pair_of_row_N]
    tol = dict(rtol=1e-6, atol=1e-5 * K) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=2e-2 * K)
    ops = {
        "permute": (lambda b: permute(x, src_token_N, b), 2 * T * K * D),
        "combine": (lambda b: combine(h, w, row_of_pair_N, token_N, T, K, b), (T * K + T) * D),
        "combine_bwd": (lambda b: _combine_backward(dy, h, w, row_of_pair_N, token_N, b), (T * K * 3) * D),
    }
    rows = []
    backends = ["triton"] + (["cuda"] if cuda_ok else [])
    for name, (fn, elems) in ops.items():
        ref = fn("torch")
        for b in backends:
            got = fn(b)
            for i, (g, r) in enumerate(zip(got if isinstance(got, tuple) else (got,),
                                           ref if isinstance(ref, tuple) else (ref,))):
                if name == "permute":
                    if not torch.equal(g, r):
                        raise SystemExit(f"MISMATCH in permute ({b}) T={T} D={D} E={E} K={K}")
                else:
                    check_close(f"{name}[{i}] ({b}) T={T} D={D} E={E} K={K} {dtype}", g.float(), r.float(), **tol)
        nbytes = elems * x.element_size()
        t_torch, t_triton = bench(lambda: fn("torch"), device, reps), bench(lambda: fn("triton"), device, reps)
        row = {"op": name, "T": T, "D": D, "E": E, "K": K, "dtype": str(dtype).split(".")[-1],
               "torch_s": t_torch, "triton_s": t_triton, "triton_GBps": nbytes / t_triton / 1e9,
               "speedup_vs_torch": t_torch / t_triton}
        if cuda_ok:
            row["cuda_s"] = bench(lambda: fn("cuda"), device, reps)
            row["cuda_GBps"] = nbytes / row["cuda_s"] / 1e9
        rows.append(row)
    return rows


def build_extension(device: torch.device) -> str:
    """Build the CUDA extension for this GPU's arch in place (editable install); returns the build's last lines."""
    major, minor = torch.cuda.get_device_capability(device)
    env = {**os.environ, "MOE_ROUTING_BUILD_CUDA": "1", "TORCH_CUDA_ARCH_LIST": f"{major}.{minor}"}
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", str(root)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    importlib.invalidate_caches()  # the new moe_routing/_C*.so must be found by this process
    return f"pip exit {proc.returncode}: " + (proc.stdout + proc.stderr).strip()[-1500:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; runs on CPU under TRITON_INTERPRET=1")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/results")))
    parser.add_argument("--build", action="store_true", help="build the CUDA extension first if it is missing")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("no CUDA device: run with --smoke and TRITON_INTERPRET=1")
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / ("gpu_check_smoke.json" if args.smoke else "gpu_check.json")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (interpreter)"
    report: dict = {"device": name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "ops": []}

    def save():
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=2))
        tmp.replace(path)

    reps = 3 if args.smoke else 20
    n = (1 << 16) if args.smoke else (1 << 28)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    report["copy_GBps"] = 2 * n / bench(lambda: dst.copy_(src), device, reps) / 1e9
    gdt = torch.bfloat16 if device.type == "cuda" else torch.float32
    Eg, rows_g, Dg, Fg = (4, 16, 32, 32) if args.smoke else (64, 2048, 4096, 1024)
    xg = torch.randn(Eg * rows_g, Dg, dtype=gdt, device=device)
    wg = torch.randn(Eg, Dg, Fg, dtype=gdt, device=device)
    offs = (torch.arange(1, Eg + 1, device=device) * rows_g).to(torch.int32)
    if grouped_mm_available(device):
        t = bench(lambda: torch._grouped_mm(xg, wg, offs=offs), device, reps)
        report["grouped_mm_TFLOPs"] = 2 * Eg * rows_g * Dg * Fg / t / 1e12
    else:
        report["grouped_mm_TFLOPs"] = float("nan")  # this torch has no _grouped_mm for the device
    build_log = None
    if args.build and device.type == "cuda" and cuda_ext.extension_path() is None:
        build_log = build_extension(device)
        print(build_log)
    cuda_ok, why = cuda_ext.is_available() if device.type == "cuda" else (False, "no CUDA device (smoke run)")
    report["cuda"] = {"available": cuda_ok, "reason": why, "build": build_log}
    save()
    print(f"{name}: copy {report['copy_GBps']:.0f} GB/s, _grouped_mm {report['grouped_mm_TFLOPs']:.1f} TFLOP/s; "
          f"cuda extension: {'checked' if cuda_ok else 'skipped'} ({why})")

    shapes = [(64, 32, 8, 2), (33, 70, 256, 8)] if args.smoke else \
        [(T, D, E, K) for T in (4096, 16384, 65536) for D in (1024, 4096) for E, K in ((8, 2), (64, 8), (256, 8))]
    dtypes = [torch.float32] if args.smoke else [torch.bfloat16]
    print(f"{'op':12} {'T':>6} {'D':>5} {'E':>4} {'K':>2}  {'GB/s':>8} {'%copy':>6} {'vs torch':>8}")
    for T, D, E, K in shapes:
        for dtype in dtypes:
            for row in op_rows(T, D, E, K, dtype, device, reps, cuda_ok):
                report["ops"].append(row)
                pct = 100 * row["triton_GBps"] / report["copy_GBps"]
                print(f"{row['op']:12} {T:6d} {D:5d} {E:4d} {K:2d}  {row['triton_GBps']:8.1f} {pct:6.1f} "
                      f"{row['speedup_vs_torch']:8.2f}x")
            save()

    router_shapes = [(64, 8, 2), (33, 256, 8)] if args.smoke else \
        [(T, E, K) for T in (4096, 16384, 65536) for E, K in ((8, 2), (64, 8), (256, 8))]
    print(f"{'op':15} {'T':>6} {'E':>4} {'K':>2}  {'torch us':>9} {'triton us':>9} {'cuda us':>9}")
    for T, E, K in router_shapes:
        for row in router_rows(T, E, K, device, reps, cuda_ok):
            report["ops"].append(row)
            cu = f"{row['cuda_s'] * 1e6:9.1f}" if "cuda_s" in row else f"{'-':>9}"
            print(f"{row['op']:15} {T:6d} {E:4d} {K:2d}  {row['torch_s'] * 1e6:9.1f} {row['triton_s'] * 1e6:9.1f} {cu}")
        save()

    E, K, D, Fh, T = (8, 2, 32, 16, 48) if args.smoke else (64, 8, 4096, 1024, 16384)
    layer = mr.MoELayer(D, Fh, E, K, device=device, dtype=gdt)
    x = torch.randn(T, D, device=device, dtype=gdt, requires_grad=True)
    outs, times = {}, {}
    for backend in ("torch", "triton"):
        layer.backend = backend
        y = layer(x)
        outs[backend] = (y, *torch.autograd.grad(y.float().square().sum(), (x, layer.experts.w_up)))
        times[backend] = bench(lambda: layer(x).float().sum().backward(), device, reps)
    for i, (g, r) in enumerate(zip(outs["triton"], outs["torch"])):
        check_close(f"layer[{i}]", g.float(), r.float(), rtol=2e-2, atol=2e-2 * max(1.0, r.float().abs().max().item()))
    report["layer"] = {"E": E, "K": K, "D": D, "F": Fh, "T": T, "torch_s": times["torch"],
                       "triton_s": times["triton"], "speedup": times["torch"] / times["triton"]}
    save()
    print(f"MoE layer fwd+bwd E={E} k={K} d={D} ffn={Fh} T={T}: torch {times['torch'] * 1e3:.1f} ms, "
          f"triton {times['triton'] * 1e3:.1f} ms ({report['layer']['speedup']:.2f}x); wrote {path}")


if __name__ == "__main__":
    main()
