"""moe_routing/integrations/hf_routers.py with the inference-time tools: after `swap_routers`, a Hugging Face model
(tiny random Qwen3-MoE / Mixtral configs, no hub) is recorded, replayed, analysed, intervened on and rerouted
through the routers' `LayerRouting` exactly like a model made of `MoELayer`s."""
from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0",
                                   reason="the Hugging Face integration needs transformers>=5 (extra 'hf')")

import moe_routing as mr  # noqa: E402
from moe_routing.analysis import collect_routing  # noqa: E402
from moe_routing.integrations import hf  # noqa: E402
from moe_routing.integrations.hf_routers import MoEBlock, RouterGate, _sparse_blocks  # noqa: E402
from moe_routing.rerouting import (OnlineRerouter, add_to_router_logits, build_reference, generate,  # noqa: E402
                                   output_logits, r2t2)

from test_integrations_hf import VOCAB, tiny_model, token_ids  # noqa: E402

FIXED_K = ("qwen3_moe", "mixtral")


def swapped(family: str, router: str = "topk", layers: int = 3):
    model = tiny_model(family, num_hidden_layers=layers)
    hf.swap_routers(model, router)
    return model


def hf_topk_counts(model, batches) -> torch.Tensor:
    """int64 [L, E]: tokens per expert counted from the HF gates' own top-k indices (an unswapped model)."""
    gates = [block.gate for _, block in _sparse_blocks(model)]
    picked = [[] for _ in gates]
    handles = [g.register_forward_hook(lambda _m, _a, out, i=i: picked[i].append(out[2].reshape(-1)))
               for i, g in enumerate(gates)]
    try:
        with torch.no_grad():
            for ids in batches:
                model(ids)
    finally:
        for h in handles:
            h.remove()
    E = gates[0].weight.shape[0]
    return torch.stack([torch.bincount(torch.cat(p), minlength=E) for p in picked])


def native_logits(gate: RouterGate, x) -> torch.Tensor:
    """The swapped router's own logits on ``x`` (called directly, outside its `LayerRouting`)."""
    x_TD = x.reshape(-1, gate.hidden_dim)
    with torch.no_grad():
        return gate.router(x_TD, None, gate.layer_key, "torch").logits_TE


def run_capturing(model, ids):
    """Each swapped gate's input and the decision its `LayerRouting` handed out, on one forward."""
    gates = [g for _, g in mr.routing_layers(model)]
    inputs, decisions = {}, {}
    handles = [g.register_forward_pre_hook(lambda _m, args, i=i: inputs.__setitem__(i, args[0].detach()))
               for i, g in enumerate(gates)]
    recorders = [(g, (lambda d, i=i: decisions.__setitem__(i, d))) for i, g in enumerate(gates)]
    for g, r in recorders:
        g._routing.recorders.append(r)
    try:
        with torch.no_grad():
            logits = model(ids).logits
    finally:
        for h in handles:
            h.remove()
        for g, r in recorders:
            g._routing.recorders.remove(r)
    return logits, inputs, decisions


@pytest.mark.parametrize("family", FIXED_K)
def test_routing_layers_are_the_swapped_gates(family):
    model = swapped(family)
    layers = mr.routing_layers(model)
    assert len(layers) == 3 and all(isinstance(g, RouterGate) for _, g in layers)
    assert [g.layer_key for _, g in layers] == [0, 1, 2]
    relu = swapped(family, "relu")
    assert [type(m).__name__ for _, m in mr.routing_layers(relu)] == ["MoELayer"] * 3
    assert all(isinstance(relu.get_submodule(n.rpartition(".")[0]), MoEBlock) for n, _ in mr.routing_layers(relu))


