"""PNG plots (matplotlib, Agg backend): validation curves, final expert loads, ReMoE sparsity and lambda."""
from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig, path: Path) -> Path:
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def plot_val_curves(runs: list[dict], path: Path) -> Path:
    """Validation loss vs step per router: mean over seeds, shaded min-max band."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_router: dict[str, list[dict]] = {}
    for r in runs:
        by_router.setdefault(r["router"], []).append(r)
    for name, rs in by_router.items():
        steps = [s for s, _ in rs[0]["val_curve"]]
        curves = [[v for _, v in r["val_curve"]] for r in rs]
        n = min(len(c) for c in curves)
        steps, cols = steps[:n], list(zip(*(c[:n] for c in curves)))
        mean = [sum(c) / len(c) for c in cols]
        line, = ax.plot(steps, mean, label=f"{name} (n={len(rs)})")
        ax.fill_between(steps, [min(c) for c in cols], [max(c) for c in cols], color=line.get_color(), alpha=0.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("Validation loss: mean and min-max over seeds")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_val_vs_compute(runs: list[dict], path: Path) -> Path:
    """Validation loss against cumulative forward expert FLOPs (iso-compute view), one line per run: a router
    that spends more expert compute per token moves right, so equal-compute comparisons read off vertically."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors: dict[str, str] = {}
    for r in runs:
        flops = r.get("val_compute_curve") or []
        if len(flops) != len(r["val_curve"]) or not flops:
            continue
        label = None if r["router"] in colors else r["router"]
        line, = ax.plot(flops, [v for _, v in r["val_curve"]], color=colors.get(r["router"]), label=label,
                        alpha=0.8, lw=1.2)
        colors.setdefault(r["router"], line.get_color())
    ax.set_xscale("log")
    ax.set_xlabel("cumulative forward expert FLOPs (all training tokens)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("Validation loss at equal expert compute (one line per seed)")
    if colors:
        ax.legend()
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path)


def plot_scaling(points: list[dict], fit, path: Path) -> Path:
    """Final validation loss against the base model's non-embedding parameters N (log-log), one colour per
    expert count: measured points (every seed) and the fitted routed scaling law."""
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for e in sorted({p["experts"] for p in points}):
        pts = [p for p in points if p["experts"] == e]
        line, = ax.plot([p["N"] for p in pts], [p["final_val_loss"] for p in pts], "o", label=f"E={e}")
        ns = np.geomspace(min(p["N"] for p in points), max(p["N"] for p in points), 50)
        ax.plot(ns, fit.predict(ns, np.full_like(ns, e)), "-", color=line.get_color(), lw=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("N: non-embedding parameters of the dense base model")
    ax.set_ylabel("final validation loss")
    ax.set_title(f"Routed scaling law fit: a={fit.a:+.3f} b={fit.b:+.3f} c={fit.c:+.3f}")
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path)


def plot_load_heatmaps(runs: list[dict], path: Path) -> Path:
    """Final per-layer fraction of routed pairs per expert on the validation set (first seed of each router)."""
    first: dict[str, dict] = {}
    for r in runs:
        if r.get("final_load_LE") and r["router"] not in first:
            first[r["router"]] = r
    n = max(1, len(first))
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n + 1, 0.5 * max(2, _num_layers(first)) + 1.6), squeeze=False,
                             constrained_layout=True)
    vmax = max((max(max(row) for row in r["final_load_LE"]) for r in first.values()), default=1.0)
    im = None
    for ax, (name, r) in zip(axes[0], first.items()):
        loads = r["final_load_LE"]
        im = ax.imshow(loads, aspect="auto", cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_title(f"{name} (seed {r['seed']})", fontsize=9)
        ax.set_xticks(range(len(loads[0])))
        ax.set_yticks(range(len(loads)))
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
    if im is None:
        axes[0][0].text(0.5, 0.5, "no MoE runs", ha="center", va="center")
        axes[0][0].set_axis_off()
    else:
        fig.colorbar(im, ax=axes[0].tolist(), label="fraction of routed pairs")
    fig.suptitle("Final expert load per layer (validation set; uniform = 1/E)")
    return _save(fig, path)


def _num_layers(first: dict) -> int:
    return max((len(r["final_load_LE"]) for r in first.values()), default=1)


def plot_relu_controller(runs: list[dict], path: Path) -> Path:
    """ReMoE: mean router sparsity and L1 coefficient lambda over training, one line per seed."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    relu = [r for r in runs if any("relu_sparsity" in h for h in r["history"])]
    for r in relu:
        steps = [h["step"] for h in r["history"]]
        ax1.plot(steps, [h["relu_sparsity"] for h in r["history"]], label=f"seed {r['seed']}")
        ax2.semilogy(steps, [h["relu_lambda"] for h in r["history"]], label=f"seed {r['seed']}")
    if relu:
        target = 1.0 - relu[0]["fingerprint"]["top_k"] / relu[0]["fingerprint"]["num_experts"]
        ax1.axhline(target, color="k", ls="--", lw=1, label="target 1-k/E")
    ax1.set_xlabel("optimizer step")
    ax1.set_ylabel("sparsity (last micro-batch)")
    ax2.set_xlabel("optimizer step")
    ax2.set_ylabel("L1 coefficient lambda")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        if relu:
            ax.legend()
    fig.suptitle("ReMoE controller" if relu else "ReMoE controller (no relu runs)")
    return _save(fig, path)


def make_plots(runs: list[dict], out_dir: Path) -> list[Path]:
    out_dir = Path(out_dir)
    return [plot_val_curves(runs, out_dir / "val_loss.png"),
            plot_val_vs_compute(runs, out_dir / "val_loss_vs_compute.png"),
            plot_load_heatmaps(runs, out_dir / "expert_load.png"),
            plot_relu_controller(runs, out_dir / "remoe_controller.png")]
