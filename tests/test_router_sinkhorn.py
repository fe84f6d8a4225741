"""moe_routing/routers/sinkhorn.py: the Sinkhorn plan against Megatron-Core's iteration (in Python floats, and a
transcription of its code for stop_rule='megatron'), balanced choices in training and plain top-k in eval, one
token, forced experts, a tolerance below what the dtype resolves, and argument checks."""
from __future__ import annotations

import pytest
import torch

from moe_routing import RoutingContext
from moe_routing.routers.sinkhorn import SinkhornRouter, sinkhorn

from reference import naive_sinkhorn, top

D, E = 7, 6


@pytest.mark.parametrize("padded", [False, True])
def test_sinkhorn_plan_matches_megatron_iteration_and_is_balanced(padded):
    torch.manual_seed(7)
    T, n_e = 13, 5
    logits = torch.randn(T, n_e, dtype=torch.float64) * 2
    valid = (torch.arange(T) % 4 != 1) if padded else None
    log_plan, iters, err = sinkhorn(logits, valid, tol=1e-13, max_iters=10000)
    plan = log_plan.exp()
    ref = torch.tensor(naive_sinkhorn(logits.tolist(), None if valid is None else valid.tolist()), dtype=torch.float64)
    rows = torch.arange(T) if valid is None else valid.nonzero().squeeze(1)
    torch.testing.assert_close(plan[rows], ref[rows], rtol=1e-9, atol=0)
    assert err <= 1e-13 and 1 < iters < 10000
    torch.testing.assert_close(plan[rows].sum(0), torch.full((n_e,), 1 / n_e, dtype=torch.float64), rtol=1e-12, atol=0)
    torch.testing.assert_close(plan[rows].sum(1), torch.full((len(rows),), 1 / len(rows), dtype=torch.float64),
                               rtol=1e-12, atol=0)
    # default tolerance in float32; an offset of 200 (exp overflows float32) changes nothing in log space
    log_plan, iters, err = sinkhorn(logits.float() + 200, valid)
    plan = log_plan.double().exp()[rows]
    assert err <= 1e-4 and iters < 100 and (plan.sum(1) * len(rows) - 1).abs().max() <= 1.1e-4
    assert (plan.sum(0) * n_e - 1).abs().max() <= 1e-5
    torch.testing.assert_close(plan, ref[rows], rtol=1e-3, atol=0)
    # the iteration cap: unconverged rows, but the columns are exact on exit
    log_plan, iters, err = sinkhorn(logits * 10, valid, tol=1e-12, max_iters=2)
    assert iters == 2 and err > 1e-3
    torch.testing.assert_close(log_plan.exp()[rows].sum(0), torch.full((n_e,), 1 / n_e, dtype=torch.float64))


@pytest.mark.parametrize("k", [1, 2])
def test_sinkhorn_router_train_balances_eval_is_plain_topk(k):
    torch.manual_seed(8)
    T, n_e = 40, 4
    r = SinkhornRouter(D, n_e, k).double()
    with torch.no_grad():
        r.weight.normal_(0, 0.3)
        r.weight[0] += 3.0  # every token prefers expert 0
    x = torch.randn(T, D, dtype=torch.float64) + 1.5
    logits = x @ r.weight.detach().t()
    act = logits.sigmoid() if k == 1 else logits.softmax(-1)
    assert r.scores_normalized == (k != 1)

    r.eval()
    d = r(x)
    assert torch.equal(d.experts_TK, act.topk(k, -1).indices)
    assert (d.experts_TK == 0).sum() == T  # collapsed onto expert 0
    r.train()
    d = r(x)
    plan = naive_sinkhorn(logits.tolist())
    assert d.experts_TK.tolist() == [top(row, k) for row in plan]
    torch.testing.assert_close(d.weights_TK, act.gather(1, d.experts_TK), rtol=1e-12, atol=0)
    counts = torch.bincount(d.expert_N, minlength=n_e)
    assert counts.max() <= 2 * T * k / n_e and counts.min() >= T * k / n_e / 2, counts
    assert int(d.extra["sinkhorn_iters"]) >= 1 and float(d.extra["sinkhorn_error"]) <= 1e-4


