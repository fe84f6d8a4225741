"""moe_routing/routers/blockffn.py: BlockFFN's ReLU + RMSNorm router against a naive loop in float64 (outputs and
gradients), its token- and chunk-level sparsity stats (from [B, S, D] inputs and seq_lens, with padding), the
adaptive CSL coefficient against a step-by-step restatement of the authors' scheduler (pooled over layers,
training only, through mr.step) and argument checks. The losses themselves: test_losses_blockffn.py."""
import math

import pytest
import torch
import torch.nn.functional as F

import moe_routing as mr
from reference import assert_output_and_grads_close


def _naive_blockffn_layer(x_TD, w_r, g_E, eps, w_gate, w_up, w_down):
    """y_t = sum_{e: l_te > 0} A_te SwiGLU_e(x_t), A_t = g * r_t / sqrt(mean_e r_te^2 + eps), r = relu(l)."""
    out = []
    for t in range(x_TD.shape[0]):
        logits = [w_r[e] @ x_TD[t] for e in range(w_r.shape[0])]
        r = [torch.relu(v) for v in logits]
        rms = torch.sqrt(sum(v * v for v in r) / len(r) + eps)
        acc = torch.zeros_like(x_TD[t])
        for e in range(w_r.shape[0]):
            if logits[e] > 0:
                acc = acc + g_E[e] * r[e] / rms * ((F.silu(x_TD[t] @ w_gate[e]) * (x_TD[t] @ w_up[e])) @ w_down[e])
        out.append(acc)
    return torch.stack(out)


