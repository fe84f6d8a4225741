"""moe_routing/losses/blockffn.py: BlockFFN's activation locality loss (ALL) and chunk sparsification loss (CSL)
against naive per-token / per-chunk loops in float64 (values and gradients), with several sequences, partial
chunks and padding; the adaptive coefficient read from the router; the losses inside MoELayer."""
import math

import pytest
import torch

import moe_routing as mr
from moe_routing.losses.blockffn import activation_locality_loss, chunk_sparsification_loss


def _sequences(lens):
    return torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))


def _naive_all(logits, seq, valid, a):
    """mean over neighbour pairs of one sequence (both real tokens) and experts of
    -[y log s(a l_prev) + (1-y) log(1 - s(a l_prev))], y = s(a l_cur)."""
    total, count = 0.0, 0
    for t in range(1, logits.shape[0]):
        if seq[t] != seq[t - 1] or not (valid[t] and valid[t - 1]):
            continue
        for e in range(logits.shape[1]):
            q, y = torch.sigmoid(a * logits[t - 1, e]), torch.sigmoid(a * logits[t, e])
            total = total - (y * torch.log(q) + (1 - y) * torch.log(1 - q))
            count += 1
    return total / max(count, 1)


def _naive_probs(l_E, eps):
    r = [torch.relu(v) for v in l_E]
    rms = torch.sqrt(sum(v * v for v in r) / len(r) + eps)
    ori = [v / rms for v in r]
    s = sum(ori)
    return [v / (s + 1e-5) for v in ori]


def _naive_csl(logits, seq, valid, L, eps=1e-6):
    """1 - mean over chunks (L consecutive positions of one sequence, with a real token) and experts of
    prod over the chunk's real tokens of (1 - p + 1e-5)."""
    T, E = logits.shape
    probs = [_naive_probs(logits[t], eps) for t in range(T)]
    starts = [t for t in range(T) if t == 0 or seq[t] != seq[t - 1]]
    total, count = 0.0, 0
    for i, s in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else T
        for c in range(s, end, L):
            toks = [t for t in range(c, min(c + L, end)) if valid[t]]
            if not toks:
                continue
            for e in range(E):
                keep = 1.0
                for t in toks:
                    keep = keep * (1 - probs[t][e] + 1e-5)
                total = total + (1 - keep)
                count += 1
    return total / max(count, 1)


@pytest.mark.parametrize("lens,pad", [([13], None), ([5, 9, 1, 7], None), ([6, 10], [3, 4, 15])])
def test_activation_locality_loss_matches_naive_loop(lens, pad):
    torch.manual_seed(len(lens))
    T, E = sum(lens), 5
    logits = (torch.randn(T, E, dtype=torch.float64) * 0.03).requires_grad_()
    seq = _sequences(lens)
    valid = torch.ones(T, dtype=torch.bool)
    if pad:
        valid[pad] = False
    got = activation_locality_loss(logits, seq if len(lens) > 1 else None, None if pad is None else valid, 100.0)
    ref_in = logits.detach().clone().requires_grad_()
    ref = _naive_all(ref_in, seq.tolist(), valid.tolist(), 100.0)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    g, = torch.autograd.grad(got, logits)
    g_ref, = torch.autograd.grad(ref, ref_in)
    torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-12)


def test_activation_locality_loss_without_pairs_is_zero():
    logits = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert activation_locality_loss(logits[:1]).item() == 0.0
    # three one-token sequences: no neighbour pair
    assert activation_locality_loss(logits, torch.arange(3)).item() == 0.0


@pytest.mark.parametrize("lens,L,pad", [([13], 4, None), ([5, 9, 1, 7], 3, None), ([6, 10], 4, [3, 4, 5, 15]),
                                        ([8], 8, list(range(8)))])
