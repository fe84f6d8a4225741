"""Heatmaps of a `RoutingCollection` written to a folder (matplotlib, imported only when plotting: the ``ablate``
extra)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor

from .collect import RoutingCollection, routing_divergence


def _heatmap(ax, data: Tensor, title: str, xlabel: str, ylabel: str, vmin=None, vmax=None) -> None:
    im = ax.imshow(data.float().numpy(), aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax,
                   interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)


def plot_routing(collection: RoutingCollection, folder: Union[str, Path],
                 other: Optional[RoutingCollection] = None, dpi: int = 90) -> list[Path]:
    """Write heatmaps of ``collection`` into ``folder`` and return their paths:

    ``load.png`` (expert load [L, E]), ``coactivation.png`` (P(j | i) per layer), ``positions.png`` (per layer,
    the share of the tokens at each position routed to each expert [E, S]) and, with ``other`` (inputs to
    compare, same model), ``divergence.png`` (the per-layer routing divergence of `routing_divergence`; paired
    when both hold as many sequences)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    L = collection.num_layers
    paths = []

    fig, ax = plt.subplots(figsize=(6, 1 + 0.4 * L))
    _heatmap(ax, collection.expert_load(), "expert load (share of assignments)", "expert", "MoE layer")
    paths.append(folder / "load.png")
    fig.savefig(paths[-1], dpi=dpi, bbox_inches="tight")
    plt.close(fig)

    co = collection.coactivation(normalize=True)
    fig, axes = plt.subplots(1, L, figsize=(3.4 * L, 3), squeeze=False)
    for l in range(L):
        _heatmap(axes[0, l], co[l], f"layer {l}: P(expert j | expert i)", "j", "i", 0, 1)
    paths.append(folder / "coactivation.png")
    fig.savefig(paths[-1], dpi=dpi, bbox_inches="tight")
    plt.close(fig)

    spec = collection.specialization("position")
    counts_LES = spec.joint_LEV
    share_LES = counts_LES / counts_LES.sum(1, keepdim=True).clamp_min(1)  # per position, over experts
    fig, axes = plt.subplots(L, 1, figsize=(7, 1.6 * L + 0.5), squeeze=False)
    for l in range(L):
        _heatmap(axes[l, 0], share_LES[l], f"layer {l}: experts by position (U = {float(spec.score_L[l]):.3f})",
                 "position", "expert")
    paths.append(folder / "positions.png")
    fig.savefig(paths[-1], dpi=dpi, bbox_inches="tight")
    plt.close(fig)

    if other is not None:
        paired = len(collection.seq_lens) == len(other.seq_lens)
        div = routing_divergence(collection, other, paired=paired)
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.plot(range(L), div.numpy(), marker="o")
        ax.set_xlabel("MoE layer")
        ax.set_ylabel("normalised JS divergence")
        ax.set_title(f"routing divergence ({'paired' if paired else 'unpaired'})", fontsize=9)
        ax.set_ylim(0, max(0.05, float(div.max()) * 1.2))
        ax.grid(alpha=0.3)
        paths.append(folder / "divergence.png")
        fig.savefig(paths[-1], dpi=dpi, bbox_inches="tight")
        plt.close(fig)
    return paths
