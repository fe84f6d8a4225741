"""moe_routing/ablate/report.py: the Markdown summary and claims tables carry the aggregated numbers, each
claim's interval and the verdict read from it (not from the mean)."""
from moe_routing.ablate.report import CLAIMS, format_markdown
from moe_routing.ablate.results import aggregate


def _run(router: str, seed: int, loss: float) -> dict:
    return {"router": router, "seed": seed, "final_val_loss": loss, "tokens_per_s": 1000.0, "active_params": 1000,
            "total_params": 4000, "experts_per_token_train_avg": 1.0, "expert_flops_per_token_train_avg": 5e4,
            "final_experts_per_token": 1.0, "final_sparsity": 0.875, "final_max_vio": 0.2,
            "final_routing_entropy": 1.5, "train_cpu_s": 100.0 + seed,
            "val_curve": [[10, loss + 1.0], [20, loss]], "val_compute_curve": [1e6, 2e6]}


def test_markdown_tables_hold_the_rows_intervals_and_verdicts():
    topk = [2.00, 2.10, 2.05, 2.02, 2.07]
    runs = [_run("topk", s, v) for s, v in enumerate(topk)]
    runs += [_run("relu", s, v - 0.05 - 0.001 * s) for s, v in enumerate(topk)]  # always ~0.05 better
    runs += [_run("rmoe", s, v + (0.03 if s % 2 else -0.03)) for s, v in enumerate(topk)]  # noise around 0
    runs += [_run("dense", s, v + 0.1) for s, v in enumerate(topk)]  # TopK beats dense: the claim holds
    rows = aggregate(runs)
    md = format_markdown(rows, {"preset": {"name": "cpu-paper", "seeds": [0, 1, 2, 3, 4]}, "library_digest": "abc123"})
    lines = md.splitlines()
    assert "library digest abc123" in lines[0]
    relu_row = next(l for l in lines if l.startswith("| relu |"))
    assert "-0.0520 ± 0.0016" in relu_row and "| 102 |" in relu_row  # mean paired delta, CPU s mean
    claims = {l.split(" | ")[0][2:]: l for l in lines if l.startswith("| ") and "[" in l}
    assert "| reproduced |" in claims[CLAIMS["relu"]]
    assert "| not resolvable |" in claims[CLAIMS["rmoe"]]
    assert "| reproduced |" in claims[CLAIMS["dense"] + " (Δ = dense - topk > 0)"]
    assert not any(l.startswith("| " + CLAIMS.get("topk", "topk beats")) for l in lines)
