"""Megatron-Core ``RouterReplay`` interop: layout conversion, and records exchanged with real mcore TopKRouters.

The mcore routers run on the CPU over gloo at world size 1 (``file://`` rendezvous) with
``torch.cuda.current_device`` pointed at the CPU (mcore's gating moves a CPU weight to that device). mcore 0.16's
``RouterGatingLinearFunction`` reads ``te_general_gemm``, a name bound only when Transformer Engine imports; the
fixture binds it to None, the value mcore's own fallback branch expects.
"""
from __future__ import annotations

import warnings
from contextlib import nullcontext

import pytest
import torch

from moe_routing import MoELayer, RoutingContext, replay_routing
from moe_routing.replay import from_megatron, get_megatron_record, set_megatron_replay, to_megatron

from helpers import gen

D, F, E, K, L = 16, 8, 8, 2, 3
S, B = 5, 3  # mcore sees [S, B, H]; our layer [B, S, D]


def random_record(T, seed, k=K, layers=L):
    g = gen(seed)
    return torch.stack([torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(layers)])
                        for _ in range(T)]).to(torch.int16)


# ---- pure layout conversion (no megatron needed) -------------------------------------------------------------

def test_to_and_from_megatron_reorder_tokens_like_sbh():
    rec = random_record(B * S, 0)
    per_layer = to_megatron(rec, batch_size=B)
    assert len(per_layer) == L and all(t.dtype == torch.int64 and t.shape == (S * B, K) for t in per_layer)
    for b in range(B):
        for s in range(S):
            for l in range(L):
                assert torch.equal(per_layer[l][s * B + b], rec[b * S + s, l].long())
    back = from_megatron(per_layer, batch_size=B)
    assert back.dtype == torch.int16 and torch.equal(back, rec)
    # packed input (THD, B = 1): the order is kept
    assert torch.equal(torch.stack(to_megatron(rec), 1), rec.long())
    assert torch.equal(from_megatron(to_megatron(rec.to(torch.uint8))), rec)


def test_to_megatron_needs_fill_for_unreported_rows():
    rec = random_record(6, 1)
    rec[-1] = -1  # the engine's missing last token
    with pytest.raises(ValueError, match=r"marks 3 \(token, layer\) rows -1 \(first: token 5, layer 0\).*fill_TLK"):
        to_megatron(rec)
    fill = random_record(6, 2)
    got = torch.stack(to_megatron(rec, fill_TLK=fill), 1)
    assert torch.equal(got[:-1], rec[:-1].long()) and torch.equal(got[-1], fill[-1].long())
    with pytest.raises(ValueError, match=r"fill_TLK has shape"):
        to_megatron(rec, fill_TLK=fill[:5])
    bad_fill = fill.clone()
    bad_fill[-1, 0] = -1
    with pytest.raises(ValueError, match=r"fill_TLK has -1 in a row"):
        to_megatron(rec, fill_TLK=bad_fill)


def test_conversion_errors():
    rec = random_record(6, 3)
    with pytest.raises(ValueError, match=r"6 tokens, not a multiple of batch_size=4"):
        to_megatron(rec, batch_size=4)
    with pytest.raises(TypeError, match=r"batch_size must be an int"):
        to_megatron(rec, batch_size=2.0)
    with pytest.raises(ValueError, match=r"experts_TLK must be a \[T, L, K\] tensor"):
        to_megatron(rec[:, 0])
    with pytest.raises(ValueError, match=r"per_layer_TK is empty"):
        from_megatron([])
    with pytest.raises(ValueError, match=r"per_layer_TK\[1\] is None: that layer recorded nothing"):
        from_megatron([rec[:, 0].long(), None])
    with pytest.raises(ValueError, match=r"per_layer_TK\[1\] has shape \(5, 2\)"):
        from_megatron([rec[:, 0].long(), rec[:5, 1].long()])


# ---- against Megatron-Core's TopKRouter ----------------------------------------------------------------------

@pytest.fixture
def mcore_routers(monkeypatch, tmp_path):
    """A factory of L mcore TopKRouters with routing replay on (softmax over the chosen logits, no aux loss)."""
    pytest.importorskip("megatron.core", reason="megatron-core is not installed (extra 'megatron')")
    import torch.distributed as dist
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.moe import moe_utils
    from megatron.core.transformer.moe.router import TopKRouter
    from megatron.core.transformer.moe.router_replay import RouterReplay
    from megatron.core.transformer.transformer_config import TransformerConfig

    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    monkeypatch.setattr(moe_utils, "te_general_gemm", None, raising=False)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    # RouterReplay keeps its instances in a class-level list: start empty, restore whatever was there
    saved = list(RouterReplay.global_router_replay_instances)
    RouterReplay.global_router_replay_instances.clear()

    def make(seed: int) -> list:
        pg = ProcessGroupCollection()
        for name in ("tp", "cp", "tp_cp", "tp_dp_cp"):
            setattr(pg, name, dist.group.WORLD)
        with warnings.catch_warnings():  # mcore's default-value and deprecation notices, not what is tested
            warnings.simplefilter("ignore")
            config = TransformerConfig(num_layers=L, hidden_size=D, num_attention_heads=1, num_moe_experts=E,
                                       moe_router_topk=K, moe_enable_routing_replay=True,
                                       moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
                                       use_cpu_initialization=True, add_bias_linear=False)
        torch.manual_seed(seed)
        return [TopKRouter(config, pg) for _ in range(L)]

    try:
        yield make, RouterReplay
    finally:
        RouterReplay.clear_global_router_replay_action()
        RouterReplay.global_router_replay_instances[:] = saved
        if created:
            dist.destroy_process_group()


