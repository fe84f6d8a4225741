"""moe_routing/dispatch/all_to_all.py: expert parallelism on 2 and 4 gloo processes (CPU), each checked against a
single-process layer holding all experts with the same weights, run on every rank's tokens.

Capacity is per rank's batch (as in GShard and Megatron-Core), so the reference runs each rank's micro-batch through
the full layer separately and sums the losses: outputs, input gradients and every expert's gradient must then
match, and the replicated router's gradients summed over ranks must match the reference's."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from moe_routing import GlobalBatchAuxLoss, MoELayer, RoutingContext, step
from moe_routing.dispatch import AllToAllDispatcher, reshard_expert_state_dicts
from moe_routing.losses import switch_aux_loss

from helpers import run_gloo_workers

D, F, K = 8, 12, 2
JOIN_TIMEOUT_S = 600  # generous: a slow shared CI machine; a real failure raises long before (gloo timeout 60 s)


def _layers(E, seed=0, **kw):
    """The single-process reference (all E experts) and this rank's expert-parallel layer with the same weights."""
    torch.manual_seed(seed)
    ref = MoELayer(D, F, E, K, **kw)
    with torch.no_grad():
        ref.router.weight.normal_(0, 0.5)
    ep = MoELayer(D, F, E, K, dispatcher=AllToAllDispatcher(), **kw)
    ep.load_state_dict(ref.state_dict())  # the full checkpoint's experts are sliced to this rank's shard
    return ref, ep


def _check_case(rank, world, E, lens, kw, padded=False, prepare=None):
    """One forward+backward on each rank's tokens (``lens[r]`` of them) against the reference."""
    ref, ep = _layers(E, **kw)
    if prepare is not None:
        prepare(ref), prepare(ep)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(n, D, generator=g) for n in lens]
    grads_out = [torch.randn(n, D, generator=g) for n in lens]
    masks = [torch.rand(n, generator=g) < 0.3 for n in lens] if padded else [None] * world
    ctxs = [RoutingContext(padding_mask=m) if m is not None else None for m in masks]

    ref_x = [x.clone().requires_grad_() for x in xs]
    ref_y = [ref(x, c) for x, c in zip(ref_x, ctxs)]
    sum((y * go).sum() for y, go in zip(ref_y, grads_out)).backward()

    x = xs[rank].clone().requires_grad_()
    y = ep(x, ctxs[rank])
    (y * grads_out[rank]).sum().backward()

    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, ref_y[rank], **tol)
    torch.testing.assert_close(x.grad, ref_x[rank].grad, **tol)
    lo, hi = ep.experts.expert_range
    for name in ("w_gate", "w_up", "w_down"):
        torch.testing.assert_close(getattr(ep.experts, name).grad, getattr(ref.experts, name).grad[lo:hi], **tol)
    for name, p in ep.named_parameters():  # replicated parameters: the ranks' gradients sum to the reference's
        if not name.startswith("experts."):
            grad = p.grad.clone()
            dist.all_reduce(grad)
            torch.testing.assert_close(grad, ref.get_parameter(name).grad, **tol)
    return ref, ep


def _block_experts(lo, hi):
    """Aux-free bias that keeps experts [lo, hi) from ever being chosen (their rank receives no token)."""
    def prepare(layer):
        with torch.no_grad():
            layer.router.expert_bias[lo:hi] = -1e4
    return prepare


def _equivalence_worker(rank, world, full=True):
    """Every router kind x dropless/capacity x shared experts/padding (``full``), or one case of each axis."""
    E = 2 * world
    uneven = [3 + 5 * r for r in range(world)]
    cases = [(router, capacity, shared) for router in ("topk", "relu") for capacity in (None, 1.0) for shared in (0, 1)]
    if not full:
        cases = [("topk", None, 1), ("relu", 1.0, 0)]
    for router, capacity, shared in cases:
        kw = dict(router=router, capacity_factor=capacity, num_shared_experts=shared)
        _check_case(rank, world, E, uneven, kw, padded=shared == 1)
    # the last rank's experts get no token (it receives nothing but still takes part), and so do their experts
    _check_case(rank, world, E, uneven, dict(router_kwargs={"bias_update_rate": 1e-3}),
                prepare=_block_experts(E - 2, E))
    # a rank with no tokens of its own still serves its experts
    _check_case(rank, world, E, [0] + uneven[1:], dict(losses=[]))


def _default_worker(rank, world):
    """The default suite's one spawn (process start-up dominates): a case of each kind."""
    _equivalence_worker(rank, world, full=False)
    _global_aux_and_controller_worker(rank, world)
    _checkpoint_worker(rank, world)
    _mismatch_worker(rank, world)


def test_expert_parallel_on_two_ranks():
    run_gloo_workers(_default_worker, 2, timeout_s=JOIN_TIMEOUT_S)


@pytest.mark.slow  # ~1 min on 2 quiet cores: process start-up and 10 cases
@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_matches_single_process_every_case(world):
    run_gloo_workers(_equivalence_worker, world, timeout_s=JOIN_TIMEOUT_S)


def _global_aux_and_controller_worker(rank, world):
    """GlobalBatchAuxLoss and the aux-free bias controller reduce over the whole group: every rank's value and
    updated bias equal the single-process ones on the concatenated batch."""
    E, T = 2 * world, 6
    kw = dict(router_kwargs={"bias_update_rate": 0.1}, losses=[GlobalBatchAuxLoss(1.0)], return_aux_loss=True)
    ref, ep = _layers(E, **kw)
    xs = torch.randn(world * T, D, generator=torch.Generator().manual_seed(2))
    _, aux = ep(xs[rank * T:(rank + 1) * T])
    # P is local (gradients stay local), counts are global: the ranks' mean is the full batch's loss
    dist.all_reduce(aux)
    decision = ref.router(xs, None, ref.layer_key, "torch")
    torch.testing.assert_close(aux / world, switch_aux_loss(decision, K), rtol=1e-6, atol=1e-6)
    ref.router.load_accum.zero_()
    ref(xs)
    step(ep)
    step(ref)
    torch.testing.assert_close(ep.router.expert_bias, ref.router.expert_bias)


def _checkpoint_worker(rank, world):
    """Every rank's state dict names its global experts; their union re-shards to one single-process layer."""
    E = 2 * world
    ref, ep = _layers(E)
    sd = ep.state_dict()
    lo, hi = ep.experts.expert_range
    assert f"experts.w_up@{lo}:{hi}" in sd and "experts.w_up" not in sd
    every = [None] * world
    dist.all_gather_object(every, sd)
    (full,) = reshard_expert_state_dicts(every, 1)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(full[k], v, rtol=0, atol=0)
    halves = reshard_expert_state_dicts(every, world // 2 if world > 2 else 1)
    assert len(halves) == max(world // 2, 1)


def _mismatch_worker(rank, world):
    # a layer built with another hidden size on rank 1: every rank raises, naming it
    try:
        MoELayer(D, F + (rank == 1), 4, K, dispatcher=AllToAllDispatcher())
    except ValueError as e:
        assert "ffn_hidden_size differs on rank(s) [1]" in str(e), str(e)
    else:
        raise AssertionError("a mismatched layer configuration was accepted")
    # settings changed after construction are caught by the forward's counts exchange
    _, ep = _layers(4)
    if rank == 1:
        ep.capacity_factor = 2.0
    try:
        ep(torch.randn(5, D))
    except ValueError as e:
        assert "capacity_factor (x1e6) differs" in str(e), str(e)
    else:
        raise AssertionError("a mismatched capacity factor was accepted")