def test_layer_matches_naive_loop_with_gradients():
    torch.manual_seed(0)
    layer = mr.MoELayer(7, 5, 6, 2, router="blockffn", losses=[]).double()
    with torch.no_grad():
        layer.router.weight[3] = 0.0  # an expert no token reaches
        layer.router.norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(9, 7, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    params = [layer.router.weight, layer.router.norm.weight, layer.experts.w_gate, layer.experts.w_up,
              layer.experts.w_down]
    leaves = [p.detach().clone().requires_grad_() for p in params]
    x_ref = x.detach().clone().requires_grad_()
    y_ref = _naive_blockffn_layer(x_ref, leaves[0], leaves[1], 1e-6, *leaves[2:])
    assert_output_and_grads_close(y, y_ref, [x, *params], [x_ref, *leaves])
    assert layer.last_stats["tokens_per_expert"][3] == 0


def _naive_sparsity(active, seqs, valid, L):
    """TLS, CLS from per-token active expert sets: chunks of L positions of each sequence, padding unused."""
    E = active.shape[1]
    toks = [t for t in range(active.shape[0]) if valid[t]]
    tls = 1 - sum(int(active[t].sum()) for t in toks) / (len(toks) * E)
    unused, count = 0, 0
    for seq in seqs:
        for c in range(0, len(seq), L):
            real = [t for t in seq[c:c + L] if valid[t]]
            if real:
                used = set(e for t in real for e in range(E) if active[t, e])
                unused += E - len(used)
                count += E
    return tls, unused / count


@pytest.mark.parametrize("how", ["batch", "seq_lens", "flat"])
def test_tls_and_cls_match_naive_loop(how):
    torch.manual_seed(4)
    E, L = 6, 3
    layer = mr.MoELayer(5, 4, E, 2, router=mr.BlockFFNRouter(5, E, 2, stats_chunk_len=L))
    with torch.no_grad():
        layer.router.weight.normal_(0, 1.0)
    pad = torch.zeros(2, 8, dtype=torch.bool)
    pad[0, 6:] = True
    pad[1, 2] = True
    x = torch.randn(2, 8, 5)
    if how == "batch":
        layer(x, mr.RoutingContext(padding_mask=pad))
        seqs, valid = [list(range(8)), list(range(8, 16))], (~pad).reshape(-1).tolist()
    elif how == "seq_lens":
        layer(x.reshape(16, 5), mr.RoutingContext(seq_lens=[5, 1, 10]))
        seqs, valid = [list(range(5)), [5], list(range(6, 16))], [True] * 16
    else:
        layer(x.reshape(16, 5))
        seqs, valid = [list(range(16))], [True] * 16
    active = x.reshape(16, 5) @ layer.router.weight.detach().t() > 0
    tls, cls = _naive_sparsity(active, seqs, valid, L)
    assert layer.last_stats["tls"].item() == pytest.approx(tls, abs=1e-12)
    assert layer.last_stats["cls"].item() == pytest.approx(cls, abs=1e-12)
    report = mr.routing_report(layer)["<root>"]
    assert report["cls"] == pytest.approx(cls) and report["tls"] == pytest.approx(tls)


def test_any_router_reports_tls_and_cls_when_asked():
    torch.manual_seed(1)
    layer = mr.MoELayer(5, 4, 4, 1)
    layer(torch.randn(2, 6, 5))
    assert "cls" not in layer.last_stats
    layer.router.stats_chunk_len = 2
    x = torch.randn(2, 6, 5)
    layer(x)
    experts = (x.reshape(12, 5) @ layer.router.weight.detach().t()).argmax(-1)
    active = torch.nn.functional.one_hot(experts, 4).bool()
    tls, cls = _naive_sparsity(active, [list(range(6)), list(range(6, 12))], [True] * 12, 2)
    assert tls == pytest.approx(0.75)
    assert layer.last_stats["tls"].item() == pytest.approx(tls)
    assert layer.last_stats["cls"].item() == pytest.approx(cls)


class _Scheduler:
    """The authors' AdaptiveLinearScheduler restated, one call per optimizer step (accumulation 1): the value in
    force after ``step`` has seen that step's loss."""

    def __init__(self, start, stable, window, max_factor, min_factor):
        self.init, self.stable, self.window = start, stable, window
        self.max_factor, self.min_factor = max_factor, min_factor
        self.prev, self.cur = [], []
        self.base, self.ratio, self.pos = start, 1.0, 0  # linear ramp base -> base * ratio over `window` steps

    def value(self):
        return self.base * (self.ratio + (1 - self.ratio) * (1 - min(1, self.pos / self.window)))

    def step(self, i, loss):
        self.cur.append(loss)
        lo = sum(self.prev) / len(self.prev) if self.prev else -1
        hi = sum(self.cur) / len(self.cur)
        if i % self.window == 0:
            self.prev, self.cur = self.cur, []
        if i >= self.stable and i % self.window == 0:
            now = self.value()
            r = hi / lo
            r = max(self.min_factor, r) if r > 1 else r
            r = min(self.init * self.max_factor / now, r)
            self.base, self.ratio, self.pos = now, r, 0
        self.pos += 1
        return self.value()


def test_csl_controller_follows_the_authors_scheduler():
    r = mr.BlockFFNRouter(4, 3, 1, csl_coeff_init=0.05, csl_stable_steps=6, csl_window=3, csl_min_factor=1.025,
                          csl_max_factor=4.0)
    ref = _Scheduler(0.05, 6, 3, 4.0, 1.025)
    g = torch.Generator().manual_seed(0)
    # rising, then falling CSL (both directions of the ratio), and a rise large enough to hit the 4x ceiling
    losses = ([0.5 + 0.02 * i for i in range(12)] + [0.8 - 0.03 * i for i in range(9)]
              + [0.5 * 1.8 ** i for i in range(12)])
    for i, loss in enumerate(losses, start=1):
        noisy = loss * (1 + 0.01 * float(torch.rand((), generator=g)))
        # two layers' samples for this step, pooled: mean = noisy
        stats = torch.tensor([2 * noisy, 2.0], dtype=torch.float64)
        mr.BlockFFNRouter.apply_step([r], [stats])
        assert r.csl_coeff.item() == pytest.approx(ref.step(i, noisy), rel=1e-6), i
    assert r.csl_coeff.item() == pytest.approx(0.2, rel=1e-6)  # at the ceiling csl_max_factor * lambda_0
    assert r.csl_accum.tolist() == [0.0, 0.0]


def test_controller_pools_layers_counts_training_only_and_round_trips():
    torch.manual_seed(2)
    kw = dict(csl_stable_steps=0, csl_window=1)
    model = torch.nn.Sequential(mr.MoELayer(8, 4, 4, 1, router="blockffn", router_kwargs=kw),
                                mr.MoELayer(8, 4, 4, 1, router="blockffn", router_kwargs=kw))
    x = torch.randn(2, 5, 8)
    model.eval()
    with torch.no_grad():
        model(x)
    assert model[0].router.csl_accum.tolist() == [0.0, 0.0]  # eval forwards are not counted
    model.train()
    model(x).sum().backward()
    csl = [layer.last_stats["csl"].item() for layer in model]
    assert model[0].router.csl_accum[1].item() == 1 and model[1].router.csl_accum[1].item() == 1
    mr.step(model)  # first window: no previous mean, lambda stays
    assert model[0].router.csl_window_stats[2].item() == pytest.approx(sum(csl) / 2)
    model(x * 3).sum().backward()
    csl2 = [layer.last_stats["csl"].item() for layer in model]
    mr.step(model)
    ratio = (sum(csl2) / 2) / (sum(csl) / 2)
    ratio = max(1.025, ratio) if ratio > 1 else ratio
    expected = 0.05 * min(4.0, ratio)
    for layer in model:  # one pooled value for every layer
        assert layer.router.csl_coeff.item() == pytest.approx(expected, rel=1e-6)
    state = model.state_dict()
    fresh = torch.nn.Sequential(mr.MoELayer(8, 4, 4, 1, router="blockffn", router_kwargs=kw),
                                mr.MoELayer(8, 4, 4, 1, router="blockffn", router_kwargs=kw))
    fresh.load_state_dict(state)
    assert fresh[1].router.csl_coeff.item() == pytest.approx(expected, rel=1e-6)
    assert fresh[1].router.csl_steps.item() == 2


def test_fixed_coefficient_and_float32_under_bf16():
    r = mr.BlockFFNRouter(4, 3, 1, csl_adaptive=False)
    assert r.step_statistics() is None
    r.to(torch.bfloat16)
    assert r.weight.dtype == torch.float32 and r.norm.weight.dtype == torch.float32
    assert r.csl_coeff.dtype == torch.float32


def test_replay_is_refused():
    layer = mr.MoELayer(4, 3, 3, 1, router="blockffn", layer_idx=0)
    ctx = mr.RoutingContext(forced_experts={0: torch.zeros(5, 1, dtype=torch.long)})
    with pytest.raises(ValueError, match="does not support forced_experts"):
        layer(torch.randn(5, 4), ctx)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(stats_chunk_len=0), ValueError, "stats_chunk_len"),
    (dict(stats_chunk_len=True), TypeError, "stats_chunk_len"),
    (dict(norm_eps=0.0), ValueError, "norm_eps"),
    (dict(csl_coeff_init=math.nan), ValueError, "csl_coeff_init"),
    (dict(csl_adaptive=1), TypeError, "csl_adaptive must be a bool"),
    (dict(csl_stable_steps=-1), ValueError, "csl_stable_steps"),
    (dict(csl_window=0), ValueError, "csl_window"),
    (dict(csl_min_factor=0.9), ValueError, "csl_min_factor"),
    (dict(csl_max_factor=math.inf), ValueError, "csl_max_factor"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        mr.BlockFFNRouter(4, 3, 1, **kwargs)