@pytest.mark.parametrize("family", FIXED_K + ("olmoe", "deepseek_v3"))
def test_collect_routing_load_equals_the_hf_routers_own_top_k(family):
    original = tiny_model(family, num_hidden_layers=3)
    model = copy.deepcopy(original)
    hf.swap_routers(model)  # init_from_gate: the same routing
    batches = [token_ids(seed=s, batch=3, seq=6) for s in range(3)]
    expected = hf_topk_counts(original, batches)
    col = collect_routing(model, batches)
    L = 2 if family == "deepseek_v3" else 3  # DeepSeek-V3's first layer is dense
    assert col.num_layers == L and col.num_tokens == 54 and col.top_k == 2
    assert torch.equal(col.expert_counts(), expected)
    assert torch.equal(col.expert_counts().sum(1), torch.full((L,), 54 * 2))
    assert col.scores_TLE.shape == (54, L, 8)
    if family != "deepseek_v3":  # post-softmax weights (DeepSeek-V3 scores with a sigmoid)
        assert torch.allclose(col.scores_TLE.sum(-1), torch.ones(54, L))


@pytest.mark.parametrize("family", FIXED_K)
def test_intervention_changes_only_the_chosen_layer(family):
    model = swapped(family)
    ids = token_ids(batch=2, seq=6)
    base_logits, base_in, base_dec = run_capturing(model, ids)
    offset = torch.zeros(8)
    offset[3], offset[5] = 1.5, -0.75
    with mr.intervene(model, layers=[1], boost={3: 1.5}, suppress={5: -0.75}) as applied:
        logits, inputs, dec = run_capturing(model, ids)
    assert list(applied) == [1] and torch.equal(applied[1], offset)
    gates = [g for _, g in mr.routing_layers(model)]
    # layer 0: bitwise the same input and routing; every layer other than 1 routes on its router's own logits
    assert torch.equal(inputs[0], base_in[0]) and torch.equal(dec[0].experts_TK, base_dec[0].experts_TK)
    for i in (0, 2):
        assert torch.equal(dec[i].logits_TE, native_logits(gates[i], inputs[i]))
    assert torch.equal(dec[1].logits_TE, native_logits(gates[1], inputs[1]) + offset)
    assert not torch.equal(dec[1].experts_TK, base_dec[1].experts_TK)
    assert not torch.equal(logits, base_logits)
    # restored on exit: the model computes what it did before
    after, _, _ = run_capturing(model, ids)
    assert torch.equal(after, base_logits)


@pytest.mark.parametrize("family", FIXED_K)
def test_promote_experts_raises_the_promoted_experts_load_in_their_layer_only(family):
    model = swapped(family)
    ref = [token_ids(seed=7, batch=4, seq=6)]
    test = [token_ids(seed=8, batch=4, seq=6)]
    recipe = mr.promote_experts(collect_routing(model, ref), delta=2.0, top_n=1, layers=[1])
    (expert,) = recipe[1]
    before = collect_routing(model, test)
    with mr.intervene(model, offsets=recipe):
        after = collect_routing(model, test)
    assert after.expert_counts()[1, expert] > before.expert_counts()[1, expert]
    assert torch.equal(after.expert_counts()[0], before.expert_counts()[0])


@pytest.mark.parametrize("family", FIXED_K)
def test_record_and_replay_on_the_hf_model(family):
    model = swapped(family)
    ids = token_ids()
    with mr.record_routing(model, keep_scores=True) as rec:
        with torch.no_grad():
            ref_logits = model(ids).logits
    assert rec.experts_TLK.shape == (14, 3, 2) and rec.layer_names == [n for n, _ in mr.routing_layers(model)]
    other = copy.deepcopy(model)
    with torch.no_grad():
        for _, g in mr.routing_layers(other):
            g.router.weight.normal_()
    with mr.replay_routing(other, rec):
        with mr.record_routing(other) as replayed:
            with torch.no_grad():
                other(ids)
    assert torch.equal(replayed.experts_TLK, rec.experts_TLK.sort(2).values)
    with mr.replay_routing(model, rec), torch.no_grad():  # its own routing replayed: the same output
        assert torch.allclose(model(ids).logits, ref_logits, atol=1e-6)