def our_layers(weights):
    layers = [MoELayer(D, F, E, K, layer_idx=l) for l in range(L)]
    with torch.no_grad():
        for layer, w in zip(layers, weights):
            layer.router.weight.copy_(w)
    return layers


def run_ours(layers, xs_BSD, forced_TLK=None, public_replay=None):
    """Each layer on its input; returns the chosen experts [T, L, K] and gates [T, L, K] it routed with.

    ``forced_TLK`` forces through ``RoutingContext(forced_experts=...)``; ``public_replay`` (a record) wraps
    the layers, called one by one, in ``mr.replay_routing``."""
    experts, gates = [], []
    replay = (nullcontext() if public_replay is None
              else replay_routing(torch.nn.ModuleList(layers), public_replay))
    with replay:
        for l, (layer, x) in enumerate(zip(layers, xs_BSD)):
            seen = []
            handle = layer.router.register_forward_hook(lambda m, args, out: seen.append(out))
            ctx = None if forced_TLK is None else RoutingContext(forced_experts={l: forced_TLK[:, l]})
            with torch.no_grad():
                layer(x, ctx)
            handle.remove()
            experts.append(seen[0].experts_TK)
            gates.append(seen[0].weights_TK)
    return torch.stack(experts, 1), torch.stack(gates, 1)


def inputs():
    g = gen(7)
    return [torch.randn(S, B, D, generator=g) for _ in range(L)]


def to_ours(t_SB_rest):
    """mcore token order (s * B + b) to ours (b * S + s)."""
    return t_SB_rest.reshape(S, B, *t_SB_rest.shape[1:]).transpose(0, 1).reshape(S * B, *t_SB_rest.shape[1:])


def test_mcore_record_replays_in_our_layer(mcore_routers):
    make, RouterReplay = mcore_routers
    routers = make(seed=0)
    xs = inputs()
    RouterReplay.set_global_router_replay_action(_action("RECORD"))
    probs = [to_ours(r(x)[0].detach()) for r, x in zip(routers, xs)]  # [T, E] gate weights, zero off the choice
    rec = get_megatron_record(batch_size=B)
    assert rec.shape == (B * S, L, K) and rec.dtype == torch.int16

    xs_BSD = [x.transpose(0, 1) for x in xs]
    # same router weights: replay gives mcore's choice and mcore's gate weights
    experts, gates = run_ours(our_layers([r.weight.detach() for r in routers]), xs_BSD, forced_TLK=rec)
    assert torch.equal(experts, rec.long())
    for l in range(L):
        torch.testing.assert_close(gates[:, l], probs[l].gather(1, rec[:, l].long()), rtol=1e-6, atol=1e-7)
    # perturbed weights route differently on their own, yet replay still reproduces mcore's choice
    g = gen(8)
    moved = our_layers([r.weight.detach() + 0.5 * torch.randn(E, D, generator=g) for r in routers])
    native, _ = run_ours(moved, xs_BSD)
    assert not torch.equal(native.sort(-1).values, rec.long().sort(-1).values)
    replayed, _ = run_ours(moved, xs_BSD, forced_TLK=rec)
    assert torch.equal(replayed, rec.long())
    # the public API replays mcore's record to the same selection and gates as the forced_experts channel
    # (its columns sorted per token: the replay's canonical order; the set is mcore's)
    public, public_gates = run_ours(moved, xs_BSD, public_replay=rec)
    assert torch.equal(public, rec.long().sort(-1).values)
    _, forced_gates = run_ours(moved, xs_BSD, forced_TLK=rec.long().sort(-1).values)
    assert torch.equal(public_gates, forced_gates)
    same_weights = our_layers([r.weight.detach() for r in routers])
    _, public_gates = run_ours(same_weights, xs_BSD, public_replay=rec)
    for l in range(L):
        torch.testing.assert_close(public_gates[:, l], probs[l].gather(1, public[:, l]), rtol=1e-6, atol=1e-7)


def test_our_record_replays_in_mcore(mcore_routers):
    make, RouterReplay = mcore_routers
    routers = make(seed=1)
    xs = inputs()
    xs_BSD = [x.transpose(0, 1) for x in xs]
    # our routing with other weights: mcore routing natively would choose differently
    g = gen(9)
    ours = our_layers([r.weight.detach() + 0.5 * torch.randn(E, D, generator=g) for r in routers])
    rec, _ = run_ours(ours, xs_BSD)
    rec = rec.to(torch.int16)

    RouterReplay.set_global_router_replay_action(_action("RECORD"))
    native = torch.stack([to_ours(r(x)[1]) for r, x in zip(routers, xs)], 1)  # [T, L, E] routing maps
    RouterReplay.clear_global_indices()
    chosen = torch.zeros(B * S, L, E, dtype=torch.bool).scatter_(2, rec.long(), True)
    assert not torch.equal(native, chosen)

    set_megatron_replay(rec, batch_size=B)
    RouterReplay.set_global_router_replay_action(_action("REPLAY_FORWARD"))
    outs = [r(x) for r, x in zip(routers, xs)]
    replay_map = torch.stack([to_ours(m) for _, m in outs], 1)
    assert torch.equal(replay_map, chosen)
    # with our weights in mcore, its gate weights at the replayed experts equal ours
    for r, layer in zip(routers, ours):
        with torch.no_grad():
            r.weight.copy_(layer.router.weight)
    RouterReplay.clear_global_indices()
    set_megatron_replay(rec, batch_size=B)
    _, gates = run_ours(ours, xs_BSD, forced_TLK=rec)
    for l, (r, x) in enumerate(zip(routers, xs)):
        probs = to_ours(r(x)[0].detach())
        torch.testing.assert_close(probs.gather(1, rec[:, l].long()), gates[:, l], rtol=1e-6, atol=1e-7)


def _action(name):
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    return getattr(RouterReplayAction, name)