def test_chunk_sparsification_loss_matches_naive_loop(lens, L, pad):
    torch.manual_seed(L + len(lens))
    T, E = sum(lens), 6
    logits = torch.randn(T, E, dtype=torch.float64, requires_grad=True)
    seq = _sequences(lens)
    valid = torch.ones(T, dtype=torch.bool)
    if pad:
        valid[pad] = False
    got = chunk_sparsification_loss(logits, L, seq, len(lens), None if pad is None else valid)
    ref_in = logits.detach().clone().requires_grad_()
    ref = _naive_csl(ref_in, seq.tolist(), valid.tolist(), L)
    if not isinstance(ref, torch.Tensor):  # every token padding: no chunk
        assert got.item() == 0.0
        return
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    g, = torch.autograd.grad(got, logits)
    g_ref, = torch.autograd.grad(ref, ref_in)
    torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-12)


def test_chunk_sparsification_loss_single_sequence_default_and_bounds():
    torch.manual_seed(3)
    logits = torch.randn(10, 4, dtype=torch.float64)
    one = chunk_sparsification_loss(logits, 4)
    assert one.item() == pytest.approx(chunk_sparsification_loss(logits, 4, torch.zeros(10, dtype=torch.long)).item())
    # larger chunks use more experts; one-token chunks: mean p = 1/E when every token has an active expert
    assert chunk_sparsification_loss(logits, 10) > chunk_sparsification_loss(logits, 1)
    assert chunk_sparsification_loss(logits.abs(), 1).item() == pytest.approx(1 / 4, abs=1e-4)


def test_losses_inside_the_layer_with_the_routers_adaptive_coefficient():
    torch.manual_seed(0)
    layer = mr.MoELayer(8, 4, 6, 2, router="blockffn", return_aux_loss=True).double()
    assert [type(l).__name__ for l in layer.losses] == ["ActivationLocalityLoss", "ChunkSparsificationLoss"]
    layer.router.csl_coeff.fill_(0.3)
    x = torch.randn(2, 11, 8, dtype=torch.float64)
    pad = torch.zeros(2, 11, dtype=torch.bool)
    pad[1, 8:] = True
    _, aux = layer(x, mr.RoutingContext(padding_mask=pad))
    logits = (x.reshape(-1, 8) @ layer.router.weight.t()).detach()
    seq, valid = _sequences([11, 11]), ~pad.reshape(-1)
    expected = 2e-3 * _naive_all(logits, seq.tolist(), valid.tolist(), 100.0) + 0.3 * _naive_csl(
        logits, seq.tolist(), valid.tolist(), 64)
    assert aux.item() == pytest.approx(float(expected), rel=1e-9)
    assert layer.last_stats["csl_coeff"].item() == pytest.approx(0.3)
    assert layer.last_aux_losses["chunk_sparsification"].item() == pytest.approx(
        0.3 * layer.last_stats["csl"].item())


def test_adaptive_loss_needs_the_routers_coefficient():
    layer = mr.MoELayer(8, 4, 6, 2, losses=[mr.ChunkSparsificationLoss()])
    with pytest.raises(TypeError, match="needs a router with an adaptive coefficient"):
        layer(torch.randn(5, 8))
    fixed = mr.MoELayer(8, 4, 6, 2, router="blockffn", losses=[mr.ChunkSparsificationLoss(0.5, 4, adaptive=False)],
                        return_aux_loss=True)
    _, aux = fixed(torch.randn(5, 8))
    assert aux.item() == pytest.approx(0.5 * fixed.last_stats["csl"].item())
    assert "csl_coeff" not in fixed.last_aux_losses


@pytest.mark.parametrize("make,error,match", [
    (lambda: mr.ChunkSparsificationLoss(chunk_len=0), ValueError, "chunk_len"),
    (lambda: mr.ChunkSparsificationLoss(chunk_len=True), TypeError, "chunk_len"),
    (lambda: mr.ChunkSparsificationLoss(adaptive=1), TypeError, "adaptive must be a bool"),
    (lambda: mr.ChunkSparsificationLoss(coeff=math.nan), ValueError, "coeff"),
    (lambda: mr.ActivationLocalityLoss(steepness=0.0), ValueError, "steepness"),
    (lambda: mr.ActivationLocalityLoss(steepness=math.inf), ValueError, "steepness"),
])
def test_bad_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make()