def test_sinkhorn_single_token_and_forced_experts():
    r = SinkhornRouter(D, E, 2)
    x = torch.randn(1, D)
    d = r(x)
    act = (x @ r.weight.detach().t()).softmax(-1)
    assert len(set(d.experts_TK[0].tolist())) == 2
    torch.testing.assert_close(d.weights_TK, act.gather(1, d.experts_TK).detach())
    forced = torch.tensor([[5, 1]])
    d = r(x, RoutingContext(forced_experts={"L": forced}), "L")
    assert torch.equal(d.experts_TK, forced) and "sinkhorn_iters" not in d.extra
    torch.testing.assert_close(d.weights_TK.detach(), act[:, [5, 1]])


def test_sinkhorn_tolerance_below_the_dtype_floor_warns_and_stops():
    from moe_routing.routers.sinkhorn import sinkhorn

    L = torch.randn(300, 8, generator=torch.Generator().manual_seed(0)) * 3
    with pytest.warns(UserWarning, match="below what torch.float32 resolves"):
        _, iters, err = sinkhorn(L, None, tol=1e-12, max_iters=100_000)
    assert iters < 1000 and err < 1e-4


def megatron_sinkhorn(cost, tol=1e-4):
    """Transcribed from megatron-core 0.16 `transformer/moe/moe_utils.py::sinkhorn` (returns the iteration count
    too): d0/d1 scalings of exp(cost), stop when mean |d1 - d1_old| <= tol. Kept for the iteration count, which
    Megatron's function does not return; its plan is checked against the function itself below."""
    cost = torch.exp(cost)
    d0 = torch.ones(cost.size(0), dtype=cost.dtype)
    d1 = torch.ones(cost.size(1), dtype=cost.dtype)
    eps, error, d1_old, iters = 1e-8, 1e9, d1, 0
    while error > tol:
        d0 = (1 / d0.size(0)) * 1 / (torch.sum(d1 * cost, 1) + eps)
        d1 = (1 / d1.size(0)) * 1 / (torch.sum(d0.unsqueeze(1) * cost, 0) + eps)
        error = torch.mean(torch.abs(d1_old - d1))
        d1_old = d1
        iters += 1
    return d1 * cost * d0.unsqueeze(1), iters


def test_sinkhorn_megatron_stop_rule_matches_megatron():
    from moe_routing.routers.sinkhorn import sinkhorn

    L = torch.randn(64, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    want, want_iters = megatron_sinkhorn(L, tol=1e-6)
    log_plan, iters, err = sinkhorn(L, None, tol=1e-6, max_iters=10_000, stop_rule="megatron")
    assert iters == want_iters and err <= 1e-6
    # Megatron's plan ends on its column update too; eps=1e-8 in its denominators is the only difference
    torch.testing.assert_close(log_plan.exp(), want, rtol=1e-6, atol=1e-12)
    with pytest.raises(ValueError, match="stop_rule must be one of"):
        SinkhornRouter(D, E, 1, stop_rule="cols")


@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_sinkhorn_megatron_stop_rule_matches_megatron_itself(scale):
    """megatron-core's own ``sinkhorn`` (imported) gives the same plan as ours with stop_rule='megatron'."""
    mc_utils = pytest.importorskip("megatron.core.transformer.moe.moe_utils",
                                   reason="megatron-core not installed (extra 'megatron')")
    from moe_routing.routers.sinkhorn import sinkhorn

    L = scale * torch.randn(48, 6, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    want = mc_utils.sinkhorn(L.clone(), tol=1e-6)
    log_plan, _, _ = sinkhorn(L, None, tol=1e-6, max_iters=10_000, stop_rule="megatron")
    torch.testing.assert_close(log_plan.exp(), want, rtol=1e-5, atol=1e-12)  # Megatron's eps=1e-8 aside
    assert torch.equal(log_plan.topk(1, -1).indices, want.topk(1, -1).indices)


BAD = [
    (lambda: SinkhornRouter(0, E), ValueError, "hidden_size"),
    (lambda: SinkhornRouter(D, E, 0), ValueError, "top_k"),
    (lambda: SinkhornRouter(D, E, E + 1), ValueError, "top_k"),
    (lambda: SinkhornRouter(D, E, 1, tol=0.0), ValueError, "tol"),
    (lambda: SinkhornRouter(D, E, 1, tol="small"), TypeError, "tol"),
    (lambda: SinkhornRouter(D, E, 1, max_iters=0), ValueError, "max_iters"),
    (lambda: SinkhornRouter(D, E, 1, init_std=-1.0), ValueError, "init_std"),
]


@pytest.mark.parametrize("make,exc,match", BAD)
def test_bad_arguments(make, exc, match):
    with pytest.raises(exc, match=match):
        make()
