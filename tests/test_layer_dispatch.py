"""moe_routing/layer.py around the dispatch, each checked against an independent computation: a router that
implements `route` itself, the routing context moved to x's device (router, losses and statistics read the moved
one), seq_lens validated once per forward, no host sync in the dropless dispatch and only the one that compacts
the kept pairs under capacity, a layer with no routed pairs, and losses under no_grad."""
from __future__ import annotations

import copy
import math

import pytest
import torch

import moe_routing as mr
from moe_routing import MoELayer, RoutingContext
from moe_routing.decision import RoutingDecision
from moe_routing.losses import Loss, ReLUL1Loss, SequenceAuxLoss, SwitchAuxLoss, relu_l1_loss, switch_aux_loss
from moe_routing.routers import ReLURouter, Router

from conftest import needs_grouped_mm
from helpers import D, E, F, K, OpLog, gen, moe


def naive_counts(d, valid) -> list[int]:
    """Pairs per expert over tokens with ``valid[t]``, one pair at a time."""
    return [sum(int(e) == i for t in range(len(valid)) if valid[t] for e in d.experts_TK[t]) for i in range(E)]


def naive_switch_aux(d, valid) -> float:
    counts, n = naive_counts(d, valid), sum(bool(v) for v in valid)
    p = d.scores_TE.double()
    return E * sum(counts[i] / (n * K) * sum(float(p[t, i]) for t in range(len(valid)) if valid[t]) / n
                   for i in range(E))


# ---- a router that implements route itself; one whose top_k matches the layer's ------------------------------------
class _DirectRouter(Router):
    """A router implementing `route` itself (no GatedRouter hooks): top-1 of the logits."""

    def __init__(self):
        super().__init__(D, E, 1)
        self.weight = torch.nn.Parameter(torch.randn(E, D) * 0.3)

    def route(self, x_TD, ctx, layer_key, backend="torch"):
        logits = x_TD @ self.weight.t()
        scores = logits.softmax(-1)
        idx = scores.argmax(-1, keepdim=True)
        return RoutingDecision.from_topk(idx, scores.gather(1, idx), logits, scores)


def test_direct_router_and_matching_router_run_forward_backward():
    for router, k in ((_DirectRouter(), 1), (ReLURouter(D, E, top_k=2), 2)):
        layer = MoELayer(D, F, E, k, router=router).to(torch.bfloat16)
        assert layer.router.weight.dtype == torch.float32
        x = torch.randn(5, D, dtype=torch.bfloat16, requires_grad=True)
        layer(x).float().sum().backward()
        assert x.grad is not None and layer.router.weight.grad is not None


# ---- the routing context moved to x's device -----------------------------------------------------------------------
class _MovingContext(RoutingContext):
    """Stands in for a CPU context used with a model on another device: ``to`` returns a distinct context
    whose mask also pads token 0, so the test sees which context routers, losses and stats read."""

    def to(self, device):
        self.moved_to = torch.device(device)
        out = copy.copy(self)
        mask = self.padding_mask.clone()
        mask[0] = True
        out.padding_mask = mask
        return out


def test_layer_hands_the_moved_context_to_router_losses_and_stats():
    layer = moe(losses=[SwitchAuxLoss(1.0)])
    seen = []
    layer.router.register_forward_pre_hook(lambda m, args: seen.append(args[1] if len(args) > 1 else None))
    pad = torch.zeros(9, dtype=torch.bool)
    pad[7:] = True
    ctx = _MovingContext(padding_mask=pad)
    x = torch.randn(9, D, generator=gen(1))
    layer(x, ctx)
    assert ctx.moved_to == x.device and seen[0] is not ctx and bool(seen[0].padding_mask[0])
    with torch.no_grad():
        d = layer.router(x)
    valid = torch.ones(9, dtype=torch.bool)
    valid[[0, 7, 8]] = False  # the moved mask
    assert layer.last_stats["tokens_per_expert"].tolist() == naive_counts(d, valid)
    assert abs(float(layer.last_aux_losses["switch_aux"]) - naive_switch_aux(d, valid)) < 1e-6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_context_with_cuda_layer_matches_cpu_run():
    layer = moe(losses=[SwitchAuxLoss(), SequenceAuxLoss()], capacity_factor=1.0)
    pad = torch.zeros(10, dtype=torch.bool)
    pad[8:] = True
    x = torch.randn(10, D, generator=gen(2))
    ctx = RoutingContext(padding_mask=pad, token_ids=torch.arange(10), seq_lens=[4, 6])
    y_cpu = layer(x, ctx)
    gpu = copy.deepcopy(layer).cuda()
    y_gpu = gpu(x.cuda(), ctx)
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=1e-4, atol=1e-5)
    assert gpu.last_stats["tokens_per_expert"].cpu().tolist() == layer.last_stats["tokens_per_expert"].tolist()


# ---- seq_lens validated once ---------------------------------------------------------------------------------------
def test_seq_lens_validated_once_per_forward(monkeypatch):
    layer = moe(losses=[SequenceAuxLoss(1.0)])
    calls = []
    original = MoELayer._sequences
    monkeypatch.setattr(MoELayer, "_sequences", lambda self, *a: calls.append(1) or original(self, *a))
    x = torch.randn(7, D, generator=gen(3))
    layer(x, RoutingContext(seq_lens=[3, 4]))
    assert len(calls) == 1
    # and the sequence loss used those sequences: the mean of per-sequence switch aux on normalised scores
    with torch.no_grad():
        d = layer.router(x)
    total = 0.0
    for lo, hi in ((0, 3), (3, 7)):
        n = hi - lo
        for i in range(E):
            f = sum(int(e) == i for t in range(lo, hi) for e in d.experts_TK[t]) / (n * K)
            total += E * f * sum(float(d.scores_TE[t, i] / d.scores_TE[t].sum()) for t in range(lo, hi)) / n
    assert abs(float(layer.last_aux_losses["seq_aux"]) - total / 2) < 1e-6


