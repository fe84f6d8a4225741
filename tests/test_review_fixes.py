"""Code-review fixes in the layer and dispatch ops, each checked against an independent computation:
router/layer top_k agreement, context tensors moved to x's device, seq_lens validated once, sync-free counts
(no bincount / boolean index / host scalar read in the hot path), kernel-backend hints, combine backward
skipping unneeded gradients, grouped_mm with zero rows, routing_context restoring layer_idx, losses in eval."""
from __future__ import annotations

import copy
import math
from fractions import Fraction

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import moe_routing as mr
from moe_routing import MoELayer, RoutingContext
from moe_routing.decision import RoutingDecision
from moe_routing.losses import Loss, ReLUL1Loss, SequenceAuxLoss, SwitchAuxLoss, relu_l1_loss, switch_aux_loss
from moe_routing.ops import capacity_keep_mask, combine, expert_capacity, grouped_mm, invert_permutation, permute
from moe_routing.ops.counts import csr_offsets, expert_counts, sort_by_expert
from moe_routing.routers import ReLURouter, Router

from conftest import needs_grouped_mm

D, F, E, K = 16, 32, 4, 2  # fp32 rows of 64/128 bytes: the grouped_mm path applies


def gen(seed):
    return torch.Generator().manual_seed(seed)


class OpLog(TorchDispatchMode):
    """Top-level aten/custom ops a block runs (what would sync or break a graph shows up here)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append((str(func), args))
        return func(*args, **(kwargs or {}))

    def syncing(self) -> list[str]:
        """bincount (sizes from data), nonzero/masked_select, boolean indexing, host scalar reads."""
        bad = []
        for name, args in self.ops:
            if any(s in name for s in ("bincount", "nonzero", "masked_select", "_local_scalar_dense")):
                bad.append(name)
            if name.startswith("aten.index.Tensor") and any(
                    isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]):
                bad.append(name + "[bool]")
        return bad


def naive_counts(d, valid) -> list[int]:
    """Pairs per expert over tokens with ``valid[t]``, one pair at a time."""
    return [sum(int(e) == i for t in range(len(valid)) if valid[t] for e in d.experts_TK[t]) for i in range(E)]


def naive_switch_aux(d, valid) -> float:
    counts, n = naive_counts(d, valid), sum(bool(v) for v in valid)
    p = d.scores_TE.double()
    return E * sum(counts[i] / (n * K) * sum(float(p[t, i]) for t in range(len(valid)) if valid[t]) / n
                   for i in range(E))


def moe(**kw) -> MoELayer:
    torch.manual_seed(kw.pop("seed", 0))
    layer = MoELayer(D, F, E, kw.pop("top_k", K), **kw)
    with torch.no_grad():
        layer.router.weight.normal_(0, 0.5)
    return layer


# ---------------------------------------------------------------------------------------------- 1. top_k
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


# ---------------------------------------------------------------------------------------- 2. devices
def test_context_to_moves_tensors_and_shares_state():
    ctx = RoutingContext(token_ids=torch.arange(6), padding_mask=torch.zeros(6, dtype=torch.bool),
                         seq_lens=[2, 4], forced_experts={0: torch.zeros(6, 2, dtype=torch.long)})
    assert ctx.to("cpu") is ctx  # nothing to move: no copy
    moved = ctx.to("meta")
    assert moved is not ctx
    for name in ("token_ids", "padding_mask", "seq_lens"):
        assert getattr(moved, name).device.type == "meta" and getattr(ctx, name).device.type == "cpu"
    assert moved.layer_state is ctx.layer_state and moved.forced_experts is ctx.forced_experts
    assert ctx.padding_T(6, device=torch.device("meta")).device.type == "meta"
    assert ctx.token_ids_T(6, device="meta").shape == (6,)
    assert ctx.padding_T(6).device.type == "cpu"
    with pytest.raises(ValueError, match="padding_mask has 6 elements"):
        ctx.padding_T(5, device="meta")


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


# ------------------------------------------------------------------------------------- 3. seq_lens once
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


# ------------------------------------------------------------------------ 4/5. counts without host syncs
@pytest.mark.parametrize("cf", [1.0, 1.1, 0.3, 1.25, 2.0, 0.001, 3.7])
def test_tensor_capacity_is_exact_and_matches_int(cf):
    for n in (0, 1, 7, 10, 100, 999):
        got = expert_capacity(cf, torch.tensor(n), 3, 7, max_tokens=1000)
        assert isinstance(got, torch.Tensor) and got.dtype == torch.int64
        exact = min(math.ceil(Fraction(str(cf)) * n * 3 / 7), n)  # an expert takes at most one pair per token
        assert int(got) == exact == expert_capacity(cf, n, 3, 7)
    # no bound, or one that could overflow int64: the count is read on the host and an int comes back
    assert expert_capacity(cf, torch.tensor(10), 3, 7) == expert_capacity(cf, 10, 3, 7)
    assert isinstance(expert_capacity(1.2345678901234567, torch.tensor(10), 3, 7, max_tokens=2 ** 40), int)
    with pytest.raises(ValueError, match="num_tokens"):
        expert_capacity(cf, torch.tensor([3, 4]), 3, 7, max_tokens=10)


def _naive_keep(experts, weights, valid, cap, policy):
    keep = [False] * len(experts)
    for e in range(E):
        mine = [i for i in range(len(experts)) if experts[i] == e and valid[i]]
        if policy == "weight":
            mine.sort(key=lambda i: (-weights[i], i))
        for i in mine[:cap]:
            keep[i] = True
    return keep


@pytest.mark.parametrize("policy", ["weight", "position"])
def test_capacity_mask_with_padding_and_tensor_capacity_has_no_sync(policy):
    g = gen(4)
    expert_N = torch.randint(0, E, (31,), generator=g)
    weight_N = torch.rand(31, generator=g).round(decimals=1)  # ties
    valid_N = torch.rand(31, generator=g) > 0.3
    with OpLog() as log:
        cap = expert_capacity(0.8, valid_N.sum(), 1, E, max_tokens=31)
        keep = capacity_keep_mask(expert_N, weight_N, E, cap, policy, valid_N)
    assert log.syncing() == []
    ref = _naive_keep(expert_N.tolist(), weight_N.tolist(), valid_N.tolist(), int(cap), policy)
    assert keep.tolist() == ref and int(cap) == math.ceil(0.8 * int(valid_N.sum()) / E)


def test_counts_and_offsets_without_bincount():
    expert_N = torch.tensor([3, 0, 3, 3, 1])
    with OpLog() as log:
        counts = expert_counts(expert_N, 5)
        weighted = expert_counts(expert_N, 5, torch.tensor([1, 0, 1, 1, 0]))
        pair_of_row, counts2, offsets = sort_by_expert(expert_N, 5, "torch")
        csr = csr_offsets(torch.tensor([0, 0, 2, 2, 2, 4]), 6)
    assert log.syncing() == []
    assert counts.tolist() == counts2.tolist() == [1, 1, 0, 3, 0] and counts.dtype == torch.int64
    assert weighted.tolist() == [0, 0, 0, 3, 0] and offsets.tolist() == [0, 1, 2, 2, 5, 5]
    assert csr.tolist() == [0, 2, 2, 5, 5, 6, 6] and csr_offsets(csr, 3, top_k=2).tolist() == [0, 2, 4, 6]


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


# ----------------------------------------------------------------------------- 6. kernel backend hints
def test_triton_backward_gets_top_k_and_max_pairs(monkeypatch):
    pytest.importorskip("triton")
    from moe_routing._kernels import combine as kernel

    calls = []
    real = kernel.combine
    monkeypatch.setattr(kernel, "combine", lambda *a, **kw: calls.append((a[3].clone(), kw.get("max_pairs")))
                        or real(*a, **kw))
    T, k = 5, 3
    src_token = torch.arange(T).repeat_interleave(k)[torch.randperm(T * k, generator=gen(7))]
    x = torch.randn(T, 6, generator=gen(8), dtype=torch.float64, requires_grad=True)
    g = torch.randn(T * k, 6, generator=gen(9), dtype=torch.float64)
    (permute(x, src_token, "triton", top_k=k) * g).sum().backward()
    offsets, max_pairs = calls[-1]
    assert max_pairs == k and offsets.tolist() == [t * k for t in range(T + 1)]
    ref = torch.zeros(T, 6, dtype=torch.float64)
    for n in range(T * k):
        ref[int(src_token[n])] += g[n]
    torch.testing.assert_close(x.grad, ref, rtol=1e-12, atol=1e-12)
    # variable k with a bound: offsets from the sorted rows, the bound passed through
    calls.clear()
    rows_v = torch.tensor([4, 0, 4, 2, 4])
    xv = x.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: permute(v, rows_v, "triton", max_pairs=3), (xv,))
    assert all(mp == 3 for _, mp in calls) and calls[-1][0].tolist() == [0, 1, 1, 2, 2, 5]
    # the layer passes k (dropless) and the bound k (capacity mode) to every kernel combine
    for cf in (None, 0.5):
        calls.clear()
        layer = moe(capacity_factor=cf, backend="triton", losses=[])
        layer(torch.randn(6, D, generator=gen(10), requires_grad=True)).sum().backward()
        assert len(calls) == 2 and all(mp == K for _, mp in calls)


# --------------------------------------------------------------------------- 7. combine needs_input_grad
def _routing(T=6, k=2, seed=11):
    g = gen(seed)
    token_N = torch.arange(T).repeat_interleave(k)
    expert_N = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).reshape(-1)
    return token_N, invert_permutation(sort_by_expert(expert_N, E)[0])


@pytest.mark.parametrize("fixed_k", [True, False])
def test_combine_backward_skips_weight_grad_when_not_needed(fixed_k):
    token_N, row_of_pair_N = _routing()
    h = torch.randn(12, 5, generator=gen(12), dtype=torch.float64, requires_grad=True)
    w = torch.rand(12, generator=gen(13), dtype=torch.float64)
    top_k = 2 if fixed_k else None
    y = combine(h, w, row_of_pair_N, token_N, 6, top_k, "torch")
    dy = torch.randn(6, 5, generator=gen(14), dtype=torch.float64)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        (d_h,) = torch.autograd.grad(y, h, dy)
    assert not any(e.name == "aten::bmm" for e in prof.events())  # d_weight (a batched dot) not computed
    ref = torch.zeros(12, 5, dtype=torch.float64)
    for p in range(12):
        ref[int(row_of_pair_N[p])] = float(w[p]) * dy[int(token_N[p])]
    torch.testing.assert_close(d_h, ref, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda hh: combine(hh, w, row_of_pair_N, token_N, 6, top_k, "torch"), (h,))
    # only the weights need grad: h gets none, d_w still right
    wg = w.clone().requires_grad_(True)
    (d_w,) = torch.autograd.grad(combine(h.detach(), wg, row_of_pair_N, token_N, 6, top_k, "torch"), wg, dy)
    ref_w = [float(dy[int(token_N[p])] @ h.detach()[int(row_of_pair_N[p])]) for p in range(12)]
    torch.testing.assert_close(d_w, torch.tensor(ref_w, dtype=torch.float64), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------- 8. grouped_mm, N = 0
@pytest.mark.parametrize("impl", [pytest.param("grouped_mm", marks=needs_grouped_mm), "loop"])
@pytest.mark.parametrize("counts", [[0, 0, 0], [3, 0, 2], [0, 5, 0]])
def test_grouped_mm_zero_rows_forward_backward(impl, counts):
    counts_E = torch.tensor(counts)
    offsets_E1 = torch.nn.functional.pad(torch.cumsum(counts_E, 0), (1, 0))
    N = sum(counts)
    x = torch.randn(N, 8, generator=gen(15), requires_grad=True)
    w = torch.randn(3, 8, 4, generator=gen(16), requires_grad=True)
    out = grouped_mm(x, w, counts_E, offsets_E1, impl)
    out.sum().backward()  # an expanded (stride-0) incoming gradient, as sum() gives
    assert out.shape == (N, 4) and x.grad.shape == (N, 8) and w.grad is not None and w.grad.shape == w.shape
    ref_out, ref_gw, start = torch.zeros(N, 4), torch.zeros(3, 8, 4), 0
    for e, n in enumerate(counts):
        for r in range(start, start + n):
            ref_out[r] = x[r].detach() @ w[e].detach()
            ref_gw[e] += torch.outer(x[r].detach(), torch.ones(4))
        start += n
    torch.testing.assert_close(out.detach(), ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad, ref_gw, rtol=1e-5, atol=1e-5)


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


# --------------------------------------------------------------------------- 9. routing_context restores
def test_routing_context_restores_layer_idx_and_outer_context():
    model = torch.nn.Sequential(moe(), moe(layer_idx=7), moe())
    outer = RoutingContext()
    with mr.routing_context(model, outer):
        assert [m.layer_idx for m in model] == [0, 7, 2]
        with mr.routing_context(model, padding_mask=torch.zeros(3, dtype=torch.bool)) as inner:
            assert all(m._ctx is inner for m in model)
        assert all(m._ctx is outer for m in model) and [m.layer_idx for m in model] == [0, 7, 2]
    assert [m.layer_idx for m in model] == [None, 7, None] and all(m._ctx is None for m in model)
    with pytest.raises(RuntimeError), mr.routing_context(model):
        raise RuntimeError("inside")
    assert [m.layer_idx for m in model] == [None, 7, None]


# ------------------------------------------------------------------------------ 10. losses in eval
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