def test_checkpoint_recomputation_reuses_the_forward_selection():
    """HF activation checkpointing recomputes each decoder layer in backward: the swapped gate keeps its forward's
    selection on the gate weights' graph for that recomputation (freed with the graph), and the router gradient
    equals the one without checkpointing."""
    model = swapped("qwen3_moe", layers=2).train()
    ids = token_ids()
    grads = []
    for ckpt in (False, True):
        m = copy.deepcopy(model)
        if ckpt:
            m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        gate = m.model.layers[0].mlp.gate
        loss = m(ids).logits.float().pow(2).mean()
        assert len(gate._routing.kept()) == 1  # owned by this forward's graph
        loss.backward()
        del loss
        assert not gate._routing.kept()
        grads.append(gate.router.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_online_rerouter_and_generate_on_the_hf_model():
    model = swapped("qwen3_moe")
    ids = token_ids(batch=1, seq=8)
    rerouter = OnlineRerouter(model, layers=[1], steps=2, lr=0.05, interval=0)
    before, after = rerouter.adapt(ids)
    assert after <= before + 1e-6 and rerouter.deltas[1].abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())  # only the vectors were optimised
    _, _, base_dec = run_capturing(model, ids)
    with add_to_router_logits(model, {1: rerouter.deltas[1].detach()}):
        _, inputs, dec = run_capturing(model, ids)
    gates = [g for _, g in mr.routing_layers(model)]
    assert torch.equal(dec[0].logits_TE, base_dec[0].logits_TE)
    assert torch.allclose(dec[1].logits_TE, native_logits(gates[1], inputs[1]) + rerouter.deltas[1].detach())
    out = generate(model, ids[:, :4], 2)
    naive = ids[:, :4]
    with torch.no_grad():
        for _ in range(2):
            naive = torch.cat([naive, model(naive).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, naive)
    assert generate(model, ids[:, :4], 2, rerouter=rerouter).shape == (1, 6)


@pytest.mark.parametrize("strategy", ["ngd", "kernel", "mode"])
def test_r2t2_on_the_hf_model(strategy):
    model = swapped("mixtral")
    g = torch.Generator().manual_seed(3)
    X = torch.randint(0, VOCAB, (12, 5), generator=g)
    with torch.no_grad():
        y = model(X).logits[:, -1].argmax(-1)
    y[::3] = (y[::3] + 1) % VOCAB  # a third handled wrongly: left out of the reference
    ref = build_reference(model, X, y, layers=[1, 2])
    assert ref.inputs.shape[0] == 8 and ref.routing_NLPE.shape == (8, 2, 1, 8)
    res = r2t2(model, X[:2], ref, strategy=strategy, steps=2, num_neighbors=3, search_steps=2)
    assert res.routing_BLPE.shape == res.initial_routing_BLPE.shape == (2, 2, 1, 8)
    assert res.output.shape == (2, 5, VOCAB)
    assert torch.allclose(res.routing_BLPE.sum(-1), torch.ones(2, 2, 1), atol=1e-5)


def test_output_logits_reads_every_convention():
    t = torch.zeros(1, 2, 3)
    assert output_logits(t) is t and output_logits((t, None)) is t
    assert output_logits(transformers.modeling_outputs.CausalLMOutput(logits=t)) is t
    with pytest.raises(TypeError, match="logits"):
        output_logits({"x": 1})


def test_relu_swap_is_analysed_and_intervened_on_through_its_moe_layers():
    model = swapped("qwen3_moe", "relu")
    batches = [token_ids(batch=2, seq=5)]
    col = collect_routing(model, batches)
    assert col.experts_TLK is None and col.routing_map_TLE.shape == (10, 3, 8)
    with mr.intervene(model, layers=[2], boost={4: 50.0}):
        boosted = collect_routing(model, batches)
    assert bool(boosted.routing_map_TLE[:, 2, 4].all())
    assert torch.equal(boosted.routing_map_TLE[:, :2], col.routing_map_TLE[:, :2])
