"""Test-time rerouting (`moe_routing.rerouting`): the logit-edit mechanism, R2-T2 against naive loops, and the
online rerouter / generate loop on a tiny float64 TinyLM."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as Fn

import moe_routing as mr
from moe_routing.ablate.config import get_preset
from moe_routing.ablate.registry import build_model
from moe_routing.rerouting import (OnlineRerouter, R2T2Reference, add_to_router_logits, build_reference,
                                   edit_router_logits, generate, kernel_weights, neighborhood_loss, next_token_loss,
                                   r2t2, without_aux_gradient)

V, S = 16, 8


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # tiny forwards: two threads on shared cores mostly wait on each other (10-20x slower under load)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_lm(layers=3, seed=0):
    p = get_preset("smoke", d_model=16, n_layers=layers, n_heads=2, num_experts=4, top_k=2, expert_hidden=8,
                   seq_len=S, init_std=0.5)
    model = build_model(p, "topk", seed, V).double().eval()
    with torch.no_grad():  # decisive routing: sizeable router weights
        for _, layer in mr.moe_layers(model):
            layer.router.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(seed + 1))
            layer.track_stats = False
    return model


def ids(n, seed):
    return torch.randint(0, V, (n, S), generator=torch.Generator().manual_seed(seed))


def layer_logits(model, x):
    """float64 [L, B, S, E] router logits of every layer for ``x`` (the unedited routing of each forward)."""
    store = {}
    n = len(mr.moe_layers(model))

    def keep(i):
        def fn(l):
            store[i] = l.detach()
            return l
        return fn

    with torch.no_grad(), edit_router_logits(model, {i: keep(i) for i in range(n)}):
        model(x)
    return torch.stack([store[i].reshape(x.shape[0], S, -1) for i in range(n)])


def test_additive_offsets_change_only_the_chosen_layer_and_are_undone():
    model, x = tiny_lm(), ids(2, 0)
    with torch.no_grad():
        base_out, base = model(x), layer_logits(model, x)
    d = torch.tensor([3.0, -1.0, 0.5, 0.0], dtype=torch.float64)
    with torch.no_grad(), mr.record_routing(model, keep_scores=True) as rec, add_to_router_logits(model, {1: d}):
        model(x)
    scores = rec.scores_TLE.double().reshape(2, S, 3, 4)
    assert torch.allclose(scores[:, :, 0], base[0].softmax(-1), atol=1e-6)           # before: untouched
    # layer 1 routes on its own logits (its input is unchanged) plus d
    assert torch.allclose(scores[:, :, 1], (base[1] + d).softmax(-1), atol=1e-6)
    assert not torch.allclose(scores[:, :, 1], base[1].softmax(-1), atol=1e-3)
    with torch.no_grad():
        assert torch.equal(model(x), base_out)  # restored on exit
    assert all("gating" not in layer.router.__dict__ for _, layer in mr.moe_layers(model))


def test_nested_edits_compose_and_restore():
    model, x = tiny_lm(), ids(1, 1)
    base = layer_logits(model, x)
    a, b = torch.ones(4, dtype=torch.float64), torch.arange(4, dtype=torch.float64)
    with add_to_router_logits(model, {2: a}):
        with add_to_router_logits(model, {2: b}):
            inner = layer_logits(model, x)
        outer = layer_logits(model, x)
    assert torch.allclose(inner[2], base[2] + a + b) and torch.allclose(outer[2], base[2] + a)
    assert torch.allclose(layer_logits(model, x), base)


def test_edit_errors_name_the_argument():
    model = tiny_lm()
    with pytest.raises(ValueError, match="edits"), edit_router_logits(model, {3: lambda l: l}):
        pass
    with pytest.raises(TypeError, match="callable"), edit_router_logits(model, {0: 1.0}):
        pass
    with pytest.raises(ValueError, match="shape"), edit_router_logits(model, {0: lambda l: l[:, :2]}):
        model(ids(1, 0))
    hashed = torch.nn.Sequential(mr.MoELayer(8, 8, 4, 1, router="hash", router_kwargs={"vocab_size": 16}))
    with pytest.raises(TypeError, match="GatedRouter"), edit_router_logits(hashed, {0: lambda l: l}):
        pass
    with pytest.raises(ValueError, match="MoELayer"), edit_router_logits(torch.nn.Linear(2, 2), {}):
        pass


# --- R2-T2 -------------------------------------------------------------------------------------------------


def reference_for(model, layers=(1,), positions="last", n=24):
    x = ids(n, 5)
    with torch.no_grad():
        y = model(x)[:, -1].argmax(-1)
    y[::3] = (y[::3] + 1) % V  # a third are wrong and must be left out
    ref = build_reference(model, x, y, layers, positions=positions)
    assert ref.inputs.shape[0] == n - len(range(0, n, 3))
    return ref


def naive_neighbours(emb_F, ref_emb_NF, k):
    d = [float(((ref_emb_NF[i] - emb_F) ** 2).sum().sqrt()) for i in range(ref_emb_NF.shape[0])]
    order = sorted(range(len(d)), key=lambda i: d[i])[:k]
    return order, torch.tensor([d[i] for i in order], dtype=torch.float64)


def test_kernel_regression_moves_routing_to_the_weighted_neighbour_average():
    model = tiny_lm()
    ref = reference_for(model)
    x = ids(3, 9)
    base = layer_logits(model, x)
    out = r2t2(model, x, ref, strategy="kernel", num_neighbors=4, alpha=0.7)
    # embeddings = input of layer 1 at the last position
    for b in range(3):
        emb = _layer_input(model, x[b:b + 1], 1)[0, -1]
        order, d = naive_neighbours(emb, ref.embeddings_NF, 4)
        assert out.neighbors_BK[b].tolist() == order
        h = float(d.median())
        w = [float(torch.exp(-d[j] ** 2 / (2 * h * h))) for j in range(4)]
        r_hat = sum(w[j] * ref.routing_NLPE[order[j]] for j in range(4)) / sum(w)
        r0 = base[1, b, -1].softmax(-1)
        assert torch.allclose(out.initial_routing_BLPE[b, 0, 0], r0)
        assert torch.allclose(out.routing_BLPE[b], 0.3 * r0 + 0.7 * r_hat)
    # only layer 1's last position changed; earlier layers and earlier positions route as before
    with torch.no_grad(), mr.record_routing(model, keep_scores=True) as rec, \
            __import__("moe_routing.rerouting.r2t2", fromlist=["_imposed"])._imposed(
                model, (1,), "last", out.routing_BLPE, 3):
        model(x)
    scores = rec.scores_TLE.double().reshape(3, S, 3, 4)
    assert torch.allclose(scores[:, :, 0], base[0].softmax(-1), atol=1e-6)
    assert torch.allclose(scores[:, :-1, 1], base[1, :, :-1].softmax(-1), atol=1e-6)
    assert torch.allclose(scores[:, -1, 1], out.routing_BLPE[:, 0, 0], atol=1e-6)


def _layer_input(model, x, i):
    store = {}
    layer = mr.moe_layers(model)[i][1]
    h = layer.register_forward_pre_hook(lambda m, a: store.__setitem__("x", a[0].detach()))
    with torch.no_grad():
        model(x)
    h.remove()
    return store["x"]


def test_kernel_regression_search_never_does_worse_than_the_endpoints():
    model = tiny_lm()
    ref = reference_for(model)
    x = ids(1, 11)
    out = r2t2(model, x, ref, strategy="kernel", num_neighbors=3, search_steps=2)
    idx, r0 = out.neighbors_BK[0], out.initial_routing_BLPE
    w = kernel_weights(torch.cdist(_layer_input(model, x, 1)[:, -1].float(), ref.embeddings_NF)[0][idx])
    r_hat = (w[:, None, None, None].double() * ref.routing_NLPE[idx]).sum(0, keepdim=True) / w.sum()
    with torch.no_grad():
        losses = [float(neighborhood_loss(model, ref, idx, w, (1 - a) * r0 + a * r_hat)) for a in (0.0, 1.0)]
        found = float(neighborhood_loss(model, ref, idx, w, out.routing_BLPE))
    assert found <= min(losses) + 1e-12
    assert out.alpha_B is not None and ((out.alpha_B >= 0) & (out.alpha_B <= 1)).all()


def test_ngd_sgd_step_is_the_kernel_weighted_neighbour_gradient():
    model = tiny_lm()
    ref = reference_for(model, layers=(1, 2))
    x = ids(1, 13)
    lr = 0.5
    out = r2t2(model, x, ref, strategy="ngd", num_neighbors=3, steps=1, lr=lr, optimizer="sgd", kernel="uniform")
    idx = out.neighbors_BK[0]
    z0 = out.initial_routing_BLPE.log()
    grad = torch.zeros_like(z0)
    for i in idx.tolist():  # one neighbour at a time, uniform weights
        z = z0.clone().requires_grad_(True)
        with without_aux_gradient(model):  # the task loss alone: the balance loss must not steer the routing
            loss = neighborhood_loss(model, ref, torch.tensor([i]), torch.ones(1, dtype=torch.float64), z.softmax(-1))
            grad += torch.autograd.grad(loss, z)[0] / len(idx)
    assert torch.allclose(out.routing_BLPE, (z0 - lr * grad).softmax(-1), atol=1e-10)
    assert all(p.grad is None for p in model.parameters())
    assert all(float(layer.aux_loss_scale) == 1.0 for _, layer in mr.moe_layers(model))


def test_ngd_lowers_the_neighbourhood_loss_and_changes_only_chosen_layers():
    model = tiny_lm()
    ref = reference_for(model, layers=(2,))
    x = ids(1, 17)
    out = r2t2(model, x, ref, strategy="ngd", num_neighbors=3, steps=4, lr=0.3, final_lr=0.01)
    for b in range(1):
        idx = out.neighbors_BK[b]
        emb = _layer_input(model, x[b:b + 1], 2)[:, -1].float()
        d = torch.cdist(emb, ref.embeddings_NF)[0][idx]
        w = kernel_weights(d)
        with torch.no_grad():
            before = neighborhood_loss(model, ref, idx, w, out.initial_routing_BLPE[b:b + 1])
            after = neighborhood_loss(model, ref, idx, w, out.routing_BLPE[b:b + 1])
        assert after < before
    assert out.routing_BLPE.shape == (1, 1, 1, 4)
    assert torch.allclose(out.routing_BLPE.sum(-1), torch.ones(1, 1, 1, dtype=torch.float64))


def test_mode_finding_is_the_mean_shift_iteration():
    model = tiny_lm()
    ref = reference_for(model, layers=(0, 2), positions="all")
    x = ids(1, 19)
    out = r2t2(model, x, ref, strategy="mode", num_neighbors=3, steps=2, mode_step=0.5)
    r = out.initial_routing_BLPE[0]
    flat = ref.routing_NLPE.reshape(ref.routing_NLPE.shape[0], -1)
    for _ in range(2):
        order, d = naive_neighbours(r.reshape(-1), flat, 3)
        h = float(d.median())
        w = [float(torch.exp(-d[j] ** 2 / (2 * h * h))) for j in range(3)]
        r_bar = sum(w[j] * ref.routing_NLPE[order[j]] for j in range(3)) / sum(w)
        r = 0.5 * r + 0.5 * r_bar
    assert torch.allclose(out.routing_BLPE[0], r)
    assert out.routing_BLPE.shape == (1, 2, S, 4)


def test_r2t2_checks_its_arguments():
    model = tiny_lm()
    ref = reference_for(model)
    x = ids(1, 0)
    with pytest.raises(ValueError, match="strategy"):
        r2t2(model, x, ref, strategy="knn")
    with pytest.raises(TypeError, match="num_neighbors"):
        r2t2(model, x, ref, num_neighbors=True)
    with pytest.raises(ValueError, match="alpha"):
        r2t2(model, x, ref, strategy="kernel", alpha=float("nan"))
    with pytest.raises(TypeError, match="R2T2Reference"):
        r2t2(model, x, None)
    with pytest.raises(ValueError, match="layers"):
        build_reference(model, x, torch.zeros(1, dtype=torch.long), [5])
    with pytest.raises(ValueError, match="positions"):
        build_reference(model, x, torch.zeros(1, dtype=torch.long), [0], positions="first")
    sig = torch.nn.Sequential(mr.MoELayer(8, 8, 4, 2, router_kwargs={"score_func": "sigmoid"}))
    with pytest.raises(ValueError, match="softmax"):
        build_reference(sig, torch.zeros(1, 2, 8), torch.zeros(1, dtype=torch.long), [0])
    assert isinstance(ref, R2T2Reference)


# --- online rerouting --------------------------------------------------------------------------------------


def test_online_rerouter_adapts_only_its_vectors_on_the_chosen_layers():
    model = tiny_lm()
    params = [p.detach().clone() for p in model.parameters()]
    x = ids(2, 23)
    rr = OnlineRerouter(model, layers=[0, 2], steps=4, lr=0.3)
    base = layer_logits(model, x)
    before, after = rr.adapt(x)
    assert after < before and rr.history == [(before, after)]
    assert set(rr.deltas) == {0, 2} and all(d.abs().sum() > 0 for d in rr.deltas.values())
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    with rr.applied():
        edited = layer_logits(model, x)
    assert torch.allclose(edited[0], base[0] + rr.deltas[0].detach())
    with torch.no_grad(), rr.applied():
        assert abs(float(next_token_loss(model, x)) - after) < 1e-9
    rr.reset()
    assert all(float(d.detach().abs().sum()) == 0 for d in rr.deltas.values())


def test_confidence_picks_the_layers_with_the_highest_top_k_mass():
    model = tiny_lm()
    x = ids(1, 29)
    logits = layer_logits(model, x)
    mass = logits.softmax(-1).topk(2, -1).values.sum(-1).mean((1, 2))
    rr = OnlineRerouter(model, num_layers=2, steps=1)
    rr.adapt(x)
    assert rr.layers == tuple(sorted(mass.argsort(descending=True)[:2].tolist()))


def test_generate_greedy_matches_a_naive_loop_and_sampling_is_seeded():
    model = tiny_lm()
    prompt = ids(2, 31)[:, :4]
    out = generate(model, prompt, 4)
    seq = prompt
    with torch.no_grad():
        for _ in range(4):
            seq = torch.cat([seq, model(seq[:, -S:])[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)
    a = generate(model, prompt, 3, greedy=False, seed=3)
    assert torch.equal(a, generate(model, prompt, 3, greedy=False, seed=3))
    rr = OnlineRerouter(model, layers=[1], steps=1, lr=0.5, interval=2)
    g = generate(model, prompt, 3, rerouter=rr)
    assert g.shape == (2, 7) and len(rr.history) == 2  # prefill and after 2 new tokens
    with pytest.raises(ValueError, match="temperature"):
        generate(model, prompt, 1, greedy=False, temperature=0.0)
    with pytest.raises(ValueError, match="layers"):
        OnlineRerouter(model, layers="all")


def test_online_vectors_leave_the_other_layers_routing_on_their_own_logits():
    model = tiny_lm()
    x = ids(1, 37)
    rr = OnlineRerouter(model, layers=[1], steps=2, lr=0.5)
    rr.adapt(x)
    inputs = {}
    moe = [layer for _, layer in mr.moe_layers(model)]
    hooks = [m.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0].detach()))
             for i, m in enumerate(moe)]
    with rr.applied():
        seen = layer_logits(model, x)  # nested inside: sees layer 1's vector added
    for h in hooks:
        h.remove()
    with torch.no_grad():
        own = [moe[i].router.gating(inputs[i].reshape(-1, 16).double(), None).reshape(1, S, 4) for i in range(3)]
    assert torch.allclose(seen[0], own[0]) and torch.allclose(seen[2], own[2])
    assert torch.allclose(seen[1], own[1] + rr.deltas[1].detach())
