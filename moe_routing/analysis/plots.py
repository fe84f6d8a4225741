"""Heatmaps of a `RoutingCollection` written to a folder (matplotlib, imported only when plotting: the ``ablate``
extra)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .collect import RoutingCollection, routing_divergence


KINDS = ("load", "coactivation", "positions", "divergence")


def _heatmap(ax, data: Tensor, title: str, xlabel: str, ylabel: str, vmin=None, vmax=None) -> None:
    im = ax.imshow(data.float().numpy(), aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax,
                   interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)


def plot_routing(collection: RoutingCollection, folder: Union[str, Path],
                 other: Optional[RoutingCollection] = None, dpi: int = 90,
                 kinds: Sequence[str] = KINDS) -> list[Path]:
    """Write the plots named in ``kinds`` (default all) of ``collection`` into ``folder``; return their paths:

    ``load.png`` (expert load [L, E]), ``coactivation.png`` (P(j | i) per layer), ``positions.png`` (per layer,
    the share of the tokens at each position routed to each expert [E, S]) and, with ``other`` (inputs to
    compare, same model), ``divergence.png`` (the per-layer routing divergence of `routing_divergence`; paired
    when both hold as many sequences)."""
    bad = [k for k in kinds if k not in KINDS]
    if bad or isinstance(kinds, str):
        raise ValueError(f"kinds must be a sequence of {KINDS}, got {kinds!r}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []

    if "load" in kinds:
        paths.append(_save_load(collection, folder / "load.png", dpi, plt))
    if "coactivation" in kinds:
        paths.append(_save_coactivation(collection, folder / "coactivation.png", dpi, plt))
    if "positions" in kinds:
        paths.append(_save_positions(collection, folder / "positions.png", dpi, plt))
    if other is not None and "divergence" in kinds:
        paths.append(_save_divergence(collection, other, folder / "divergence.png", dpi, plt))
    return paths


def _save_load(collection, path, dpi, plt) -> Path:
    fig, ax = plt.subplots(figsize=(6, 1 + 0.4 * collection.num_layers))
    _heatmap(ax, collection.expert_load(), "expert load (share of assignments)", "expert", "MoE layer")
    return _save(fig, path, dpi, plt)


def _save_coactivation(collection, path, dpi, plt) -> Path:
    L = collection.num_layers
    co = collection.coactivation(normalize=True)
    fig, axes = plt.subplots(1, L, figsize=(3.4 * L, 3), squeeze=False)
    for l in range(L):
        _heatmap(axes[0, l], co[l], f"layer {l}: P(expert j | expert i)", "j", "i", 0, 1)
    return _save(fig, path, dpi, plt)


def _save_positions(collection, path, dpi, plt) -> Path:
    L = collection.num_layers
    spec = collection.specialization("position")
    counts_LES = spec.joint_LEV
    share_LES = counts_LES / counts_LES.sum(1, keepdim=True).clamp_min(1)  # per position, over experts
    fig, axes = plt.subplots(L, 1, figsize=(7, 1.6 * L + 0.5), squeeze=False)
    for l in range(L):
        _heatmap(axes[l, 0], share_LES[l], f"layer {l}: experts by position (U = {float(spec.score_L[l]):.3f})",
                 "position", "expert")
    return _save(fig, path, dpi, plt)


def _save_divergence(collection, other, path, dpi, plt) -> Path:
    paired = len(collection.seq_lens) == len(other.seq_lens)
    div = routing_divergence(collection, other, paired=paired)
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(range(collection.num_layers), div.numpy(), marker="o")
    ax.set_xticks(range(collection.num_layers))
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("normalised JS divergence")
    ax.set_title(f"routing divergence ({'paired' if paired else 'unpaired'})", fontsize=9)
    ax.set_ylim(0, max(0.05, float(div.max()) * 1.2))
    ax.grid(alpha=0.3)
    return _save(fig, path, dpi, plt)


def _save(fig, path: Path, dpi: int, plt) -> Path:
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path
