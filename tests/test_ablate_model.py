"""moe_routing/ablate/model.py and registry.py's build_model: the MoE LM with one expert equals the dense LM,
attention against a naive loop, argument checks, parameter counts by hand, and the same seed giving every router
the same shared initialisation. Tiny model (d=32, 2 layers, seq 32, batch 4)."""
import math

import pytest
import torch

import moe_routing as mr
from moe_routing.ablate.config import get_preset
from moe_routing.ablate.model import CausalSelfAttention, SwiGLU, TinyLM, count_params
from moe_routing.ablate.registry import build_model


def _moe_one_expert(D, F_):
    return mr.MoELayer(D, F_, 1, 1, router=mr.TopKRouter(D, 1, 1, softmax_before_topk=True), losses=[])


def test_moe_with_one_expert_equals_dense_model():
    """E=1, k=1: the gate is softmax over one logit = 1, so the MoE LM is the dense LM with the same weights."""
    torch.manual_seed(0)
    D, F_, V, S = 32, 24, 50, 9
    moe = TinyLM(V, D, 2, 16, [_moe_one_expert(D, F_) for _ in range(2)], seed=3).double()
    dense = TinyLM(V, D, 2, 16, [SwiGLU(D, F_) for _ in range(2)], seed=3).double()
    with torch.no_grad():
        for bm, bd in zip(moe.blocks, dense.blocks):
            for name in ("w_gate", "w_up", "w_down"):
                getattr(bd.ffn, name).copy_(getattr(bm.ffn.experts, name)[0])
    shared = {k: v for k, v in moe.state_dict().items() if ".ffn." not in k}
    for k, v in shared.items():  # same seed: embeddings and attention already identical
        assert torch.equal(v, dense.state_dict()[k]), k
    ids = torch.randint(0, V, (3, S))
    out_moe, out_dense = moe(ids), dense(ids)
    assert out_moe.dtype == torch.float64  # stays float64 (logits are cast up to at least float32)
    torch.testing.assert_close(out_moe, out_dense, rtol=1e-12, atol=1e-12)
    out_moe.square().mean().backward()
    out_dense.square().mean().backward()
    torch.testing.assert_close(moe.embed.weight.grad, dense.embed.weight.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(moe.blocks[0].ffn.experts.w_up.grad[0], dense.blocks[0].ffn.w_up.grad,
                               rtol=1e-10, atol=1e-12)


def _naive_attention(x_SD, qkv_w, out_w, H, Hkv=None, base=10000.0):
    """Per-position loop in float64: RoPE on pairs (i, i + Dh/2), causal softmax attention; query head h reads
    K/V head h // (H / Hkv) (grouped-query attention)."""
    S, D = x_SD.shape
    Dh = D // H
    Hkv = H if Hkv is None else Hkv
    qkv = x_SD @ qkv_w.t()
    q, k, v = qkv[:, :D], qkv[:, D:D + Hkv * Dh], qkv[:, D + Hkv * Dh:]

    def rot(vec, pos):
        out = vec.clone()
        for i in range(Dh // 2):
            theta = pos * base ** (-2.0 * i / Dh)
            a, b = vec[i], vec[i + Dh // 2]
            out[i] = a * math.cos(theta) - b * math.sin(theta)
            out[i + Dh // 2] = a * math.sin(theta) + b * math.cos(theta)
        return out

    rows = []
    for s in range(S):
        heads = []
        for h in range(H):
            sl = slice(h * Dh, (h + 1) * Dh)
            g = h // (H // Hkv)
            kv = slice(g * Dh, (g + 1) * Dh)
            qs = rot(q[s, sl], s)
            scores = torch.stack([qs @ rot(k[t, kv], t) / math.sqrt(Dh) for t in range(s + 1)])
            p = scores.softmax(0)
            heads.append(sum(p[t] * v[t, kv] for t in range(s + 1)))
        rows.append(torch.cat(heads))
    return torch.stack(rows) @ out_w.t()


def test_attention_matches_naive_loop():
    torch.manual_seed(1)
    attn = CausalSelfAttention(12, 3, 8).double()
    x = torch.randn(2, 7, 12, dtype=torch.float64)
    y = attn(x)
    for b in range(2):
        ref = _naive_attention(x[b], attn.qkv.weight.detach(), attn.out.weight.detach(), 3)
        torch.testing.assert_close(y[b], ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("H, Hkv, base", [(6, 2, 1e6), (6, 1, 10000.0), (6, 3, 500.0)])
def test_grouped_query_attention_and_rope_base_match_naive_loop(H, Hkv, base):
    torch.manual_seed(2)
    attn = CausalSelfAttention(24, H, 8, n_kv_heads=Hkv, rope_base=base).double()
    assert attn.qkv.weight.shape == ((H + 2 * Hkv) * 4, 24)
    x = torch.randn(2, 7, 24, dtype=torch.float64)
    y = attn(x)
    for b in range(2):
        ref = _naive_attention(x[b], attn.qkv.weight.detach(), attn.out.weight.detach(), H, Hkv, base)
        torch.testing.assert_close(y[b], ref, rtol=1e-10, atol=1e-12)
    attn.float()  # the float32 path uses the buffered tables built with the same base
    torch.testing.assert_close(attn(x.float()).double(), y, rtol=1e-4, atol=1e-5)


def test_untied_embeddings_have_their_own_output_matrix():
    model = TinyLM(10, 8, 2, 8, [SwiGLU(8, 8)], tie_embeddings=False)
    assert model.lm_head.weight.shape == (10, 8)
    assert model.lm_head.weight.data_ptr() != model.embed.weight.data_ptr()
    ids = torch.tensor([[1, 2, 3]])
    x = model.norm(model.blocks[0](model.embed(ids)))
    torch.testing.assert_close(model(ids), x @ model.lm_head.weight.t())
    model(ids).sum().backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0


def test_model_bad_arguments():
    with pytest.raises(ValueError, match="hidden_size=30 must split into n_heads=4"):
        TinyLM(10, 30, 4, 8, [SwiGLU(30, 8)])
    with pytest.raises(ValueError, match="vocab_size must be a positive int, got 0"):
        TinyLM(0, 8, 2, 8, [SwiGLU(8, 8)])
    with pytest.raises(TypeError, match="ffns must be a non-empty sequence"):
        TinyLM(10, 8, 2, 8, [])
    with pytest.raises(ValueError, match="n_kv_heads must be a positive int dividing n_heads=4, got 3"):
        TinyLM(10, 16, 4, 8, [SwiGLU(16, 8)], n_kv_heads=3)
    with pytest.raises(ValueError, match="rope_base must be a finite number > 1, got nan"):
        TinyLM(10, 16, 4, 8, [SwiGLU(16, 8)], rope_base=float("nan"))
    with pytest.raises(TypeError, match="tie_embeddings must be a bool"):
        TinyLM(10, 16, 4, 8, [SwiGLU(16, 8)], tie_embeddings=1)
    model = TinyLM(10, 8, 2, 8, [SwiGLU(8, 8)])
    with pytest.raises(ValueError, match=r"ids must have shape \[B, S<=8\], got \(1, 9\)"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(TypeError, match="ids must be an integer tensor"):
        model(torch.zeros(1, 4))
    assert model(torch.zeros(1, 1, dtype=torch.long)).shape == (1, 1, 10)  # one token


def test_count_params_by_hand():
    p = get_preset("smoke")
    model = build_model(p, "topk", 0, 256)
    active, total = count_params(model, p.top_k)
    D, L, E, k, F_ = p.d_model, p.n_layers, p.num_experts, p.top_k, p.expert_hidden
    shared = 256 * D + L * (4 * D * D + 2 * D) + D  # tied embedding, attention, 2 norms per block, final norm
    assert total == shared + L * (E * D + E * 3 * D * F_)
    assert active == shared + L * (E * D + k * 3 * D * F_)
    dense = build_model(p, "dense", 0, 256)
    assert count_params(dense, p.top_k) == (shared + L * 3 * D * k * F_,) * 2


def test_remoe_182m_matches_the_paper_count():
    """ReMoE's 182M LLaMA setting: D=768, 12 layers, GQA with 4 K/V groups, untied GPT-2 vocabulary padded to
    51,200, SwiGLU FFN 3072: 182.47M parameters for the dense model and the active part of the k=1 MoE."""
    p = get_preset("remoe-182m")
    assert p.padded_vocab(50257) == 51200
    with torch.device("meta"):
        dense = build_model(p, "dense", 0, 50257)
        moe = build_model(p, "topk", 0, 50257)
    D, L, V, F_, E = 768, 12, 51200, 3072, 8
    attn = D * (D + 2 * 4 * 64) + D * D
    shared = 2 * V * D + L * (attn + 2 * D) + D
    assert count_params(dense, 1) == (shared + L * 3 * D * F_,) * 2 == (182_471_424,) * 2
    assert count_params(moe, 1) == (shared + L * (E * D + 3 * D * F_), shared + L * (E * D + E * 3 * D * F_))


def test_same_seed_pairs_shared_init_across_routers():
    p = get_preset("smoke")
    a, b, c = build_model(p, "topk", 0, 256), build_model(p, "relu", 0, 256), build_model(p, "topk", 1, 256)
    for name in ("embed.weight", "blocks.0.attn.qkv.weight", "blocks.1.attn.out.weight"):
        assert torch.equal(a.state_dict()[name], b.state_dict()[name])
        assert not torch.equal(a.state_dict()[name], c.state_dict()[name])
    assert torch.equal(a.blocks[0].ffn.experts.w_up, b.blocks[0].ffn.experts.w_up)  # same FFN stream too


@pytest.mark.parametrize("router", ["blockffn", "mor", "compete", "bilevel"])
def test_blockffn_and_mor_builders_train_a_step(router):
    p = get_preset("smoke")
    model = build_model(p, router, 0, 256)
    ids = torch.randint(0, 256, (2, 16))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    handle = mr.attach(model, opt)
    model(ids).float().logsumexp(-1).mean().backward()
    opt.step()
    handle.remove()
    layer = model.blocks[0].ffn
    assert all(torch.isfinite(p_.grad).all() for p_ in layer.router.parameters() if p_.grad is not None)
    if router == "blockffn":
        assert {"tls", "cls", "csl", "activation_locality"} <= set(layer.last_stats)
        assert layer.router.csl_steps.item() == 1  # the attached controller ran
    elif router == "mor":
        assert type(layer.router).__name__ == "MixtureOfRoutersRouter" and layer.router.num_routers == 4
    elif router == "compete":
        assert layer.router.steps == 1 and {"compete_step", "expert_flops_ratio"} <= set(layer.last_stats)
    else:
        assert "group_balance" in layer.last_stats and layer.router.group_weight.grad is not None


@pytest.mark.parametrize("k", [1, 2])
def test_topk_scaled_gates_sum_to_k_at_initialisation(k):
    """`topk_scaled` is `topk` with the gates times E (Switch gates, k=1) or k (Mixtral gates, k>=2): the same
    weights and choices, gates summing to about k at init (exactly k for Mixtral gates)."""
    p = get_preset("smoke").replace(top_k=k)
    plain, scaled = build_model(p, "topk", 0, 256), build_model(p, "topk_scaled", 0, 256)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), scaled.state_dict().values()))
    x = torch.randn(64, p.d_model)
    d_plain, d_scaled = plain.blocks[0].ffn.router(x), scaled.blocks[0].ffn.router(x)
    factor = p.num_experts if k == 1 else k
    assert scaled.blocks[0].ffn.router.scaling_factor == factor
    assert torch.equal(d_plain.expert_N, d_scaled.expert_N)
    torch.testing.assert_close(d_scaled.weight_N, d_plain.weight_N * factor)
    gate_sum_T = torch.zeros(64).index_add_(0, d_scaled.token_N, d_scaled.weight_N)
    if k == 1:  # the top-1 of a softmax over E near-uniform logits (init_std 0.02) is a little above 1/E
        assert ((gate_sum_T >= 1 - 1e-6) & (gate_sum_T < 1.5)).all()
    else:
        torch.testing.assert_close(gate_sum_T, torch.full((64,), float(k)))
