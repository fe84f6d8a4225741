"""moe_routing/interventions.py: `intervene` adds exactly the asked offset to the router logits of the chosen
layers only (others bitwise unchanged), restores on exit (also on an exception), composes with replay and nesting;
`promote_experts` builds the paper's recipe from a collected routing."""
import pytest
import torch
from torch import nn

import moe_routing as mr
from moe_routing.analysis import collect_routing
from moe_routing.interventions import logit_offset_vectors, middle_layers

D, E, K = 8, 6, 2


def _layers(router="topk", n=3, **kw):
    torch.manual_seed(0)
    model = nn.Sequential(*[mr.MoELayer(D, 16, E, K, router=router, **kw) for _ in range(n)]).eval()
    with torch.no_grad():
        for layer in model:
            layer.router.weight.normal_(0, 0.5)
    return model


def _decisions(model, x):
    """Each layer run on the same input x: {layer: (output, decision)}."""
    out = {}
    for i, layer in enumerate(model):
        seen = []
        layer._routing.recorders.append(seen.append)
        try:
            with torch.no_grad():
                y = layer(x)
        finally:
            layer._routing.recorders.remove(seen.append)
        out[i] = (y, seen[0])
    return out


@pytest.mark.filterwarnings("ignore:ExpertChoiceRouter is not causal")
@pytest.mark.parametrize("router,kw", [("topk", {}), ("relu", {}), ("expert_choice", {}),
                                       ("topk", {"router_kwargs": {"score_func": "sigmoid"}})])
def test_offset_exactly_applied_on_chosen_layers_only(router, kw):
    model = _layers(router, **kw)
    x = torch.randn(10, D, generator=torch.Generator().manual_seed(1))
    base = _decisions(model, x)
    with mr.intervene(model, layers=[1], boost={2: 1.5, 4: 0.25}, suppress={0: -0.75}) as applied:
        hit = _decisions(model, x)
    offset = torch.zeros(E)
    offset[2], offset[4], offset[0] = 1.5, 0.25, -0.75
    assert list(applied) == [1] and torch.equal(applied[1], offset)
    for i in (0, 2):  # untouched layers: bitwise the same output and decision
        assert torch.equal(hit[i][0], base[i][0])
        assert torch.equal(hit[i][1].logits_TE, base[i][1].logits_TE)
        assert torch.equal(hit[i][1].expert_N, base[i][1].expert_N)
    d0, d1 = base[1][1], hit[1][1]
    manual_TE = d0.logits_TE + offset  # the manual logits: the same op the router applies
    assert torch.equal(d1.logits_TE, manual_TE)
    router_mod = model[1].router
    assert torch.equal(d1.scores_TE, router_mod.scores(manual_TE))
    if router == "topk" and not kw:
        assert torch.equal(d1.experts_TK, router_mod.select(manual_TE, router_mod.scores(manual_TE), None))
    elif router == "relu":
        assert torch.equal(d1.scores_TE > 0, manual_TE > 0)  # ReLU: the expert is active where its logit is > 0
    after = _decisions(model, x)  # restored: bitwise the baseline
    for i in range(3):
        assert torch.equal(after[i][0], base[i][0])
    assert all(layer._routing.logit_offsets == [] for layer in model)


def test_large_boost_forces_an_expert_and_model_forward_changes_only_from_that_layer():
    model = _layers()
    x = torch.randn(12, D, generator=torch.Generator().manual_seed(2))
    with mr.record_routing(model) as base:
        with torch.no_grad():
            y0 = model(x)
    with mr.record_routing(model) as rec:
        with mr.intervene(model, layers=[-1], boost={5: 100.0}), torch.no_grad():
            y1 = model(x)
    assert torch.equal(rec.experts_TLK[:, :2], base.experts_TLK[:, :2])
    assert (rec.experts_TLK[:, 2] == 5).any(1).all()
    assert not torch.equal(y0, y1)


def test_restored_on_exception_and_nested_blocks_add_up():
    model = _layers()
    with pytest.raises(RuntimeError, match="boom"):
        with mr.intervene(model, boost={1: 2.0}):
            assert all(len(layer._routing.logit_offsets) == 1 for layer in model)
            raise RuntimeError("boom")
    assert all(layer._routing.logit_offsets == [] for layer in model)
    x = torch.randn(5, D)
    base = _decisions(model, x)
    with mr.intervene(model, layers=[0], boost={1: 2.0}):
        with mr.intervene(model, layers=[0], boost={1: 2.0}, suppress={3: -1.0}):
            both = _decisions(model, x)
        inner_gone = _decisions(model, x)
    expect = torch.zeros(E)
    expect[1], expect[3] = 4.0, -1.0
    assert torch.equal(both[0][1].logits_TE, base[0][1].logits_TE + expect)
    single = torch.zeros(E)
    single[1] = 2.0
    assert torch.equal(inner_gone[0][1].logits_TE, base[0][1].logits_TE + single)


