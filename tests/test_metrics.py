"""moe_routing/metrics.py: routing_report / format_routing_report numbers (loads, MaxVio, load and routing
entropy, drops, dead experts) against statistics recomputed here from the routers' own choices, with padding and
per-policy capacity drops."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from moe_routing import MoELayer, RoutingContext, format_routing_report, routing_report

D, F, E, K = 16, 32, 4, 2


class Block(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.moe = MoELayer(D, F, E, K, **kw)

    def forward(self, x, ctx=None):
        return x + self.moe(x, ctx)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        # block 0 dropless; block 1 capacity mode with a tight capacity, so drops are certain
        self.blocks = nn.ModuleList([Block(), Block(capacity_factor=0.5)])
        with torch.no_grad():
            w = self.blocks[0].moe.router.weight
            w.normal_(0, 0.3)
            w[3] = -1.0  # for positive inputs expert 3's logit is far below the rest: a dead expert

    def forward(self, x, ctx=None):
        for b in self.blocks:
            x = b(x, ctx)
        return x


def _capture_inputs(model):
    inputs = {}
    for i, b in enumerate(model.blocks):
        b.moe.register_forward_pre_hook(lambda m, args, i=i: inputs.__setitem__(i, args[0].detach().clone()))
    return inputs


def _expected(layer: MoELayer, x: torch.Tensor, valid=None):
    """Stats recomputed from the router's choices with plain tensor arithmetic."""
    x_TD = x.reshape(-1, D)
    with torch.no_grad():
        d = layer.router(x_TD)
    experts = d.experts_TK
    logits = x_TD.double() @ layer.router.weight.detach().double().t()
    if valid is not None:
        experts, logits = experts[valid], logits[valid]
    T = experts.shape[0]
    counts = torch.bincount(experts.reshape(-1), minlength=E)
    if layer.capacity_factor is not None:
        cap = math.ceil(layer.capacity_factor * T * K / E)
        kept = counts.clamp(max=cap)
    else:
        kept = counts
    dropped = int((counts - kept).sum())
    load = kept.double()
    q = load / load.sum()
    p = logits.softmax(-1)
    return {
        "tokens_per_expert": kept.tolist(),
        "max_vio": ((load.max() - load.mean()) / load.mean()).item(),
        "load_entropy": (-(q * q.clamp_min(1e-300).log()).sum() / math.log(E)).item(),
        "routing_entropy": (-(p * p.log()).sum(-1)).mean().item(),
        "dropped": dropped,
        "drop_rate": dropped / (T * K),
        "dead_experts": int((kept == 0).sum()),
        "experts_per_token": float(K),
    }


def _check(stats, exp):
    assert stats["tokens_per_expert"] == exp["tokens_per_expert"]
    assert stats["dropped"] == exp["dropped"]
    assert stats["dead_experts"] == exp["dead_experts"]
    for key in ("max_vio", "load_entropy", "drop_rate", "experts_per_token"):
        torch.testing.assert_close(torch.tensor(float(stats[key]), dtype=torch.float64),
                                   torch.tensor(exp[key], dtype=torch.float64), rtol=1e-9, atol=1e-12, msg=key)
    torch.testing.assert_close(torch.tensor(float(stats["routing_entropy"]), dtype=torch.float64),
                               torch.tensor(exp["routing_entropy"], dtype=torch.float64), rtol=1e-5, atol=1e-6)


def test_routing_report_two_layers():
    model = Net()
    inputs = _capture_inputs(model)
    torch.manual_seed(1)
    x = torch.rand(4, 16, D) + 0.5  # positive: keeps layer 0's expert 3 dead
    model(x)
    report = routing_report(model)
    assert list(report) == ["blocks.0.moe", "blocks.1.moe"]

    exp0 = _expected(model.blocks[0].moe, inputs[0])
    exp1 = _expected(model.blocks[1].moe, inputs[1])
    _check(report["blocks.0.moe"], exp0)
    _check(report["blocks.1.moe"], exp1)
    # what the test is about: layer 0 has a dead expert and no drops; layer 1 drops pairs
    assert exp0["dead_experts"] >= 1 and report["blocks.0.moe"]["tokens_per_expert"][3] == 0
    assert exp0["dropped"] == 0 and report["blocks.0.moe"]["drop_rate"] == 0.0
    assert exp1["dropped"] > 0 and report["blocks.1.moe"]["drop_rate"] > 0
    assert sum(report["blocks.1.moe"]["tokens_per_expert"]) == 64 * K - exp1["dropped"]
    assert max(report["blocks.1.moe"]["tokens_per_expert"]) <= math.ceil(0.5 * 64 * K / E)
    # values are plain Python numbers
    assert all(isinstance(v, (int, float, list)) for s in report.values() for v in s.values())


def test_routing_report_excludes_padding():
    model = Net()
    inputs = _capture_inputs(model)
    torch.manual_seed(2)
    x = torch.rand(2, 12, D) + 0.5
    pad = torch.zeros(2, 12, dtype=torch.bool)
    pad[0, 7:] = True
    pad[1, 10:] = True
    model(x, RoutingContext(padding_mask=pad))
    report = routing_report(model)
    valid = ~pad.reshape(-1)
    _check(report["blocks.0.moe"], _expected(model.blocks[0].moe, inputs[0], valid))
    _check(report["blocks.1.moe"], _expected(model.blocks[1].moe, inputs[1], valid))
    assert sum(report["blocks.0.moe"]["tokens_per_expert"]) == int(valid.sum()) * K


