"""moe_routing/losses/erc.py: the ERC loss against a loop per proxy / expert / coordinate (values and
gradients), in a layer (its statistics, bf16, activation checkpointing, skipped in eval and no_grad), chunked
against unchunked, the default chunks bounding the float32 copy of bf16 gates, eps of a nearly collapsed router,
and argument checks. The reference shares no code with `moe_routing.losses`."""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import moe_routing as mr
from moe_routing import SwitchAuxLoss
from moe_routing.losses.erc import ERCLoss, erc_loss

f64 = torch.float64


def naive_erc(R, W, alpha, seed):
    """ERC by loops: eps from pairwise distances, the same uniform draw as documented, M element by element."""
    E, D = R.shape
    Fh = W.shape[2]
    Rd = R.detach()
    eps = []
    for i in range(E):
        dists = [math.sqrt(sum((Rd[i, d].item() - Rd[j, d].item()) ** 2 for d in range(D)))
                 for j in range(E) if j != i]
        norm = math.sqrt(sum(Rd[i, d].item() ** 2 for d in range(D)))
        eps.append(min(dists) / (2 * norm) if dists else 0.0)
    u = torch.rand(E, D, generator=torch.Generator().manual_seed(seed), dtype=f64)
    proxy = [[R[i, d] * (1 + eps[i] * (2 * u[i, d].item() - 1)) for d in range(D)] for i in range(E)]
    M = [[None] * E for _ in range(E)]
    for i in range(E):
        for j in range(E):
            sq = 0.0
            for f in range(Fh):
                h = sum(proxy[i][d] * W[j, d, f] for d in range(D))
                sq = sq + h * h
            M[i][j] = torch.sqrt(sq)
    total = 0.0
    for i in range(E):
        for j in range(E):
            if j != i:
                total = total + torch.relu(M[i][j] - alpha * M[i][i]) + torch.relu(M[j][i] - alpha * M[i][i])
    return total / E ** 2, eps, M


@pytest.mark.parametrize("E,D,Fh,alpha", [(5, 7, 3, 1.0), (4, 3, 5, 0.6), (2, 1, 2, 1.0)])
def test_erc_matches_naive_loop_with_gradients(E, D, Fh, alpha):
    gen = torch.Generator().manual_seed(E)
    R = torch.randn(E, D, generator=gen, dtype=f64, requires_grad=True)
    W = torch.randn(E, D, Fh, generator=gen, dtype=f64, requires_grad=True)
    loss = erc_loss(R, W, alpha, generator=torch.Generator().manual_seed(7))
    R2, W2 = R.detach().clone().requires_grad_(), W.detach().clone().requires_grad_()
    ref, _, _ = naive_erc(R2, W2, alpha, seed=7)
    assert ref.item() > 0
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-14)
    grads = torch.autograd.grad(loss, [R, W])
    grads_ref = torch.autograd.grad(ref, [R2, W2])
    for g, r in zip(grads, grads_ref):
        assert r.abs().sum() > 0
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_erc_in_layer_matches_naive_and_logs_stats():
    torch.manual_seed(0)
    E, D, Fh = 6, 9, 4
    layer = mr.MoELayer(D, Fh, E, 2, losses=[ERCLoss(0.7, generator=torch.Generator().manual_seed(3))],
                        return_aux_loss=True).double()
    with torch.no_grad():
        layer.router.weight.normal_(0, 0.5)
    x = torch.randn(1, D, dtype=f64)  # one token: most experts receive none; ERC does not care
    _, aux = layer(x)
    ref, eps, M = naive_erc(layer.router.weight.detach(), layer.experts.w_gate.detach(), 1.0, seed=3)
    assert aux.item() == pytest.approx(0.7 * ref.item(), rel=1e-12)
    stats = layer.last_stats
    assert stats["erc_eps_mean"].item() == pytest.approx(sum(eps) / E, rel=1e-12)
    assert stats["erc_act_own"].item() == pytest.approx(sum(M[i][i].item() for i in range(E)) / E, rel=1e-12)
    router_norm = sum(math.sqrt(sum(v * v for v in row)) for row in layer.router.weight.tolist()) / E
    assert stats["erc_router_norm"].item() == pytest.approx(router_norm, rel=1e-12)
    gate_norm = sum(math.sqrt(sum(v * v for v in layer.experts.w_gate[j].flatten().tolist())) for j in range(E)) / E
    assert stats["erc_gate_norm"].item() == pytest.approx(gate_norm, rel=1e-12)
    assert not hasattr(layer.losses[0], "last_stats")  # statistics travel with the value, not on the loss
    assert "erc_eps_mean" in mr.routing_report(layer)["<root>"]


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_erc_zero_for_perfectly_coupled_experts(alpha):
    """Rows R[i] = c_i e_i and gates W_g^j nonzero only in input row j: R~[i] W_g^j = 0 for j != i whatever the
    (coordinate-wise) noise, so M is diagonal and every hinge is inactive."""
    E, D, Fh = 4, 6, 5
    gen = torch.Generator().manual_seed(1)
    R = torch.zeros(E, D, dtype=f64)
    W = torch.zeros(E, D, Fh, dtype=f64)
    for i in range(E):
        R[i, i] = 0.5 + i
        W[i, i] = torch.randn(Fh, generator=gen, dtype=f64)
    R.requires_grad_(True)
    W.requires_grad_(True)
    loss = erc_loss(R, W, alpha, generator=torch.Generator().manual_seed(2))
    assert loss.item() == 0.0
    gR, gW = torch.autograd.grad(loss, [R, W])
    assert torch.isfinite(gR).all() and torch.isfinite(gW).all()
    with torch.no_grad():  # break the coupling: expert 0's gate also reads coordinate 1 (proxy 1's)
        W[0, 1] = 3.0 * W[1, 1].norm() * torch.ones(Fh, dtype=f64)
    assert erc_loss(R, W, alpha, generator=torch.Generator().manual_seed(2)).item() > 0.1


