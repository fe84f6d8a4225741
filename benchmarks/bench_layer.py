"""Forward+backward speed and memory of `moe_routing.MoELayer` against three references, all in one run.

Shapes: T tokens (8192; 1024 with --quick), D=512, F=1024 (each expert's SwiGLU hidden size), k=2, fp32,
E in {8, 64}. With --fine, the fine-grained-expert sweep: D=256, F=512, E in {8, 128, 256, 512} (same T and k, so
the same active compute at every E, down to 32 rows per expert), the layer against the floors only; it reports
moe / floor per E, which should not grow with E (routing work that scales with T*E is the suspect).
Every variant runs one forward and one backward from a fixed random output gradient; weight gradients are reset
to None before each call (as ``optimizer.zero_grad()`` does), so each call allocates them.

Variants
  moe            MoELayer(D, F, E, k), default losses and stats: router, aux loss, sort, permute, grouped
                 experts, combine, routing stats
  moe_loop       the same layer with ``expert_impl="loop"`` (only with --variants / --with-loop)
  floor_bmm      balanced-expert floor: the same SwiGLU expert matmuls on stacked [E,D,F]/[E,F,D] weights with
                 exactly T*k/E rows per expert and no routing, as torch.bmm on [E, T*k/E, D]
  floor_grouped  the same floor as one torch._grouped_mm per projection (its built-in autograd)
  floor          whichever of the two floors has the lower median (the honest floor for routing overhead)
  floor_same_loads  the layer's own expert module on the router's per-expert row counts instead of T*k/E each:
                 what the layer's expert matmuls cost with the router's actual (uneven) split
  moe_balanced   the same layer replaying a routing that gives every expert exactly T*k/E tokens: the routing work
                 with an even split (replay reads the ids instead of running top-k: at E=256 that saves ~7 ms)
  dense          one expert-sized SwiGLU FFN over T*k rows (x repeated k times): the same active FLOPs
  router_gemm    the router's logits GEMM x @ W^T alone, forward and its two backward GEMMs (dense [T, E]
                 gradient, as the softmax aux loss gives): T*E*D work any dense router does, which the floor lacks
  hf_grouped     Hugging Face `Qwen3MoeSparseMoeBlock` with ``config._experts_implementation = "grouped_mm"``
  hf_eager       the same block with its eager per-expert loop
The MoE layer, both floors and both HF variants share the same weights (the HF block gets a copy of the layer's
router and expert weights in its own layout), so MoE and HF route every token identically; the HF block computes
no aux loss and no stats (its model does that outside the block).

Timing: variants run round-robin (each round runs every variant once, the starting variant rotates between
rounds) after one warm-up call each; we report the median over rounds, the ratio of medians ("MoE / variant")
and the median of per-round ratios ("paired"), which cancels drift that hits a whole round. Process CPU time is
recorded next to wall time: with --threads 1 it is the call's own work, much less disturbed by other jobs.

Memory (measured after timing, one extra call per variant):
  peak MB   peak of bytes held by tensors allocated during one forward+backward (PyTorch's CPU allocator as seen
            by torch.profiler(profile_memory=True): running sum of allocations and frees, maximum taken). It
            counts activations, workspaces allocated through PyTorch and the new weight/input gradients; it
            does not count the pre-existing weights and inputs, nor scratch that oneDNN/BLAS allocate on
            their own. Not process RSS (glibc keeps freed memory around, so RSS deltas are unreliable).
            "grads MB" says how much of it is the gradients the call leaves (at E=64 the expert weight
            gradients alone are 3*64*512*1024*4 B = 384 MB).
  saved MB  bytes of distinct storages autograd saves for backward (saved-tensor hooks), weights and inputs
            excluded: the activation memory a layer holds from its forward until its backward.

Commands
  .venv/bin/python benchmarks/bench_layer.py                # full: T=8192, 7 rounds, writes results/layer_cpu.*
  .venv/bin/python benchmarks/bench_layer.py --quick        # T=1024, 2 rounds, writes to /tmp (smoke check)
  .venv/bin/python benchmarks/bench_layer.py --fine --threads 1 --no-memory   # writes results/layer_fine_cpu.*
  # the same with glibc keeping freed memory (else every 134 MB weight gradient at E=256 page-faults in, each call):
  MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 MALLOC_TOP_PAD_=1000000000 .venv/bin/python
      benchmarks/bench_layer.py --fine --threads 1 --no-memory --name layer_fine_cpu_cached_malloc
  # expert matmuls negligible (F=4): the layer's own per-E cost in ms
  ... --fine --ffn 4 --variants moe,moe_balanced,floor_bmm,floor_same_loads,router_gemm --name
      layer_fine_cpu_routing_only
  .venv/bin/python -m pytest benchmarks/bench_layer.py --benchmark-only -q      # pytest-benchmark view
  MOE_BENCH_QUICK=1 .venv/bin/python -m pytest benchmarks/bench_layer.py --benchmark-only -q   # at T=1024
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import functools
import gc
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

import moe_routing as mr
from _layer_memory import peak_alloc_bytes, saved_bytes
from _layer_report import fine_markdown, markdown
from _machine import allocator_env, cpu_count, cpu_model, library_commit

D, FFN, K = 512, 1024, 2
EXPERTS = (8, 64)
T_FULL, T_QUICK = 8192, 1024
RESULTS = Path(__file__).resolve().parent / "results"
ALL_VARIANTS = ("moe", "moe_loop", "moe_balanced", "floor_bmm", "floor_grouped", "floor_same_loads", "dense",
                "router_gemm", "hf_grouped", "hf_eager")
DEFAULT_VARIANTS = ("moe", "floor_bmm", "floor_grouped", "dense", "hf_grouped", "hf_eager")
FLOORS = ("floor_bmm", "floor_grouped")  # balanced floors; floor_same_loads is reported beside them
# --fine: fine-grained experts (E up to 512 at fixed active compute), the layer against the floor only
FINE_D, FINE_FFN, FINE_EXPERTS = 256, 512, (8, 128, 256, 512)
FINE_VARIANTS = ("moe", "moe_balanced", "floor_bmm", "floor_grouped", "floor_same_loads", "router_gemm",
                 "hf_grouped")


@dataclass
class Variant:
    name: str
    run: Callable[[], None]                      # one forward + backward
    grads: list[Tensor] = field(default_factory=list)  # tensors whose .grad is reset around each call

    def reset(self) -> None:
        for t in self.grads:
            t.grad = None

    def __call__(self) -> None:
        self.reset()
        self.run()


@dataclass
class Case:
    """The variants at one (T, E), plus what the output check and the load statistics need."""
    variants: dict[str, Variant]
    layer: "mr.MoELayer"
    x: Tensor
    hf_block: Optional[torch.nn.Module] = None
    hf_config: object = None


def hf_block_class():
    """(Qwen3MoeConfig, Qwen3MoeSparseMoeBlock) from transformers, or None when it is not installed."""
    try:
        from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
    except ImportError:
        return None
    return Qwen3MoeConfig, Qwen3MoeSparseMoeBlock


def _swiglu(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor) -> Tensor:
    return (F.silu(x @ w_gate) * (x @ w_up)) @ w_down


def build_case(T: int, E: int, names: Sequence[str] = DEFAULT_VARIANTS, seed: int = 0, D: int = D,
               FFN: int = FFN) -> Case:
    """The requested variants at (T, E) and hidden sizes (D, FFN); HF variants are left out when transformers
    is missing."""
    unknown = set(names) - set(ALL_VARIANTS)
    if unknown:
        raise ValueError(f"unknown variants {sorted(unknown)}; choose from {ALL_VARIANTS}")
    if (T * K) % E:
        raise ValueError(f"the balanced floor needs T*k divisible by E, got T={T}, k={K}, E={E}")
    torch.manual_seed(seed)
    layer = mr.MoELayer(D, FFN, E, K)
    x = torch.randn(1, T, D, requires_grad=True)
    dy = torch.randn(1, T, D)
    x_rows = x.detach().reshape(T, D).repeat_interleave(K, 0).requires_grad_()  # [T*k, D], token t -> rows 2t, 2t+1
    dy_rows = torch.randn(T * K, D)
    out: dict[str, Variant] = {}

    def moe_variant(lyr):
        def run():
            lyr(x).backward(dy)
        return Variant("", run, [x, *lyr.parameters()])

    if "moe" in names:
        out["moe"] = moe_variant(layer)
    if "moe_loop" in names:
        loop = mr.MoELayer(D, FFN, E, K, expert_impl="loop")
        loop.load_state_dict(layer.state_dict())
        out["moe_loop"] = moe_variant(loop)

    ex = layer.experts
    wg, wu, wd = (w.detach().clone().requires_grad_() for w in (ex.w_gate, ex.w_up, ex.w_down))
    rows = T * K // E
    if "floor_bmm" in names:
        def floor_bmm():
            xb = x_rows.view(E, rows, D)
            y = torch.bmm(F.silu(torch.bmm(xb, wg)) * torch.bmm(xb, wu), wd)
            y.backward(dy_rows.view(E, rows, D))
        out["floor_bmm"] = Variant("", floor_bmm, [x_rows, wg, wu, wd])
    if "floor_grouped" in names:
        offs = torch.arange(1, E + 1, dtype=torch.int32) * rows

        def floor_grouped():
            h = F.silu(torch._grouped_mm(x_rows, wg, offs=offs)) * torch._grouped_mm(x_rows, wu, offs=offs)
            torch._grouped_mm(h, wd, offs=offs).backward(dy_rows)
        out["floor_grouped"] = Variant("", floor_grouped, [x_rows, wg, wu, wd])
    if "floor_same_loads" in names:
        # the layer's own expert module (a copy) on the router's per-expert row counts (a random router at E=256
        # gives some experts 2x the mean): what the layer's expert matmuls cost with its actual, uneven split
        with torch.no_grad():
            layer(x)
        counts = layer.last_stats["tokens_per_expert"].long()
        if int(counts.sum()) != T * K:
            raise AssertionError(f"the layer routed {int(counts.sum())} pairs, expected T*k={T * K} (dropless)")
        same = copy.deepcopy(layer.experts)
        offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])

        def floor_same_loads():
            same(x_rows, counts, offsets).backward(dy_rows)
        out["floor_same_loads"] = Variant("", floor_same_loads, [x_rows, *same.parameters()])
    if "moe_balanced" in names:
        # the same layer with every expert routed exactly T*k/E tokens (token t replays experts (t*k + j) mod E):
        # the routing work is there (logits, gates from the scores, aux loss, stats, sort, permute, combine) with
        # an even split; replay reads the ids instead of running top-k over [T, E]
        balanced_T1K = ((torch.arange(T)[:, None] * K + torch.arange(K)) % E)[:, None, :]
        with torch.no_grad(), mr.replay_routing(layer, balanced_T1K):
            layer(x)
        if not bool((layer.last_stats["tokens_per_expert"] == T * K // E).all()):
            raise AssertionError("the balanced replay did not give every expert T*k/E tokens")

        def moe_balanced():
            with mr.replay_routing(layer, balanced_T1K):
                y = layer(x)
            y.backward(dy)
        out["moe_balanced"] = Variant("", moe_balanced, [x, *layer.parameters()])
    if "dense" in names:
        dg, du, dd = (w[0].detach().clone().requires_grad_() for w in (ex.w_gate, ex.w_up, ex.w_down))

        def dense():
            _swiglu(x_rows, dg, du, dd).backward(dy_rows)
        out["dense"] = Variant("", dense, [x_rows, dg, du, dd])

    if "router_gemm" in names:
        x_TD, w_ED = x.detach().reshape(T, D).requires_grad_(), layer.router.weight.detach().clone().requires_grad_()
        d_logits = torch.randn(T, E)

        def router_gemm():
            (x_TD @ w_ED.t()).backward(d_logits)
        out["router_gemm"] = Variant("", router_gemm, [x_TD, w_ED])

    hf_names = [n for n in ("hf_grouped", "hf_eager") if n in names]
    hf = hf_block_class() if hf_names else None
    if hf is not None:
        Qwen3MoeConfig, Qwen3MoeSparseMoeBlock = hf
        cfg = Qwen3MoeConfig(hidden_size=D, moe_intermediate_size=FFN, num_experts=E, num_experts_per_tok=K,
                             norm_topk_prob=True, hidden_act="silu")
        cfg._experts_implementation = "grouped_mm"
        block = Qwen3MoeSparseMoeBlock(cfg)
        with torch.no_grad():  # same weights as the layer, in HF's layout: gate_up [E, 2F, D], down [E, D, F]
            block.gate.weight.copy_(layer.router.weight)
            block.experts.gate_up_proj.copy_(torch.cat([ex.w_gate, ex.w_up], dim=2).transpose(1, 2))
            block.experts.down_proj.copy_(ex.w_down.transpose(1, 2))
        for name in hf_names:
            impl = {"hf_grouped": "grouped_mm", "hf_eager": "eager"}[name]

            def hf_run(impl=impl):
                cfg._experts_implementation = impl  # read by the experts module at each forward
                block(x).backward(dy)
            out[name] = Variant("", hf_run, [x, *block.parameters()])
    for name, v in out.items():
        v.name = name
    return Case(out, layer, x, block if hf is not None else None, cfg if hf is not None else None)


@torch.no_grad()
def check_outputs(case: Case) -> Optional[float]:
    """Max |y_moe - y_hf| of one forward (same weights, same routing): guards against comparing unlike layers."""
    if case.hf_block is None:
        return None
    case.hf_config._experts_implementation = "grouped_mm"
    diff = (case.layer(case.x) - case.hf_block(case.x)).abs().max().item()
    if diff > 1e-3:
        raise AssertionError(f"MoELayer and the HF block disagree (max abs diff {diff:.3g}); not comparable")
    return diff


def measure(T: int, E: int, rounds: int, names: Sequence[str], memory: bool = True, log=print,
            D: int = D, FFN: int = FFN) -> dict:
    case = build_case(T, E, names, D=D, FFN=FFN)
    diff = check_outputs(case)
    with torch.no_grad():
        case.layer(case.x)
    load = case.layer.last_stats["tokens_per_expert"].double()
    runs = case.variants
    order = list(runs)
    for v in runs.values():  # warm-up: first-call allocations, oneDNN primitive creation
        v()
        v.reset()
    times: dict[str, list[float]] = {n: [] for n in order}
    cpu: dict[str, list[float]] = {n: [] for n in order}  # process CPU time: less hit by other jobs
    for r in range(rounds):
        rot = order[r % len(order):] + order[:r % len(order)]
        for name in rot:
            v = runs[name]
            v.reset()
            gc.collect()
            t0, c0 = time.perf_counter(), time.process_time()
            v.run()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            v.reset()
        log(f"  E={E} round {r + 1}/{rounds}: " + ", ".join(f"{n} {times[n][-1]:.3f}s" for n in order))
    res: dict = {"variants": {}, "moe_hf_max_abs_diff": diff,
                 "load_max_over_mean": (load.max() / load.mean()).item(), "load_min": int(load.min())}
    for n in order:
        entry = {"median_s": statistics.median(times[n]), "min_s": min(times[n]), "times_s": times[n],
                 "cpu_median_s": statistics.median(cpu[n]), "cpu_times_s": cpu[n]}
        if memory:
            peak, grads = peak_alloc_bytes(runs[n])
            entry["peak_mb"], entry["grads_mb"] = peak / 2**20, grads / 2**20
            entry["saved_mb"] = saved_bytes(runs[n]) / 2**20
        res["variants"][n] = entry
    floors = [f for f in FLOORS if f in res["variants"]]
    if floors:
        res["floor"] = min(floors, key=lambda f: res["variants"][f]["median_s"])
    if "moe" in times:
        ratios = {}
        for n in order:
            if n == "moe":
                continue
            ratios[n] = {"of_medians": res["variants"]["moe"]["median_s"] / res["variants"][n]["median_s"],
                         "paired": statistics.median(a / b for a, b in zip(times["moe"], times[n])),
                         "cpu_of_medians": (res["variants"]["moe"]["cpu_median_s"]
                                            / res["variants"][n]["cpu_median_s"])}
        if floors:
            ratios["floor"] = ratios[res["floor"]]
        res["moe_over"] = ratios
    del case, runs
    gc.collect()
    return res


def machine() -> dict:
    try:
        import transformers
        tf = transformers.__version__
    except ImportError:
        tf = None
    return {"nproc": cpu_count(), "cpu_model": cpu_model(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "transformers": tf}


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"T={T_QUICK}, 2 rounds, results to /tmp")
    p.add_argument("--fine", action="store_true", help=f"fine-grained sweep: D={FINE_D}, F={FINE_FFN}, E in "
                   f"{FINE_EXPERTS}, variants {','.join(FINE_VARIANTS)}; writes layer_fine_cpu.*")
    p.add_argument("--tokens", type=int, help=f"T (default {T_FULL}, {T_QUICK} with --quick)")
    p.add_argument("--ffn", type=int, help="each expert's hidden size F (default 1024; 512 with --fine); a tiny F "
                   "(4) leaves the expert matmuls negligible, so the layer's own per-E costs stand out")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 7, 2 with --quick; >= 5 for results)")
    p.add_argument("--experts", type=int, nargs="+", help=f"E values (default {EXPERTS}; {FINE_EXPERTS} with --fine)")
    p.add_argument("--variants", help=f"comma list from {ALL_VARIANTS} (default {','.join(DEFAULT_VARIANTS)})")
    p.add_argument("--with-loop", action="store_true", help="add moe_loop (expert_impl='loop')")
    p.add_argument("--no-hf-eager", action="store_true", help="skip HF's eager expert loop (the slowest)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak/saved memory pass")
    p.add_argument("--out", type=Path, help="results folder (default benchmarks/results; /tmp/... with --quick)")
    p.add_argument("--name", help="results file stem (default layer_cpu, layer_fine_cpu with --fine)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (1: CPU times are per-call work, and "
                   "OpenMP stalls on a busy machine are avoided)")
    args = p.parse_args(argv)
    for flag in ("tokens", "ffn", "rounds", "threads"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f"--{flag} must be a positive integer, got {value}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    d, ffn = (FINE_D, FINE_FFN) if args.fine else (D, FFN)
    ffn = args.ffn or ffn
    experts = args.experts or list(FINE_EXPERTS if args.fine else EXPERTS)
    name = args.name or ("layer_fine_cpu" if args.fine else "layer_cpu")
    T = args.tokens or (T_QUICK if args.quick else T_FULL)
    rounds = args.rounds or (2 if args.quick else 7)
    names = [n for n in (args.variants or ",".join(FINE_VARIANTS if args.fine else DEFAULT_VARIANTS)).split(",") if n]
    if args.with_loop and "moe_loop" not in names:
        names.insert(1, "moe_loop")
    if args.no_hf_eager and "hf_eager" in names:
        names.remove("hf_eager")
    if hf_block_class() is None:
        print("transformers is not installed: the Hugging Face variants are skipped")
    out_dir = args.out or (Path("/tmp/moe_bench_quick") if args.quick else RESULTS)
    torch.manual_seed(0)
    started, load_before = time.time(), os.getloadavg()
    results = {}
    for E in experts:
        print(f"E={E}: T={T}, D={d}, F={ffn}, {rounds} rounds, variants {names}", flush=True)
        results[str(E)] = measure(T, E, rounds, names, memory=not args.no_memory,
                                  log=lambda s: print(s, flush=True), D=d, FFN=ffn)
    payload = {"date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"), "machine": machine(),
               "config": {"T": T, "D": d, "F": ffn, "k": K, "dtype": "float32", "rounds": rounds,
                          "losses": "default (SwitchAuxLoss 1e-2)", "stats": True, "quick": args.quick},
               "library_commit": library_commit(), "wall_s": round(time.time() - started, 1),
               "load_before": list(load_before),
               "load_after": list(os.getloadavg()), "allocator_env": allocator_env(), "results": results}
    text = fine_markdown(payload) if args.fine else markdown(payload)
    print()
    print(text)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f"{name}.json.tmp"
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(out_dir / f"{name}.json")
    (out_dir / f"{name}.md").write_text(text + "\n")
    print(f"\nwrote {out_dir / (name + '.json')} and {out_dir / (name + '.md')}")
    return payload


# ---- pytest-benchmark view: one benchmark per (E, variant), timings only -------------------------------------
def _bench_T() -> int:
    return T_QUICK if os.environ.get("MOE_BENCH_QUICK") else T_FULL


@functools.lru_cache(maxsize=1)  # one (T, E) case alive at a time; tests are grouped by E
def _case(T: int, E: int) -> Case:
    gc.collect()
    return build_case(T, E, ALL_VARIANTS)


try:
    import pytest
except ImportError:  # running as a script without pytest
    pytest = None

if pytest is not None:
    @pytest.mark.parametrize("variant", ALL_VARIANTS)
    @pytest.mark.parametrize("E", EXPERTS)
    def test_layer_fwd_bwd(benchmark, E, variant):
        if variant.startswith("hf_") and hf_block_class() is None:
            pytest.skip("transformers is not installed")
        v = _case(_bench_T(), E).variants[variant]
        benchmark.group = f"layer fwd+bwd T={_bench_T()} E={E}"
        benchmark.extra_info.update(T=_bench_T(), E=E, D=D, F=FFN, k=K)
        rounds = 2 if os.environ.get("MOE_BENCH_QUICK") else 5
        benchmark.pedantic(v.run, setup=v.reset, rounds=rounds, warmup_rounds=1, iterations=1)
        v.reset()


if __name__ == "__main__":
    main()
