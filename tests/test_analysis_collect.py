"""moe_routing/analysis/collect.py: routing analysis on models whose routing is known (a hash table set by hand,
replay of a known experts_TLK) gives the known answer; the divergence against scipy's Jensen-Shannon."""
import math

import pytest
import torch
from torch import nn

import moe_routing as mr
from moe_routing.analysis import collect_routing, normalized_js, plot_routing, routing_divergence

V, D, E = 12, 8, 4


class HashModel(nn.Module):
    """Embedding + MoE layers with hash routers whose tables are set by hand (``tables[l]`` int [V, K])."""

    def __init__(self, tables):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(V, D)
        K = tables[0].shape[1]
        self.layers = nn.ModuleList(mr.MoELayer(D, 16, E, K, router=mr.HashRouter(D, E, K, vocab_size=V))
                                    for _ in tables)
        for layer, table in zip(self.layers, tables):
            layer.router.expert_map.copy_(table)

    def forward(self, ids_BS):
        h = self.embed(ids_BS)
        with mr.routing_context(self, token_ids=ids_BS):
            for layer in self.layers:
                h = h + layer(h)
        return h


def _tables(K, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(V)]) for _ in range(2)]


def _batches(seed, n=3, B=2, S=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (B, S), generator=g) for _ in range(n)]


@pytest.mark.parametrize("K", [1, 2])
def test_load_coactivation_and_token_specialisation_match_the_hash_table(K):
    tables = _tables(K, seed=K)
    model = HashModel(tables).eval()
    batches = _batches(seed=3)
    col = collect_routing(model, batches)
    ids = torch.cat([b.reshape(-1) for b in batches])
    T = ids.numel()
    assert col.num_tokens == T and col.seq_lens == [5] * 6
    assert torch.equal(col.token_ids_T, ids)
    assert torch.equal(col.positions_T, torch.arange(5).repeat(6))
    for l, table in enumerate(tables):
        expect_TK = table[ids].sort(1).values
        assert torch.equal(col.experts_TLK[:, l], expect_TK)
        # naive loops from the definitions
        counts = torch.tensor([sum(int(e in table[v].tolist()) for v in ids.tolist()) for e in range(E)])
        assert torch.equal(col.expert_counts()[l], counts)
        assert torch.allclose(col.expert_load()[l], counts.double() / (T * K))
        co = torch.tensor([[sum(int(i in table[v].tolist() and j in table[v].tolist()) for v in ids.tolist())
                            for j in range(E)] for i in range(E)], dtype=torch.float64)
        assert torch.equal(col.coactivation()[l], co)
        cond = col.coactivation(normalize=True)[l]
        used = counts > 0
        assert torch.allclose(cond[used], co[used] / counts[used, None].double())
    spec = col.specialization("token", num_values=V)
    p_e = col.expert_load()
    for l in range(2):
        # naive: joint pairs over (expert, id)
        joint = torch.zeros(E, V, dtype=torch.float64)
        for v in ids.tolist():
            for e in tables[l][v].tolist():
                joint[e, v] += 1
        assert torch.equal(spec.joint_LEV[l], joint)
        p = joint / joint.sum()
        pv, pe = p.sum(0), p.sum(1)
        mi = sum(float(p[e, v]) * math.log(float(p[e, v] / (pe[e] * pv[v]))) for e in range(E) for v in range(V)
                 if p[e, v] > 0)
        he = -sum(float(x) * math.log(float(x)) for x in pe if x > 0)
        assert spec.mutual_info_L[l].item() == pytest.approx(mi, abs=1e-12)
        assert spec.score_L[l].item() == pytest.approx(mi / he, abs=1e-12)
        # the weighted per-expert KL adds up to the mutual information
        assert (p_e[l] * spec.score_LE[l]).sum().item() == pytest.approx(mi, abs=1e-12)
        if K == 1:  # the expert is a function of the token id: U = 1, KL_e = -log P(e)
            assert spec.score_L[l].item() == pytest.approx(1.0, abs=1e-12)
            for e in range(E):
                if p_e[l, e] > 0:
                    assert spec.score_LE[l, e].item() == pytest.approx(-math.log(p_e[l, e].item()), abs=1e-12)


def test_position_specialisation_when_the_id_is_the_position():
    # ids = positions, so position specialisation equals token specialisation: U = 1 at K = 1
    model = HashModel(_tables(1, seed=5)).eval()
    col = collect_routing(model, [torch.arange(V).repeat(3, 1)])
    pos, tok = col.specialization("position"), col.specialization("token")
    assert torch.equal(pos.joint_LEV, tok.joint_LEV)
    assert torch.allclose(pos.score_L, torch.ones(2, dtype=torch.float64))


def test_independent_routing_has_zero_specialisation():
    # every id sent to every expert equally often (K = E): no information about the id in the expert
    tables = [torch.arange(E).repeat(V, 1) for _ in range(2)]
    col = collect_routing(HashModel(tables).eval(), _batches(seed=1))
    spec = col.specialization("token")
    assert torch.allclose(spec.score_L, torch.zeros(2, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(col.coactivation(normalize=True), torch.ones(2, E, E, dtype=torch.float64))


def test_collect_reads_a_replayed_routing_exactly():
    torch.manual_seed(0)
    layers = nn.Sequential(*[mr.MoELayer(D, 16, E, 2) for _ in range(3)]).eval()
    ids = torch.randint(0, V, (2, 6))
    embed = nn.Embedding(V, D)
    g = torch.Generator().manual_seed(7)
    known_TLK = torch.stack([torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(3)])
                             for _ in range(12)]).sort(2).values

    def forward(model, batch):
        with mr.replay_routing(model, known_TLK):
            return model(embed(batch))

    col = collect_routing(layers, [ids], forward=forward)
    assert torch.equal(col.experts_TLK, known_TLK)
    assert col.scores_TLE.shape == (12, 3, E)
    assert torch.allclose(col.scores_TLE.sum(2), torch.ones(12, 3))