# ---- host syncs in the dispatch ------------------------------------------------------------------------------------
def test_losses_and_dropless_dispatch_have_no_sync_with_padding():
    layer = moe(losses=[])
    relu = MoELayer(D, F, E, K, router="relu").double()
    x_TD = torch.randn(12, D, generator=gen(5))
    valid = torch.ones(12, dtype=torch.bool)
    valid[[4, 5, 11]] = False
    with torch.no_grad():
        d, dr = layer.router(x_TD), relu.router(x_TD.double())
        with OpLog() as log:
            aux = switch_aux_loss(d, K, valid)
            l1 = relu_l1_loss(dr, K, valid)
            y, load, routed, dropped = layer._dispatch(x_TD, d, valid, "torch")
            mr.metrics.layer_stats(d, load, routed, dropped, valid)
    assert log.syncing() == []
    assert load.tolist() == naive_counts(d, valid) and int(routed) == 9 * K
    assert abs(float(aux) - naive_switch_aux(d, valid)) < 1e-6
    R = dr.scores_TE.double()
    act = [sum(1 for t in range(12) if valid[t] and R[t, i] > 0) for i in range(E)]
    assert 0 < sum(act) < 9 * E  # some, not all, experts active
    ref_l1 = sum(E / (K * 9) * act[i] * float(R[t, i]) for t in range(12) if valid[t] for i in range(E)) / 9
    assert abs(float(l1) - ref_l1) < 1e-9
    assert float(relu_l1_loss(dr, K, torch.zeros(12, dtype=torch.bool))) == 0.0


def test_capacity_dispatch_syncs_only_to_compact_kept_pairs():
    layer = moe(capacity_factor=0.5, losses=[])
    x_TD = torch.randn(12, D, generator=gen(6))
    valid = torch.ones(12, dtype=torch.bool)
    valid[[0, 9]] = False
    with torch.no_grad():
        d = layer.router(x_TD)
        with OpLog() as log:
            _, load, routed, dropped = layer._dispatch(x_TD, d, valid, "torch")
    assert log.syncing() == ["aten.nonzero.default"]
    cap = math.ceil(0.5 * 10 * K / E)
    counts = naive_counts(d, valid)
    assert load.tolist() == [min(c, cap) for c in counts] and int(dropped) == sum(counts) - int(load.sum())


# ---- no routed pairs -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", [pytest.param("grouped_mm", marks=needs_grouped_mm), "loop"])
def test_layer_with_no_routed_pairs_backward(impl):
    # all padding under capacity mode, and a ReLU router that selects nothing: N = 0 after routing
    layer = moe(capacity_factor=1.0, expert_impl=impl, losses=[])
    x = torch.randn(4, D, generator=gen(18), requires_grad=True)
    y = layer(x, RoutingContext(padding_mask=torch.ones(4, dtype=torch.bool)))
    y.sum().backward()
    assert torch.count_nonzero(y) == 0 and int(layer.last_stats["tokens_per_expert"].sum()) == 0
    for p in (layer.experts.w_gate, layer.experts.w_up, layer.experts.w_down):
        assert p.grad is not None and torch.count_nonzero(p.grad) == 0
    relu = MoELayer(D, F, E, K, router="relu", expert_impl=impl)
    with torch.no_grad():
        relu.router.weight.fill_(-1.0)
    xr = torch.rand(3, D, generator=gen(19)).requires_grad_(True)  # positive input: every logit < 0
    relu(xr).sum().backward()
    assert torch.count_nonzero(xr.grad) == 0 and torch.count_nonzero(relu.experts.w_up.grad) == 0


# ---- losses under no_grad ------------------------------------------------------------------------------------------
class _CountingLoss(Loss):
    name = "counted"

    def __init__(self):
        super().__init__(1.0)
        self.calls = 0

    def compute(self, inputs):
        self.calls += 1
        return switch_aux_loss(inputs.decision, inputs.top_k, inputs.valid_T)


def test_losses_in_no_grad_follow_track_stats_and_return_aux_loss():
    x = torch.randn(8, D, generator=gen(20))
    loss = _CountingLoss()
    layer = moe(losses=[loss])
    layer(x)
    train_value = layer.last_aux_losses["counted"].clone()
    with torch.no_grad():
        layer(x)  # track_stats (default): computed for logging
    assert loss.calls == 2 and torch.equal(layer.last_aux_losses["counted"], train_value)
    layer.track_stats = False
    with torch.no_grad():
        layer(x)  # inference with stats off: skipped
    assert loss.calls == 2 and layer.last_aux_losses == {}
    layer.return_aux_loss = True
    with torch.no_grad():
        _, aux = layer(x)  # the caller asked for the value: computed
    assert loss.calls == 3 and torch.equal(aux, train_value)
    relu = MoELayer(D, F, E, K, router="relu", track_stats=False, return_aux_loss=True).eval()
    with torch.no_grad():
        _, aux_relu = relu(x)
    assert isinstance(aux_relu, torch.Tensor) and "relu_l1" in relu.last_aux_losses
    assert isinstance(relu.losses[0], ReLUL1Loss)
