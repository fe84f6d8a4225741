"""``results.md``: the sweep's summary and claims tables in Markdown, written next to results.csv/json on every
run, so the tables in the docs are pasted from a file the current code wrote rather than retyped."""
from __future__ import annotations

from typing import Optional

from .results import BASELINE, CLAIM_SIGN

# each router's claim against the TopK baseline, with the paper it comes from
CLAIMS = {
    "dense": "TopK beats the dense FFN of equal active parameters (the premise of MoE)",
    "topk_scaled": "gates scaled to sum to k at initialisation (the dense FFN's output scale) improve TopK",
    "relu": "ReMoE (ReLU routing) beats TopK at equal active compute (arXiv 2412.14711)",
    "rmoe": "RMoE (GRU router) beats TopK (arXiv 2408.06793)",
    "topk+erc": "the ERC loss improves TopK (arXiv 2512.23447; its own claim is downstream accuracy)",
    "topk+dpsl": "DPSL instead of the switch aux improves TopK (arXiv 2510.01185; its setting is upcycling)",
    "blockffn": "BlockFFN's ReLU + RMSNorm router beats TopK (arXiv 2507.08771)",
    "mor": "a mixture of routers beats one router",
    "compete": "CompeteSMoE's competition routing beats TopK (Fsoft-AIC/CompeteSMoE)",
    "bilevel": "bi-level (group, then expert) routing matches TopK while keeping tokens in their group",
}


def _num(v: Optional[float], fmt: str = "{:+.4f}") -> str:
    return "-" if v is None else fmt.format(v)


def _ci(lo: Optional[float], hi: Optional[float]) -> str:
    return "-" if lo is None or hi is None else f"[{lo:+.4f}, {hi:+.4f}]"


def format_markdown(rows: list[dict], meta: dict) -> str:
    """Two Markdown tables from `results.aggregate` rows: per-router summary, then each claim with its paired
    95% interval, minimal detectable effect and verdict (final loss, and at equal expert compute)."""
    p = meta.get("preset", {})
    lines = [f"Preset `{p.get('name', '?')}`: D={p.get('d_model')}, {p.get('n_layers')} layers, "
             f"E={p.get('num_experts')}, k={p.get('top_k')}, F={p.get('expert_hidden')}, seq {p.get('seq_len')} "
             f"x batch {p.get('global_batch')}, "
             f"{p.get('steps')} steps, seeds {p.get('seeds')}; data {meta.get('data')}; torch {meta.get('torch')}; "
             f"library digest {meta.get('library_digest')}.", "",
             "| router | seeds | val loss (mean ± std) | Δ vs topk (mean ± std) | experts/token (train avg) | "
             "expert MFLOP/token | final MaxVio | active / total params | train CPU s per run |",
             "|---|---:|---|---|---:|---:|---:|---|---:|"]
    for r in rows:
        delta = "0 (baseline)" if r["router"] == BASELINE else (
            f"{r['delta_vs_topk']:+.4f} ± {r['delta_vs_topk_std']:.4f}" if r.get("delta_vs_topk") is not None else "-")
        cpu = r.get("train_cpu_s_mean")
        lines.append(f"| {r['router']} | {r['seeds']} | {r['val_loss_mean']:.4f} ± {r['val_loss_std']:.4f} | "
                     f"{delta} | "
                     f"{_num(r.get('experts_per_token_train_avg'), '{:.2f}')} | "
                     f"{_num(r.get('expert_mflops_per_token_train_avg'), '{:.4f}')} | "
                     f"{_num(r.get('final_max_vio'), '{:.3f}')} | {r['active_params'] / 1e3:.0f}k / "
                     f"{r['total_params'] / 1e3:.0f}k | {_num(cpu, '{:.0f}')} |")
    lines += ["", "| claim | Δ final [95% CI] | MDE | verdict | Δ at equal expert compute [95% CI] | verdict |",
              "|---|---|---:|---|---|---|"]
    for r in rows:
        if r["router"] == BASELINE:
            continue
        claim = CLAIMS.get(r["router"], f"{r['router']} beats TopK")
        if CLAIM_SIGN.get(r["router"], -1) == 1:  # the claim is that TopK wins: say which way Δ must go
            claim += f" (Δ = {r['router']} - topk > 0)"
        lines.append(f"| {claim} | {_num(r.get('delta_vs_topk'))} "
                     f"{_ci(r.get('delta_ci95_lo'), r.get('delta_ci95_hi'))} | "
                     f"{_num(r.get('delta_mde'), '{:.4f}')} | {r.get('verdict') or '-'} | "
                     f"{_num(r.get('iso_delta_vs_topk'))} {_ci(r.get('iso_ci95_lo'), r.get('iso_ci95_hi'))} | "
                     f"{r.get('iso_verdict') or '-'} |")
    lines += ["", "Δ: same-seed difference router - topk in final validation loss (negative = lower loss than TopK). "
              "95% CI: paired t-interval over seeds; MDE: the smallest true difference these seeds detect with "
              "power 0.8 at 5%. A verdict is read from the interval: reproduced when it lies wholly on the claimed "
              "side of 0, not reproduced when wholly on the other, not resolvable when it contains 0. Equal "
              "expert compute: both runs' validation loss interpolated at the smaller of their final cumulative "
              "expert FLOPs."]
    return "\n".join(lines)