def test_relu_router_collects_a_routing_map():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(V, D), mr.MoELayer(D, 16, E, 2, router="relu")).eval()
    col = collect_routing(model, [torch.randint(0, V, (2, 4))])
    assert col.experts_TLK is None and col.routing_map_TLE.shape == (8, 1, E)
    assert torch.equal(col.expert_counts()[0], col.routing_map_TLE[:, 0].sum(0))


def _entropy(p):
    return -(p[p > 0] * p[p > 0].log()).sum().item()


def test_normalized_js_against_scipy():
    """Bandarkar et al.'s D_H-JS = JSD / (log E - (H(p) + H(q)) / 2), with scipy's JSD (natural log)."""
    distance = pytest.importorskip("scipy.spatial.distance")
    g = torch.Generator().manual_seed(0)
    for n in (2, 3, 7, 64):
        for _ in range(10):
            p = torch.rand(n, generator=g, dtype=torch.float64) ** 3
            q = torch.rand(n, generator=g, dtype=torch.float64) ** 3
            p[0] = 0  # a zero entry
            p, q = p / p.sum(), q / q.sum()
            jsd = distance.jensenshannon(p.numpy(), q.numpy()) ** 2
            room = math.log(n) - (_entropy(p) + _entropy(q)) / 2
            assert normalized_js(p, q).item() == pytest.approx(jsd / room, rel=1e-9)
            assert 0 <= normalized_js(p, q).item() <= 1
    # disjoint one-hot: log 2 / log E (1 only at E = 2, where the mixture is uniform)
    assert normalized_js(torch.tensor([1.0, 0]), torch.tensor([0.0, 1])).item() == pytest.approx(1.0)
    one_hot = torch.eye(4, dtype=torch.float64)
    assert normalized_js(one_hot[0], one_hot[1]).item() == pytest.approx(0.5)
    assert normalized_js(torch.tensor([1.0, 0]), torch.tensor([1.0, 0])).item() == 0.0
    uniform = torch.full((5,), 0.2, dtype=torch.float64)
    assert normalized_js(uniform, uniform).item() == 0.0  # no room below log E: defined as 0
    # batched over leading dimensions like the per-sequence, per-layer use
    a, b = torch.rand(3, 2, 6, generator=g).softmax(-1), torch.rand(3, 2, 6, generator=g).softmax(-1)
    assert normalized_js(a, b).shape == (3, 2)
    assert torch.allclose(normalized_js(a, b)[1, 0], normalized_js(a[1, 0], b[1, 0]))


def test_routing_divergence_known_answers():
    # layer 0 maps every id to expert 0 or 1 by id parity; layer 1 sends every id to expert 2 (E = 4)
    t0 = (torch.arange(V) % 2)[:, None]
    t1 = torch.full((V, 1), 2)
    model = HashModel([t0, t1]).eval()
    even = collect_routing(model, [torch.tensor([[0, 2, 4], [6, 8, 10]])])
    odd = collect_routing(model, [torch.tensor([[1, 3, 5], [7, 9, 11]])])
    mixed = collect_routing(model, [torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])])
    assert torch.allclose(routing_divergence(even, even), torch.zeros(2, dtype=torch.float64))
    # even vs odd: disjoint one-hot in layer 0: JSD = log 2 over log E - 0 = log 4; identical in layer 1 (0)
    assert torch.allclose(routing_divergence(even, odd), torch.tensor([0.5, 0.0], dtype=torch.float64))
    # a half/half sequence against an all-expert-0 one: (H(M) - log 2 / 2) / (log 4 - log 2 / 2), M = (3/4, 1/4)
    m = torch.tensor([0.75, 0.25], dtype=torch.float64)
    h_m = -(m * m.log()).sum().item()
    expect = (h_m - math.log(2) / 2) / (math.log(4) - math.log(2) / 2)
    assert routing_divergence(even, mixed)[0].item() == pytest.approx(expect, rel=1e-12)
    with pytest.raises(ValueError, match="paired=True needs as many sequences"):
        routing_divergence(even, collect_routing(model, [torch.tensor([[0, 2]])]))
    unpaired = routing_divergence(even, collect_routing(model, [torch.tensor([[1, 3]])]), paired=False)
    assert unpaired[0].item() == pytest.approx(0.5)


def test_bad_input():
    model = HashModel(_tables(1, 0)).eval()
    with pytest.raises(TypeError, match="integer tensor of token ids"):
        collect_routing(model, [torch.randn(2, 3)])
    with pytest.raises(ValueError, match="empty"):
        collect_routing(model, [])
    with pytest.raises(TypeError, match="keep_scores"):
        collect_routing(model, _batches(0), keep_scores=1)
    col = collect_routing(model, _batches(0), keep_scores=False)
    with pytest.raises(ValueError, match="kind must be"):
        col.specialization("layer")
    with pytest.raises(ValueError, match="num_values"):
        col.specialization("token", num_values=3)
    with pytest.raises(ValueError, match="keep_scores=True"):
        routing_divergence(col, col)


def test_plot_routing_writes_heatmaps(tmp_path):
    pytest.importorskip("matplotlib")
    model = HashModel(_tables(2, 1)).eval()
    a, b = collect_routing(model, _batches(1)), collect_routing(model, _batches(2))
    paths = plot_routing(a, tmp_path / "plots", other=b)
    assert [p.name for p in paths] == ["load.png", "coactivation.png", "positions.png", "divergence.png"]
    assert all(p.stat().st_size > 1000 for p in paths)
