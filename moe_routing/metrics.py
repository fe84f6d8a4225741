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


def chunk_ids(num_tokens: int, chunk_len: int, seq_T: Optional[Tensor] = None, num_seqs: int = 1,
              device: Optional[torch.device] = None) -> tuple[Tensor, int]:
    """Chunk of each token (int64 [T]) and a static bound C on the number of chunks.

    A chunk is ``chunk_len`` consecutive positions of one sequence: token t at position p of its sequence is in
    that sequence's chunk ``p // chunk_len``; a sequence's last chunk may be shorter. ``seq_T`` (int64 [T], each
    sequence's tokens contiguous, as `MoELayer` builds it from a [B, S, D] input or ``RoutingContext.seq_lens``)
    None means one sequence. Chunk ids are < C = ``T // chunk_len + num_seqs`` (a bound fixed by the shapes, so
    no host sync); ids of chunks that do not exist stay unused.
    """
    if seq_T is None:
        return torch.arange(num_tokens, device=device) // chunk_len, -(-num_tokens // chunk_len)
    # index_add_ into [S], not bincount: bincount's output size depends on the data (a host sync)
    counts_S = torch.zeros(num_seqs, dtype=torch.int64, device=seq_T.device)
    counts_S.index_add_(0, seq_T, torch.ones_like(seq_T))
    starts_S = counts_S.cumsum(0) - counts_S
    pos_T = torch.arange(num_tokens, device=seq_T.device) - starts_S[seq_T]
    chunks_S = (counts_S + chunk_len - 1) // chunk_len
    chunk_start_S = chunks_S.cumsum(0) - chunks_S
    return chunk_start_S[seq_T] + pos_T // chunk_len, num_tokens // chunk_len + num_seqs


@torch.no_grad()
def sparsity_stats(token_N: Tensor, expert_N: Tensor, num_tokens: int, num_experts: int, chunk_len: int,
                   seq_T: Optional[Tensor] = None, num_seqs: int = 1,
                   valid_T: Optional[Tensor] = None) -> dict[str, Tensor]:
    """Token-level and chunk-level sparsity of the routed pairs (BlockFFN, arXiv 2507.08771).

    ``tls``: the fraction of experts a token does not use, averaged over non-padding tokens. ``cls``: the
    fraction of experts that no token of a chunk of ``chunk_len`` consecutive tokens uses (see `chunk_ids`),
    averaged over chunks holding a non-padding token; padding tokens use no expert. Both 0 when every token is
    padding.
    """
    w_T = torch.ones(num_tokens, device=token_N.device) if valid_T is None else valid_T.float()
    w_N = w_T.index_select(0, token_N)
    num_valid = w_T.sum()
    tls = torch.where(num_valid > 0, 1.0 - w_N.sum().double() / (num_valid.double() * num_experts).clamp_min(1),
                      torch.zeros((), dtype=torch.float64, device=w_T.device))
    chunk_T, C = chunk_ids(num_tokens, chunk_len, seq_T, num_seqs, device=token_N.device)
    used_CE = torch.zeros(C * num_experts, device=token_N.device).index_add_(
        0, chunk_T.index_select(0, token_N) * num_experts + expert_N, w_N)
    live_C = torch.zeros(C, device=token_N.device).index_add_(0, chunk_T, w_T) > 0
    num_chunks = live_C.sum()
    cls = torch.where(num_chunks > 0,
                      1.0 - (used_CE > 0).sum().double() / (num_chunks.double() * num_experts).clamp_min(1),
                      torch.zeros((), dtype=torch.float64, device=w_T.device))
    return {"tls": tls, "cls": cls}


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
