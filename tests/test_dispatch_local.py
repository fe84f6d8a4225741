"""moe_routing/dispatch (base, local, sharding): `LocalDispatcher` against a naive per-pair loop in float64 (fixed-k and
variable-k decisions, dropless and capacity, padding), its meta record, the layer's ``dispatcher`` argument, and the
expert-shard checkpoint keys and re-sharding (single process; the all-to-all path is tested in
test_dispatch_all_to_all.py)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from moe_routing import MoELayer, RoutingContext
from moe_routing.decision import RoutingDecision
from moe_routing.dispatch import (AllToAllDispatcher, DispatchMeta, LocalDispatcher, ShardedExperts,
                                  reshard_expert_state_dicts)
from moe_routing.ops.capacity import capacity_keep_mask, expert_capacity

from helpers import D, E, F, K, gen, moe


def _decision(T, E, k, variable, g):
    """Token-sorted pairs: k distinct experts per token, or 0..k (variable) with no fixed K."""
    token, expert = [], []
    for t in range(T):
        n = int(torch.randint(0, k + 1, (1,), generator=g)) if variable else k
        for e in torch.randperm(E, generator=g)[:n].tolist():
            token.append(t)
            expert.append(e)
    logits = torch.randn(T, E, generator=g, dtype=torch.float64)
    return RoutingDecision(token_N=torch.tensor(token, dtype=torch.long),
                           expert_N=torch.tensor(expert, dtype=torch.long),
                           weight_N=torch.rand(len(token), generator=g, dtype=torch.float64), logits_TE=logits,
                           scores_TE=logits.softmax(-1), num_experts=E, top_k=None if variable else k)


def _naive(x, d, keep, scale_E):
    """y[t] = sum over t's kept pairs of w * scale[e] * x[t], one pair at a time."""
    y = torch.zeros_like(x)
    for p in range(d.token_N.numel()):
        if keep[p]:
            t, e = int(d.token_N[p]), int(d.expert_N[p])
            y[t] += d.weight_N[p] * scale_E[e] * x[t]
    return y


@pytest.mark.parametrize("variable", [False, True])
@pytest.mark.parametrize("capacity", [None, 0.5, 1.3])
@pytest.mark.parametrize("padded", [False, True])
def test_dispatch_combine_match_naive_loop(variable, capacity, padded):
    g = gen(3)
    T, n_e, k = 13, 5, 2
    d = _decision(T, n_e, k, variable, g)
    x = torch.randn(T, 6, generator=g, dtype=torch.float64)
    valid = (torch.rand(T, generator=g) > 0.3) if padded else None
    scale_E = torch.arange(1.0, n_e + 1, dtype=torch.float64)
    x_ND, counts_E, offsets_E1, meta = LocalDispatcher().dispatch(x, d, valid, top_k=k, capacity_factor=capacity)
    assert isinstance(meta, DispatchMeta)
    with pytest.raises(dataclasses.FrozenInstanceError):
        meta.num_tokens = 0
    # rows sorted by expert, counted per expert; the order and its inverse are inverse permutations
    rows_expert = torch.repeat_interleave(torch.arange(n_e), counts_E)
    assert torch.equal(offsets_E1, torch.nn.functional.pad(counts_E.cumsum(0), (1, 0)))
    N = meta.token_N.numel()
    assert torch.equal(meta.row_of_pair_N[meta.pair_of_row_N], torch.arange(N))
    assert torch.equal(x_ND, x[meta.token_N[meta.pair_of_row_N]])
    y = LocalDispatcher().combine(x_ND * scale_E[rows_expert][:, None], meta)

    valid_N = torch.ones(d.token_N.numel(), dtype=torch.bool) if valid is None else valid[d.token_N]
    if capacity is None:
        keep = torch.ones_like(valid_N)
        assert meta.keep_N is None
    else:
        num_valid = T if valid is None else int(valid.sum())
        keep = capacity_keep_mask(d.expert_N, d.weight_N, n_e, expert_capacity(capacity, num_valid, k, n_e),
                                  "weight", None if valid is None else valid_N)
        assert torch.equal(meta.keep_N, keep)
    torch.testing.assert_close(y, _naive(x, d, keep, scale_E))
    assert int(meta.routed) == int(valid_N.sum())
    assert int(meta.dropped) == int((valid_N & ~keep).sum())
    load = torch.zeros(n_e, dtype=torch.long)
    for p in range(d.token_N.numel()):
        load[d.expert_N[p]] += int(keep[p] and valid_N[p])
    assert torch.equal(meta.load_E, load)