def test_balanced_load_metrics():
    # a scaled-identity router over one-hot-ish inputs gives every expert the same load: MaxVio 0, entropy 1
    layer = MoELayer(E, F, E, K, losses=[])
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(E) * 3)
    x = torch.zeros(8, E)
    for t in range(8):
        x[t, t % E] = 2.0
        x[t, (t + 1) % E] = 1.0
    layer(x)
    stats = routing_report(layer)["<root>"]
    assert stats["tokens_per_expert"] == [4, 4, 4, 4]
    assert stats["max_vio"] == 0.0 and stats["dead_experts"] == 0
    torch.testing.assert_close(torch.tensor(stats["load_entropy"], dtype=torch.float64),
                               torch.tensor(1.0, dtype=torch.float64),
                               rtol=0, atol=1e-12)


def test_format_routing_report_table():
    model = Net()
    model(torch.rand(3, 8, D) + 0.5)
    report = routing_report(model)
    table = format_routing_report(report)
    lines = table.splitlines()
    assert len(lines) == 1 + len(report)
    for col in ("layer", "max_vio", "load_entropy", "drop_rate", "dead_experts", "tokens_per_expert"):
        assert col in lines[0]
    for line, (name, stats) in zip(lines[1:], report.items()):
        assert line.startswith(name)
        assert f"{stats['max_vio']:.3f}" in line
        assert f"{stats['drop_rate']:.4f}" in line
        assert line.endswith(" ".join(str(v) for v in stats["tokens_per_expert"]))
    assert format_routing_report({}).splitlines()[0].startswith("layer")


def test_report_skips_layers_without_stats():
    model = Net()
    assert routing_report(model) == {}
    model.blocks[1].moe.track_stats = False
    model(torch.rand(2, 3, D) + 0.5)
    assert list(routing_report(model)) == ["blocks.0.moe"]


@pytest.mark.parametrize("policy", ["weight", "position"])
def test_capacity_drop_stats_per_policy(policy):
    # every expert keeps min(count, cap) pairs whatever the policy; which pairs survive differs
    torch.manual_seed(4)
    layer = MoELayer(D, F, E, K, capacity_factor=0.75, drop_policy=policy, losses=[])
    with torch.no_grad():
        layer.router.weight.normal_(0, 0.5)
        layer.router.weight[0] += 0.4  # x > 0: expert 0 is over-subscribed
    x = torch.rand(40, D)
    layer(x)
    stats = routing_report(layer)["<root>"]
    with torch.no_grad():
        d = layer.router(x)
    counts = torch.bincount(d.expert_N, minlength=E)
    cap = math.ceil(0.75 * 40 * K / E)
    dropped = int((counts - counts.clamp(max=cap)).sum())
    assert dropped > 0
    assert stats["tokens_per_expert"] == counts.clamp(max=cap).tolist()
    assert stats["dropped"] == dropped
    torch.testing.assert_close(torch.tensor(stats["drop_rate"], dtype=torch.float64),
                               torch.tensor(dropped / (40 * K), dtype=torch.float64), rtol=1e-12, atol=0)
    # the output equals a loop over the kept pairs only (dropped pairs contribute nothing)
    w = d.weights_TK.detach()
    kept = [[] for _ in range(E)]
    pairs = [(t, j) for t in range(40) for j in range(K)]
    for e in range(E):
        mine = [(t, j) for t, j in pairs if d.experts_TK[t, j] == e]
        if policy == "weight":
            mine = sorted(mine, key=lambda p: -w[p].item())  # stable: ties keep token order
        kept[e] = mine[:cap]
    ex = layer.experts
    expected = torch.zeros(40, D)
    for e in range(E):
        for t, j in kept[e]:
            h = (torch.nn.functional.silu(x[t] @ ex.w_gate[e]) * (x[t] @ ex.w_up[e])) @ ex.w_down[e]
            expected[t] += w[t, j] * h.detach()
    torch.testing.assert_close(layer(x).detach(), expected, rtol=1e-5, atol=1e-6)


def test_chunk_ids_restart_per_sequence_within_the_static_bound():
    from moe_routing.metrics import chunk_ids

    seq = torch.tensor([0] * 5 + [1] + [2] * 7)
    ids, bound = chunk_ids(13, 3, seq, 3)
    # sequence 0: positions 0-2 -> 0, 3-4 -> 1; sequence 1: 2; sequence 2: 3, 3, 3, 4, 4, 4, 5
    assert ids.tolist() == [0, 0, 0, 1, 1, 2, 3, 3, 3, 4, 4, 4, 5]
    assert bound >= 6 and bound == 13 // 3 + 3
    ids, bound = chunk_ids(7, 3)
    assert ids.tolist() == [0, 0, 0, 1, 1, 1, 2] and bound == 3
    assert chunk_ids(4, 3, torch.tensor([0, 0, 2, 2]), 3)[0].tolist() == [0, 0, 1, 1]  # an empty sequence


def test_sparsity_stats_run_without_host_syncs():
    from moe_routing.losses.blockffn import activation_locality_loss, chunk_sparsification_loss
    from moe_routing.metrics import sparsity_stats

    from helpers import OpLog

    g = torch.Generator().manual_seed(0)
    seq, valid = torch.tensor([0] * 6 + [1] * 4), torch.rand(10, generator=g) > 0.2
    logits = torch.randn(10, 4, generator=g).requires_grad_()
    token_N, expert_N = (logits.detach() > 0).nonzero(as_tuple=True)
    with OpLog() as log:
        stats = sparsity_stats(token_N, expert_N, 10, 4, 3, seq, 2, valid)
        chunk_sparsification_loss(logits, 3, seq, 2, valid).backward()
        activation_locality_loss(logits, seq, valid).backward()
    assert log.syncing() == []
    assert 0 <= stats["tls"].item() <= 1 and 0 <= stats["cls"].item() <= 1
