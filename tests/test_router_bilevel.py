"""moe_routing/routers/bilevel.py, losses/bilevel.py and the dispatcher's group layout: bi-level routing against a
naive loop in float64 (outputs, gradients of every router parameter, locality stats, the group balance loss)."""
import pytest
import torch

import moe_routing as mr
from reference import assert_output_and_grads_close, leaf, naive_moe, naive_softmax, top


def _naive(x, W, Wg, G, groups_per_token, k, normalize, home=None):
    """p_te = softmax_g(Wg x)_{g(e)} * softmax_{e' in g(e)}(W x)_e; top groups by their mass, top-k experts inside."""
    E = W.shape[0]
    per = E // G
    pairs, probs, away = [], [], []
    for t in range(x.shape[0]):
        pg = naive_softmax(torch.stack([Wg[g] @ x[t] for g in range(G)]))
        p = torch.cat([pg[g] * naive_softmax(torch.stack([W[g * per + j] @ x[t] for j in range(per)]))
                       for g in range(G)])
        groups = top([float(p[g * per:(g + 1) * per].detach().sum()) for g in range(G)], groups_per_token)
        allowed = [e for e in range(E) if e // per in groups]
        chosen = [allowed[i] for i in top([float(p[e].detach()) for e in allowed], k)]
        total = sum(p[e] for e in chosen)
        pairs += [(t, e, p[e] / total if normalize else p[e]) for e in chosen]
        probs.append(p)
        away.append([e // per != home for e in chosen])
    return pairs, torch.stack(probs), away


@pytest.mark.parametrize("T,E,G,gpt,k", [(1, 4, 2, 1, 1), (9, 8, 4, 1, 2), (11, 9, 3, 2, 4), (6, 6, 1, 1, 3)])
def test_layer_matches_naive_loop_with_gradients(T, E, G, gpt, k):
    torch.manual_seed(T + E + G + k)
    D = 7
    router = mr.BilevelRouter(D, E, k, num_groups=G, groups_per_token=gpt, home_group=G - 1)
    with torch.no_grad():  # decisive scores: no near-ties between the layer and the loop
        router.weight.normal_(0, 0.8)
        router.group_weight.normal_(0, 0.8)
    layer = mr.MoELayer(D, 5, E, k, router=router, return_aux_loss=True).double()
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    y, aux = layer(x)
    ex = [layer.experts.w_gate, layer.experts.w_up, layer.experts.w_down]
    params = [router.weight, router.group_weight]
    x_ref, ex_ref, p_ref = leaf(x), [leaf(p) for p in ex], [leaf(p) for p in params]
    pairs, p_TE, away = _naive(x_ref, *p_ref, G, gpt, k, normalize=k > 1, home=G - 1)
    y_ref = naive_moe(x_ref, ex_ref, pairs)
    assert_output_and_grads_close(y, y_ref, [x, *ex, *params], [x_ref, *ex_ref, *p_ref])
    flat = [a for row in away for a in row]
    assert layer.last_stats["cross_group_frac"].item() == pytest.approx(sum(flat) / len(flat))
    assert layer.last_stats["tokens_leaving_group"].item() == pytest.approx(sum(any(r) for r in away) / T)
    # SMILE's inter-node term: G * sum_g f_g P_g, f over routed pairs, P the mean group mass
    per = E // G
    f = [sum(1 for _, e, _ in pairs if e // per == g) / len(pairs) for g in range(G)]
    P = [float(p_TE[:, g * per:(g + 1) * per].detach().sum()) / T for g in range(G)]
    assert layer.last_stats["group_balance"].item() == pytest.approx(G * sum(a * b for a, b in zip(f, P)), rel=1e-9)


def test_one_group_per_token_keeps_every_token_on_one_node_and_scores_are_a_distribution():
    torch.manual_seed(0)
    r = mr.BilevelRouter(6, 12, 3, num_groups=4)
    d = r(torch.randn(40, 6))
    groups = d.experts_TK // 3
    assert (groups == groups[:, :1]).all()
    torch.testing.assert_close(d.scores_TE.sum(-1), torch.ones(40))
    torch.testing.assert_close(d.logits_TE.softmax(-1), d.scores_TE)
    assert "cross_group_frac" not in d.extra  # no home group, no locality stats


def test_group_layout_from_the_dispatcher():
    disp = mr.LocalDispatcher()
    group_E, home = mr.expert_groups(disp, 6, 1)
    assert group_E.tolist() == [0] * 6 and home == 0
    disp.rank, disp.size = 5, 8  # an expert-parallel layout: 8 ranks, 2 per node
    group_E, home = mr.expert_groups(disp, 16, 2)
    assert group_E.tolist() == [e // 4 for e in range(16)] and home == 2
    assert disp.expert_ranks(16).tolist() == [e // 2 for e in range(16)]
    r = mr.BilevelRouter.from_dispatcher(disp, 5, 16, 2, ranks_per_group=2)
    assert r.num_groups == 4 and r.home_group == 2
    assert r.group_of_expert().tolist() == group_E.tolist()
    with pytest.raises(ValueError, match="ranks_per_group"):
        mr.expert_groups(disp, 16, 3)


def test_replay_and_argument_checks():
    layer = mr.MoELayer(5, 3, 4, 2, router="bilevel", router_kwargs={"num_groups": 2}, layer_idx=0)
    forced = torch.tensor([[3, 0], [1, 2]])
    with mr.record_routing(layer) as rec:
        layer(torch.randn(2, 5), mr.RoutingContext(forced_experts={0: forced}))
    assert rec.experts_TLK[:, 0].long().tolist() == forced.tolist()
    with pytest.raises(ValueError, match="num_groups must divide"):
        mr.BilevelRouter(5, 6, 1, num_groups=4)
    with pytest.raises(ValueError, match="exceeds"):
        mr.BilevelRouter(5, 8, 3, num_groups=4)
    with pytest.raises(ValueError, match="home_group"):
        mr.BilevelRouter(5, 8, 1, num_groups=4, home_group=4)
    with pytest.raises(TypeError, match="groups_per_token"):
        mr.BilevelRouter(5, 8, 1, groups_per_token=True)
    with pytest.raises(ValueError, match="gate of exactly 1"):
        mr.BilevelRouter(5, 8, 1, normalize=True)
    with pytest.raises(ValueError, match="must divide"):
        mr.MoELayer(5, 3, 6, 1, router="topk", losses=[mr.GroupBalanceLoss(1e-2, 4)])(torch.randn(3, 5))
