"""Routing metrics: cheap per-forward statistics kept on each layer, and a report over a whole model.

Stats are detached tensors (no host sync in forward); `routing_report` converts them to Python numbers.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from .decision import RoutingDecision


@torch.no_grad()
def max_violation(load_E: Tensor) -> Tensor:
    """MaxVio ``(max_i load_i - mean load) / mean load`` (0 when perfectly balanced)."""
    load = load_E.double()
    mean = load.mean()
    return torch.where(mean > 0, (load.max() - mean) / mean.clamp_min(1e-30), torch.zeros_like(mean))


@torch.no_grad()
def routing_entropy(probs_TE: Tensor, valid_T: Optional[Tensor] = None) -> Tensor:
    """Mean over (non-padding) tokens of the entropy of the per-token routing distribution ``probs_TE`` [T, E]
    (rows summing to 1, `RoutingDecision.probs_TE`), in nats.

    Per-token entropies in the probabilities' dtype (at least float32: a float64 copy of [T, E] cost more than
    the rest of the layer's stats together at E=512), their mean in float64.
    """
    p = probs_TE.to(torch.promote_types(probs_TE.dtype, torch.float32))
    h_T = -p.clamp_min(1e-30).log_().mul_(p).sum(-1).double()
    if valid_T is None:
        return h_T.mean() if h_T.numel() else h_T.sum()
    return (h_T * valid_T).sum() / valid_T.sum().clamp_min(1)


@torch.no_grad()
def normalized_load_entropy(load_E: Tensor) -> Tensor:
    """Entropy of the load distribution over experts divided by ``log E`` (1 = perfectly balanced)."""
    E = load_E.numel()
    q = load_E.double() / load_E.double().sum().clamp_min(1e-30)
    h = -(q * q.clamp_min(1e-30).log()).sum()
    return h / math.log(E) if E > 1 else torch.ones_like(h)


@torch.no_grad()
def layer_stats(decision: RoutingDecision, load_E: Tensor, routed_pairs: Tensor, dropped_pairs: Tensor,
                valid_T: Optional[Tensor] = None) -> dict[str, Tensor]:
    """Per-forward stats. ``load_E``: pairs each expert processed (after drops, padding excluded);
    ``routed_pairs``/``dropped_pairs``: non-padding pairs before capacity and those dropped by it."""
    # T as a Python (symbolic) int, never a new tensor built from it: `torch.as_tensor(T)` would pin T as a
    # constant in a dynamic-shape compiled graph and recompile for every token count
    per_token = (routed_pairs.double() / torch.sym_max(decision.num_tokens, 1) if valid_T is None
                 else routed_pairs.double() / valid_T.sum().double().clamp_min(1))
    stats = {
        "tokens_per_expert": load_E.detach().clone(),
        "max_vio": max_violation(load_E),
        "routing_entropy": routing_entropy(decision.probs_TE, valid_T),
        "load_entropy": normalized_load_entropy(load_E),
        "drop_rate": dropped_pairs.double() / routed_pairs.double().clamp_min(1),
        "dropped": dropped_pairs.detach().clone(),
        "dead_experts": (load_E == 0).sum(),
        "experts_per_token": per_token,
    }
    for name, value in decision.extra.items():
        stats[name] = value.detach() if isinstance(value, Tensor) else torch.as_tensor(value)
    return stats


def _to_python(v: Tensor):
    v = v.detach().cpu()
    return v.tolist() if v.dim() else v.item()


def routing_report(model: nn.Module) -> dict[str, dict]:
    """Last-forward stats of every MoE layer in ``model``, keyed by module name, as Python numbers."""
    report = {}
    for name, module in model.named_modules():
        stats = getattr(module, "last_stats", None)
        if isinstance(stats, dict) and stats:
            report[name or "<root>"] = {k: _to_python(v) for k, v in stats.items()}
    return report


def format_routing_report(report: dict[str, dict]) -> str:
    """A printable table: one row per layer with balance, entropy, drops and dead experts."""
    cols = [("max_vio", "{:.3f}"), ("routing_entropy", "{:.3f}"), ("load_entropy", "{:.3f}"),
            ("drop_rate", "{:.4f}"), ("dead_experts", "{:d}"), ("experts_per_token", "{:.2f}")]
    width = max([len("layer")] + [len(n) for n in report])
    lines = ["layer".ljust(width) + "".join(f"  {c:>17}" for c, _ in cols) + "  tokens_per_expert"]
    for name, stats in report.items():
        row = name.ljust(width)
        for c, fmt in cols:
            row += f"  {fmt.format(stats[c]):>17}" if c in stats else f"  {'-':>17}"
        loads = stats.get("tokens_per_expert", [])
        shown = loads if len(loads) <= 16 else loads[:16] + ["..."]
        lines.append(row + "  " + " ".join(str(int(v)) if not isinstance(v, str) else v for v in shown))
    return "\n".join(lines)
