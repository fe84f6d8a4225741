"""Hugging Face experts implementations side by side: ours ("moe_routing") vs HF's "grouped_mm" and "eager".

One HF experts module (transformers' ``Qwen3MoeExperts``: packed ``gate_up_proj`` [E, 2I, H], ``down_proj``
[E, H, I]) with fixed random top-k routing; each variant runs the same call, forward only and forward + backward,
in interleaved rounds (median reported), after a check that all variants agree with eager. CPU: float32 and the
torch backend; on CUDA: bfloat16, our "auto" backend (Triton).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_hf_experts.py [--rounds 5] [--threads 1] [--quick]
        -> results/hf_experts_cpu.{json,md} (or hf_experts_cuda.* on a GPU)

Real numbers need a quiet machine: the file records the load average before and after the run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import moe_routing.integrations.hf  # noqa: E402,F401  (registers "moe_routing")
from _machine import cpu_count, cpu_model  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
IMPLS = ("moe_routing", "grouped_mm", "eager")
# (T, H, I, E, K): a Mixtral-like coarse shape, Qwen3-MoE-like and DeepSeek-like fine-grained ones (scaled down)
SHAPES = [(4096, 1024, 1024, 8, 2), (4096, 1024, 256, 64, 8), (4096, 1024, 128, 128, 8)]
QUICK_SHAPES = [(256, 64, 32, 8, 2)]


def _experts(T: int, H: int, I: int, E: int, K: int):
    """(experts module, hidden [T, H], top_k_index [T, K], top_k_weights [T, K]) with random softmax routing."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    cfg = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=K)
    experts = Qwen3MoeExperts(cfg).to(device=DEVICE, dtype=DTYPE)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    with torch.no_grad():
        experts.gate_up_proj.normal_(std=H ** -0.5, generator=gen)
        experts.down_proj.normal_(std=I ** -0.5, generator=gen)
    x = torch.randn(T, H, device=DEVICE, dtype=DTYPE, generator=gen)
    probs = torch.randn(T, E, device=DEVICE, generator=gen).softmax(-1)
    weights, index = probs.topk(K, dim=-1)
    return experts, x, index, (weights / weights.sum(-1, keepdim=True)).to(DTYPE)


def _call(experts, impl: str, x, index, weights, backward: bool):
    experts.config._experts_implementation = impl
    if not backward:
        with torch.no_grad():
            return experts(x, index, weights)
    xg, wg = x.detach().requires_grad_(), weights.detach().requires_grad_()
    y = experts(xg, index, wg)
    y.backward(torch.ones_like(y))
    experts.zero_grad(set_to_none=True)
    return y


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
    import transformers

    gpu = torch.cuda.get_device_name() if CUDA else None
    return {"cpu": cpu_model(), "cpus": cpu_count(), "gpu": gpu, "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "device": str(DEVICE), "dtype": str(DTYPE).split(".")[-1]}


def _write_md(payload: dict, path: Path) -> None:
    m = payload["machine"]
    busy = max(payload["load_before"][0], payload["load_after"][0]) > 0.5 * m["cpus"]
    where = m["gpu"] or f"{m['cpus']} CPUs ({m['cpu']}), {m['torch_threads']} threads"
    lines = [f"# Hugging Face experts implementations ({payload['date']})", "",
             f"{where}, torch {m['torch']}, transformers {m['transformers']}, {m['dtype']}, median of "
             f"{payload['rounds']} interleaved rounds, {payload['wall_s']} s wall"
             f"{' (quick sizes: a smoke run, not a measurement)' if payload['quick'] else ''}.", "",
             f"Machine load average {payload['load_before'][0]:.1f} before, {payload['load_after'][0]:.1f} after"
             f"{' (busy: numbers are noisy, compare rows within this file only)' if busy else ''}.", "",
             "`x eager` = eager time / this time (higher is faster). `max diff` = largest |output - eager output|.", "",
             "| T | H | I | E | K | pass | impl | ms | x eager | max diff |",
             "|---:|---:|---:|---:|---:|---|---|---:|---:|---:|"]
    for r in payload["rows"]:
        lines.append(f"| {r['T']} | {r['H']} | {r['I']} | {r['E']} | {r['K']} | {r['pass']} | {r['impl']} | "
                     f"{r['s'] * 1e3:.2f} | {r['speedup_vs_eager']:.2f} | {r['max_diff_vs_eager']:.1e} |")
    path.write_text("\n".join(lines) + "\n")


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds per shape (median reported)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--name", default=f"hf_experts_{DEVICE.type}", help="results file stem")
    p.add_argument("--threads", type=int, help="torch intra-op threads")
    p.add_argument("--quick", action="store_true", help="one tiny shape (checks the script runs)")
    args = p.parse_args(argv)
    if args.rounds < 1:
        raise SystemExit("--rounds must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    started, load_before = time.time(), os.getloadavg()
    rows = []
    for T, H, I, E, K in QUICK_SHAPES if args.quick else SHAPES:
        experts, x, index, weights = _experts(T, H, I, E, K)
        outs = {impl: _call(experts, impl, x, index, weights, False).float() for impl in IMPLS}
        for backward in (False, True):
            fns = {impl: (lambda impl=impl: _call(experts, impl, x, index, weights, backward)) for impl in IMPLS}
            timed = _interleaved(fns, args.rounds)
            for impl in IMPLS:
                rows.append({"T": T, "H": H, "I": I, "E": E, "K": K, "pass": "fwd+bwd" if backward else "fwd",
                             "impl": impl, "s": timed[impl], "speedup_vs_eager": timed["eager"] / timed[impl],
                             "max_diff_vs_eager": (outs[impl] - outs["eager"]).abs().max().item()})
            print(f"T={T} H={H} I={I} E={E} K={K} {'fwd+bwd' if backward else 'fwd'}: "
                  + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in timed.items()), flush=True)
        del experts, x
    payload = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": _machine(),
               "rounds": args.rounds, "quick": args.quick, "wall_s": round(time.time() - started, 1),
               "load_before": list(load_before), "load_after": list(os.getloadavg()), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = args.out / f"{args.name}.json.tmp"
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(args.out / f"{args.name}.json")
    _write_md(payload, args.out / f"{args.name}.md")
    print(f"wrote {args.out / (args.name + '.json')} and {args.out / (args.name + '.md')}")
    return payload


if __name__ == "__main__":
    main()
