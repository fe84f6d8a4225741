"""moe_routing/ablate/results.py: the per-router aggregate (mean, standard deviation, paired delta against topk)
against hand statistics."""
import statistics

import pytest

from moe_routing.ablate.results import aggregate


def test_aggregate_against_hand_statistics():
    runs = []
    for router, losses in (("topk", [2.0, 2.2, 2.1]), ("relu", [1.9, 2.3, 2.0])):
        for seed, loss in enumerate(losses):
            runs.append({"router": router, "seed": seed, "final_val_loss": loss, "tokens_per_s": 100.0 + seed,
                         "active_params": 10, "total_params": 40, "experts_per_token_train_avg": 1.5,
                         "expert_flops_per_token_train_avg": 3e6, "final_experts_per_token": 1.0,
                         "final_sparsity": 0.75, "final_max_vio": 0.5, "final_routing_entropy": 1.0})
    rows = {r["router"]: r for r in aggregate(runs)}
    assert rows["relu"]["val_loss_mean"] == pytest.approx(6.2 / 3)
    assert rows["relu"]["val_loss_std"] == pytest.approx(statistics.stdev([1.9, 2.3, 2.0]))
    assert rows["relu"]["delta_vs_topk"] == pytest.approx(((1.9 - 2.0) + (2.3 - 2.2) + (2.0 - 2.1)) / 3)
    assert rows["relu"]["tokens_per_s"] == pytest.approx(101.0) and rows["topk"]["delta_vs_topk"] == 0.0