def test_layer_takes_a_dispatcher_and_the_default_is_local():
    x = torch.randn(2, 7, D, generator=gen(0))
    ctx = RoutingContext(padding_mask=torch.rand(2, 7, generator=gen(1)) < 0.3)
    for kw in ({}, {"capacity_factor": 1.0}, {"router": "relu"}):
        a, b = moe(**kw), moe(dispatcher=LocalDispatcher(), **kw)
        assert isinstance(a.dispatcher, LocalDispatcher)
        ya, yb = a(x, ctx), b(x, ctx)
        assert torch.equal(ya, yb)
        ga = torch.autograd.grad(ya.square().sum(), list(a.parameters()))
        gb = torch.autograd.grad(yb.square().sum(), list(b.parameters()))
        assert all(torch.equal(u, v) for u, v in zip(ga, gb))
    with pytest.raises(TypeError, match="dispatcher must be a moe_routing.dispatch.Dispatcher"):
        MoELayer(D, F, E, K, dispatcher="all_to_all")


def test_all_to_all_needs_a_process_group():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        pytest.skip("a process group is initialised in this process")
    with pytest.raises(RuntimeError, match="initialised torch.distributed process group"):
        AllToAllDispatcher()


def _full_state(E=8, activation="swiglu"):
    torch.manual_seed(0)
    return MoELayer(D, F, E, K, activation=activation, num_shared_experts=1).state_dict()


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_reshard_round_trips_between_expert_parallel_sizes(activation):
    full = _full_state(activation=activation)
    two = reshard_expert_state_dicts([full], 2)
    assert "experts.w_up@0:4" in two[0] and "experts.w_up@4:8" in two[1] and "experts.w_up" not in two[0]
    assert ("experts.w_gate@0:4" in two[0]) == (activation == "swiglu")
    assert torch.equal(two[1]["shared_experts.w_up"], full["shared_experts.w_up"])  # replicated, not sharded
    four = reshard_expert_state_dicts(list(reversed(two)), 4)  # any order: the keys say where each piece belongs
    assert torch.equal(four[3]["experts.w_down@6:8"], full["experts.w_down"][6:8])
    (back,) = reshard_expert_state_dicts(four, 1)
    assert back.keys() == full.keys() and all(torch.equal(back[k], full[k]) for k in full)


def test_sharded_experts_save_and_load_their_global_range():
    full = _full_state()
    two = reshard_expert_state_dicts([full], 2)
    shard = ShardedExperts(4, 4, 8, D, F)
    assert shard.expert_range == (4, 8)
    shard.load_state_dict({k[len("experts."):]: v for k, v in two[1].items() if k.startswith("experts.")})
    assert torch.equal(shard.w_up, full["experts.w_up"][4:8])
    assert set(shard.state_dict()) == {"w_gate@4:8", "w_up@4:8", "w_down@4:8"}
    other = ShardedExperts(4, 4, 8, D, F)  # a full checkpoint's plain keys: the shard is sliced out
    other.load_state_dict({k[len("experts."):]: v for k, v in full.items() if k.startswith("experts.")})
    assert torch.equal(other.w_down, full["experts.w_down"][4:8])
    wrong = {k[len("experts."):]: v for k, v in two[0].items() if k.startswith("experts.")}
    with pytest.raises(ValueError, match=r"this rank holds global experts \[4, 8\).*reshard_expert_state_dicts"):
        shard.load_state_dict(wrong)


def test_reshard_rejects_bad_checkpoints():
    two = reshard_expert_state_dicts([_full_state()], 2)
    with pytest.raises(ValueError, match="do not tile"):
        reshard_expert_state_dicts([two[1]], 2)  # experts 0..3 missing
    with pytest.raises(ValueError, match="not divisible by ep_size=3"):
        reshard_expert_state_dicts(two, 3)
    with pytest.raises(ValueError, match="ep_size"):
        reshard_expert_state_dicts(two, 0)