def test_erc_chunked_equals_unchunked_and_gradchecks():
    gen = torch.Generator().manual_seed(4)
    R = torch.randn(7, 5, generator=gen, dtype=f64, requires_grad=True)
    W = torch.randn(7, 5, 3, generator=gen, dtype=f64, requires_grad=True)
    # the checkpointed chunks vs finite differences in w_gate (in R they would also see eps move: eps is
    # detached by design, so R's gradient is checked against the naive loop instead)
    assert torch.autograd.gradcheck(
        lambda w: erc_loss(R.detach(), w, chunk_size=3, generator=torch.Generator().manual_seed(0)), (W,))
    full = erc_loss(R, W, chunk_size=7, generator=torch.Generator().manual_seed(0))
    g_full = torch.autograd.grad(full, [R, W])
    for chunk in (1, 2, 3, None):
        part = erc_loss(R, W, chunk_size=chunk, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(part, full, rtol=1e-13, atol=0)
        for g, r in zip(torch.autograd.grad(part, [R, W]), g_full):
            torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-14)


def test_erc_gradients_reach_router_and_gates_only_through_aux():
    torch.manual_seed(5)
    layer = mr.MoELayer(8, 6, 4, 2, losses=[ERCLoss(chunk_size=3)], return_aux_loss=True)
    with torch.no_grad():
        layer.router.weight.normal_(0, 0.3)
    _, aux = layer(torch.randn(5, 8))
    assert aux.item() > 0
    aux.backward()
    assert layer.router.weight.grad.abs().sum() > 0
    assert layer.experts.w_gate.grad.abs().sum() > 0
    assert layer.experts.w_up.grad is None and layer.experts.w_down.grad is None


def test_erc_injected_in_layer_bf16_and_under_checkpoint():
    torch.manual_seed(6)
    layer = mr.MoELayer(9, 5, 4, 2, losses=[SwitchAuxLoss(), ERCLoss(chunk_size=2)]).to(torch.bfloat16)
    assert layer.router.weight.dtype == torch.float32 and layer.experts.w_gate.dtype == torch.bfloat16
    x = torch.randn(3, 5, 9, dtype=torch.bfloat16, requires_grad=True)
    checkpoint(layer, x, use_reentrant=False).float().sum().backward()
    assert layer.last_aux_losses["erc"].dtype == torch.float32 and layer.last_aux_losses["erc"].item() > 0
    assert torch.isfinite(layer.router.weight.grad).all() and layer.experts.w_gate.grad.abs().sum() > 0
    assert x.grad is not None and torch.isfinite(x.grad.float()).all()


