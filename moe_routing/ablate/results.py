"""Aggregate runs over seeds into one row per router; write CSV/JSON atomically; print the summary table."""
from __future__ import annotations

import csv
import io
import statistics
from pathlib import Path
from typing import Optional

from .checkpoint import atomic_write_json, atomic_write_text
from .stats import iso_compute_diff, paired_stats

BASELINE = "topk"
# the claim each router's paper makes against TopK (-1: lower validation loss); the dense FFN of equal active
# parameters is expected to lose to TopK (+1)
CLAIM_SIGN = {"dense": 1}

COLUMNS = ["router", "seeds", "val_loss_mean", "val_loss_std", "val_loss_min", "val_loss_max", "delta_vs_topk",
           "delta_vs_topk_std", "delta_ci95_lo", "delta_ci95_hi", "delta_mde", "verdict", "iso_delta_vs_topk",
           "iso_ci95_lo", "iso_ci95_hi", "iso_verdict",
           "tokens_per_s", "active_params", "total_params", "experts_per_token_train_avg",
           "expert_mflops_per_token_train_avg", "final_experts_per_token", "final_sparsity", "final_max_vio",
           "final_routing_entropy", "train_cpu_s_mean"]


def _mean(values: list) -> Optional[float]:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def aggregate(runs: list[dict]) -> list[dict]:
    """One row per router (first-seen order): val loss mean, sample std (0 for one seed), min, max over seeds,
    and per-router means of the other metrics; ``delta_vs_topk`` is the paired (same seed) mean difference."""
    by_router: dict[str, list[dict]] = {}
    for r in runs:
        by_router.setdefault(r["router"], []).append(r)
    topk = {r["seed"]: r for r in by_router.get(BASELINE, [])}
    rows = []
    for name, rs in by_router.items():
        losses = [r["final_val_loss"] for r in rs]
        paired = [r["final_val_loss"] - topk[r["seed"]]["final_val_loss"] for r in rs if r["seed"] in topk]
        rows.append({
            "router": name, "seeds": len(rs),
            "val_loss_mean": _mean(losses), "val_loss_std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
            "val_loss_min": min(losses), "val_loss_max": max(losses),
            "delta_vs_topk": _mean(paired) if name != "topk" else 0.0,
            "delta_vs_topk_std": statistics.stdev(paired) if len(paired) > 1 and name != "topk" else 0.0,
            "tokens_per_s": _mean([r["tokens_per_s"] for r in rs]),
            "active_params": rs[0]["active_params"], "total_params": rs[0]["total_params"],
            "experts_per_token_train_avg": _mean([r["experts_per_token_train_avg"] for r in rs]),
            "expert_mflops_per_token_train_avg": _mean([r["expert_flops_per_token_train_avg"] / 1e6 for r in rs]),
            "final_experts_per_token": _mean([r["final_experts_per_token"] for r in rs]),
            # a dense FFN has no routing: its nominal "k of E" is not a measured sparsity
            "final_sparsity": _mean([r["final_sparsity"] for r in rs if r.get("final_max_vio") is not None]),
            "final_max_vio": _mean([r["final_max_vio"] for r in rs]),
            "final_routing_entropy": _mean([r["final_routing_entropy"] for r in rs]),
            "train_cpu_s_mean": _mean([r.get("train_cpu_s") for r in rs]),  # None for runs recorded before it
            **(_claim_columns(name, rs, topk) if name != BASELINE else {}),
        })
    return rows


def _claim_columns(name: str, rs: list[dict], baseline: dict[int, dict]) -> dict:
    """Paired 95% interval, minimal detectable effect and verdict of the difference to the baseline, at the
    end of training and at equal expert compute."""
    sign = CLAIM_SIGN.get(name, -1)
    out: dict = {}
    pairs = [(r, baseline[r["seed"]]) for r in rs if r["seed"] in baseline]
    if pairs:
        st = paired_stats([r["final_val_loss"] - b["final_val_loss"] for r, b in pairs])
        out.update(delta_ci95_lo=st.lo, delta_ci95_hi=st.hi, delta_mde=st.mde, verdict=st.verdict(sign))
    iso = [iso_compute_diff(r, b) for r, b in pairs]
    if iso and all(d is not None for d in iso):
        st = paired_stats(iso)
        out.update(iso_delta_vs_topk=st.mean, iso_ci95_lo=st.lo, iso_ci95_hi=st.hi, iso_verdict=st.verdict(sign))
    return out


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) >= 1e4 or abs(v) < 1e-3 and v != 0 else f"{v:.4f}"
    return str(v)


def _interval(lo: Optional[float], hi: Optional[float]) -> str:
    return "-" if lo is None or hi is None else f"[{lo:+.4f}, {hi:+.4f}]"


def format_table(rows: list[dict]) -> str:
    """A printable summary: val loss mean +/- std over seeds, the same-seed difference to topk (mean +/- std,
    95% interval, minimal detectable effect, verdict; then at equal expert compute), next to throughput, parameters, compute actually used, sparsity and balance."""
    head = ["router", "seeds", "val loss (mean +/- std)", "paired d vs topk", "95% CI", "MDE", "verdict",
            "d at equal compute [95% CI]", "verdict (compute)", "tok/s", "active", "total", "exp/tok(train)",
            "MFLOP/tok", "sparsity", "MaxVio", "entropy"]
    body = []
    for r in rows:
        body.append([r["router"], str(r["seeds"]), f"{r['val_loss_mean']:.4f} +/- {r['val_loss_std']:.4f}",
                     f"{r['delta_vs_topk']:+.4f} +/- {r['delta_vs_topk_std']:.4f}"
                     if r["delta_vs_topk"] is not None else "-",
                     _interval(r.get("delta_ci95_lo"), r.get("delta_ci95_hi")), _fmt(r.get("delta_mde")),
                     r.get("verdict") or "-",
                     f"{r['iso_delta_vs_topk']:+.4f} {_interval(r.get('iso_ci95_lo'), r.get('iso_ci95_hi'))}"
                     if r.get("iso_delta_vs_topk") is not None else "-", r.get("iso_verdict") or "-",
                     f"{r['tokens_per_s']:.0f}", f"{r['active_params'] / 1e3:.0f}k", f"{r['total_params'] / 1e3:.0f}k",
                     _fmt(r["experts_per_token_train_avg"]), _fmt(r["expert_mflops_per_token_train_avg"]),
                     _fmt(r["final_sparsity"]), _fmt(r["final_max_vio"]), _fmt(r["final_routing_entropy"])])
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


def write_results(out_dir: Path, rows: list[dict], runs: list[dict], meta: dict) -> tuple[Path, Path]:
    """``results.csv`` (one row per router) and ``results.json`` (rows, per-run summaries, settings)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in r.items()})
    csv_path, json_path = Path(out_dir) / "results.csv", Path(out_dir) / "results.json"
    atomic_write_text(csv_path, buf.getvalue())
    slim = [{k: v for k, v in r.items() if k not in ("train_losses", "fingerprint")} for r in runs]
    atomic_write_json(json_path, {"meta": meta, "routers": rows, "runs": slim})
    return csv_path, json_path