def test_replay_wins_over_the_offset_but_gates_follow_the_shifted_scores():
    model = _layers(n=1)
    x = torch.randn(6, D, generator=torch.Generator().manual_seed(3))
    forced = torch.tensor([[0, 1]] * 6)[:, None, :]
    with mr.replay_routing(model, forced):
        plain = _decisions(model, x)[0][1]
    with mr.replay_routing(model, forced), mr.intervene(model, boost={5: 50.0, 0: 1.0}):
        both = _decisions(model, x)[0][1]
    assert torch.equal(both.experts_TK, plain.experts_TK)  # expert 5 is not used, whatever its boost
    # the gates (softmax over the two replayed experts' logits) see expert 0's shifted logit
    assert not torch.equal(both.weight_N, plain.weight_N)
    assert torch.equal(both.scores_TE, model[0].router.scores(plain.logits_TE + torch.tensor([1.0, 0, 0, 0, 0, 50])))


def test_per_layer_offsets_and_vectors():
    model = _layers()
    vecs = logit_offset_vectors(model, offsets={0: {1: 0.5}, 2: {3: -2.0, 0: 1.0}})
    assert sorted(vecs) == [0, 2]
    assert vecs[2].tolist() == [1.0, 0, 0, -2.0, 0, 0]
    assert logit_offset_vectors(model, layers=[0, 1], boost={0: 1.0}, offsets={1: {0: 1.0}})[1][0] == 2.0


def test_bad_input():
    model = _layers()
    with pytest.raises(ValueError, match="suppress.*<= 0"):
        with mr.intervene(model, suppress={0: 1.0}):
            pass
    with pytest.raises(ValueError, match="boost.*>= 0"):
        with mr.intervene(model, boost={0: -1.0}):
            pass
    with pytest.raises(ValueError, match="finite"):
        with mr.intervene(model, boost={0: float("nan")}):
            pass
    with pytest.raises(ValueError, match=r"expert id 6; expected an int in \[0, 6\)"):
        with mr.intervene(model, boost={6: 1.0}):
            pass
    with pytest.raises(ValueError, match="3 MoE layers"):
        with mr.intervene(model, layers=[3], boost={0: 1.0}):
            pass
    with pytest.raises(TypeError, match="layers must be"):
        with mr.intervene(model, layers=1, boost={0: 1.0}):
            pass
    with pytest.raises(ValueError, match="no MoELayer"):
        with mr.intervene(nn.Linear(2, 2), boost={0: 1.0}):
            pass
    hashed = nn.Sequential(mr.MoELayer(D, 16, E, K, router=mr.HashRouter(D, E, K)))
    with pytest.raises(ValueError, match="HashRouter, which has no router logits"):
        with mr.intervene(hashed, boost={0: 1.0}):
            pass
    assert all(layer._routing.logit_offsets == [] for layer in model)


def test_middle_layers():
    assert middle_layers(8) == [2, 3, 4, 5]
    assert middle_layers(3) == [1] or middle_layers(3) == [0, 1]
    assert middle_layers(1) == [0]
    assert middle_layers(12, 0.25) == [4, 5, 6]
    with pytest.raises(ValueError, match="fraction"):
        middle_layers(4, 0)


def test_promote_experts_builds_the_recipe_from_a_collected_routing():
    torch.manual_seed(0)
    embed = nn.Embedding(10, D)
    model = _layers(n=4)
    # a known routing: layer l sends every token to experts (l, l + 1)
    known = torch.tensor([[l, l + 1] for l in range(4)]).expand(8, 4, 2)

    def forward(m, ids):
        with mr.replay_routing(m, known):
            return m(embed(ids))

    col = collect_routing(model, [torch.randint(0, 10, (2, 4))], forward=forward)
    recipe = mr.promote_experts(col, delta=0.5, top_n=2)  # middle of 4 layers: [1, 2]
    assert recipe == {1: {1: 0.5, 2: 0.5}, 2: {2: 0.5, 3: 0.5}}
    assert mr.promote_experts(col, delta=1.0, layers=[0]) == {0: {0: 1.0}}  # tie -> lower id
    with mr.intervene(model, offsets=recipe) as applied:
        assert sorted(applied) == [1, 2]
    with pytest.raises(ValueError, match="top_n"):
        mr.promote_experts(col, delta=1.0, top_n=E + 1)
    with pytest.raises(ValueError, match="delta"):
        mr.promote_experts(col, delta=float("inf"))