def test_erc_skipped_in_eval_and_no_grad_without_drawing_noise():
    gen = torch.Generator().manual_seed(9)
    loss = ERCLoss(generator=gen)
    layer = mr.MoELayer(8, 4, 4, 2, losses=[loss], return_aux_loss=True)
    state = gen.get_state()
    with torch.no_grad():
        assert layer(torch.randn(3, 8))[1].item() == 0.0
    layer.eval()
    assert layer(torch.randn(3, 8))[1].item() == 0.0
    assert torch.equal(gen.get_state(), state) and "erc_eps_mean" not in layer.last_stats
    layer.train()
    assert layer(torch.randn(3, 8))[1].item() > 0
    assert not torch.equal(gen.get_state(), state)


def test_erc_single_expert_is_zero():
    layer = mr.MoELayer(4, 3, 1, 1, losses=[ERCLoss()], return_aux_loss=True)
    _, aux = layer(torch.randn(2, 4))
    assert aux.item() == 0.0
    assert layer.last_stats["erc_eps_mean"].item() == 0.0


def test_erc_bad_arguments():
    with pytest.raises(ValueError, match="alpha"):
        ERCLoss(alpha=-0.1)
    with pytest.raises(ValueError, match="chunk_size"):
        ERCLoss(chunk_size=0)
    with pytest.raises(TypeError, match="generator"):
        ERCLoss(generator=0)
    with pytest.raises(ValueError, match="coeff"):
        ERCLoss(coeff=-1.0)
    with pytest.raises(TypeError, match="w_gate"):
        mr.MoELayer(8, 4, 4, 2, activation="gelu", losses=[ERCLoss()])(torch.randn(2, 8))
    with pytest.raises(ValueError, match=r"w_gate must have shape \[E, D, F\] = \[4, 8, F\]"):
        erc_loss(torch.randn(4, 8), torch.randn(4, 7, 3))
    with pytest.raises(ValueError, match="router weight must have 2 dims"):
        erc_loss(torch.randn(4), torch.randn(4, 7, 3))


def test_erc_default_chunks_bound_the_cast_copy_of_bf16_gates(monkeypatch):
    """bf16 gates are cast to float32 per chunk; the default chunk size must count that [chunk, D, F] copy, or
    with D >> E one unchunked einsum keeps an fp32 copy of every gate alive until backward (2x the bf16
    weights per layer). Budget shrunk so the small case behaves like a real layer (E=64, D=4096, F=1408)."""
    import moe_routing.losses.erc as erc_mod
    E, D, Fh = 4, 256, 16
    monkeypatch.setattr(erc_mod, "_CHUNK_BUDGET", 2 * Fh * (E + D))  # room for two experts' activations + copy
    gen = torch.Generator().manual_seed(11)
    R = torch.randn(E, D, generator=gen, requires_grad=True)
    W = (0.1 * torch.randn(E, D, Fh, generator=gen)).bfloat16().requires_grad_(True)
    saved = []

    def pack(t):
        saved.append(t.numel() if t.dtype == torch.float32 else 0)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = erc_loss(R, W, generator=torch.Generator().manual_seed(0))
    assert max(saved) < E * D * Fh // 2, saved  # no float32 copy of (half of) the gates kept for backward
    ref = erc_loss(R, W.float(), chunk_size=E, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)
    gR, gW = torch.autograd.grad(loss, [R, W])
    gR_ref, gW_ref = torch.autograd.grad(ref, [R, W])
    torch.testing.assert_close(gR, gR_ref, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(gW, gW_ref)


def test_erc_eps_accurate_for_a_nearly_collapsed_router():
    """Rows 1e-3 apart relative to their norm (a near-collapsed router): eps from a float32 Gram matrix was
    ~15% off (cancellation in |a|^2 + |b|^2 - 2ab); now it matches the float64 loop to 1e-4."""
    from moe_routing.losses.erc import erc_eps
    gen = torch.Generator().manual_seed(12)
    E, D = 6, 512
    common = torch.randn(1, D, generator=gen)
    R = common + 1e-3 * common.norm() * torch.randn(E, D, generator=gen) / math.sqrt(D)
    rows = R.double().tolist()
    eps_ref = [min(math.dist(rows[i], rows[j]) for j in range(E) if j != i) / (2 * math.hypot(*rows[i]))
               for i in range(E)]
    got = erc_eps(R)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), torch.tensor(eps_ref, dtype=f64), rtol=1e-4, atol=0)
