"""A small decoder-only LM (pre-norm, RMSNorm, RoPE, causal SDPA) whose FFNs are MoE layers or a dense SwiGLU.

Shape letters: B batch, S sequence, D hidden, H heads, Dh head size, V vocabulary, F FFN hidden.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..experts import GroupedExperts
from ..routers.base import Router

try:  # optional fast path on GPUs; never required
    from flash_attn import flash_attn_func as _flash_attn_func
except ImportError:  # pragma: no cover - not installed here
    _flash_attn_func = None


class SwiGLU(nn.Module):
    """Dense FFN ``(silu(x @ w_gate) * (x @ w_up)) @ w_down``; weights [D, F], [D, F], [F, D]."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int) -> None:
        super().__init__()
        self.w_gate = nn.Parameter(torch.empty(hidden_size, ffn_hidden_size))
        self.w_up = nn.Parameter(torch.empty(hidden_size, ffn_hidden_size))
        self.w_down = nn.Parameter(torch.empty(ffn_hidden_size, hidden_size))

    def forward(self, x_BSD: Tensor) -> Tensor:
        return (F.silu(x_BSD @ self.w_gate) * (x_BSD @ self.w_up)) @ self.w_down


def rope_tables(seq_len: int, head_dim: int, base: float = 10000.0,
                dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """cos, sin [S, Dh] for rotary embeddings in the half-split layout (pairs (i, i + Dh/2))."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq).repeat(1, 2)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x_BHSd: Tensor, cos_Sd: Tensor, sin_Sd: Tensor) -> Tensor:
    """Rotate each pair (x_i, x_{i+Dh/2}) by its position angle: ``x * cos + rotate_half(x) * sin``."""
    x1, x2 = x_BHSd.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x_BHSd * cos_Sd + rotated * sin_Sd).to(x_BHSd.dtype)


class CausalSelfAttention(nn.Module):
    """Causal attention with RoPE and grouped K/V heads; SDPA (or flash-attn on CUDA half precision).

    ``n_kv_heads`` K/V heads (default ``n_heads``: multi-head attention) each serve ``n_heads / n_kv_heads``
    query heads (GQA, Megatron's ``--num-query-groups``). One projection produces Q [H*Dh], K and V [Hkv*Dh] each.
    """

    def __init__(self, hidden_size: int, n_heads: int, max_seq_len: int, n_kv_heads: Optional[int] = None,
                 rope_base: float = 10000.0) -> None:
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if not isinstance(n_kv_heads, int) or isinstance(n_kv_heads, bool) or n_kv_heads < 1 \
                or n_heads % n_kv_heads:
            raise ValueError(f"n_kv_heads must be a positive int dividing n_heads={n_heads}, got {n_kv_heads!r}")
        if not isinstance(rope_base, (int, float)) or isinstance(rope_base, bool) or not math.isfinite(rope_base) \
                or rope_base <= 1:
            raise ValueError(f"rope_base must be a finite number > 1, got {rope_base!r}")
        self.n_heads, self.n_kv_heads, self.rope_base = n_heads, n_kv_heads, float(rope_base)
        head_dim = hidden_size // n_heads
        self.qkv = nn.Linear(hidden_size, (n_heads + 2 * n_kv_heads) * head_dim, bias=False)
        self.out = nn.Linear(hidden_size, hidden_size, bias=False)
        cos, sin = rope_tables(max_seq_len, head_dim, self.rope_base)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x_BSD: Tensor) -> Tensor:
        S = x_BSD.shape[1]
        Hq, Hkv = self.n_heads, self.n_kv_heads
        q, k, v = self.qkv(x_BSD).split([self.out.in_features, *(self.out.in_features * Hkv // Hq,) * 2], dim=-1)
        q = rearrange(q, "b s (h d) -> b h s d", h=Hq)
        k, v = (rearrange(t, "b s (h d) -> b h s d", h=Hkv) for t in (k, v))
        cos, sin = self.cos[:S], self.sin[:S]
        if q.dtype == torch.float64:  # the float32 tables would limit a float64 model to float32 accuracy
            cos, sin = (t.to(q.device, torch.float64)
                        for t in rope_tables(S, q.shape[-1], self.rope_base, dtype=torch.float64))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if _flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            # flash-attn takes fewer K/V heads than query heads as they are (GQA)
            o = _flash_attn_func(*(rearrange(t, "b h s d -> b s h d") for t in (q, k, v)), causal=True)
            o = rearrange(o, "b s h d -> b s (h d)")
        else:
            if Hkv != Hq:  # query head h reads K/V group h // (Hq / Hkv)
                k, v = (t.repeat_interleave(Hq // Hkv, dim=1) for t in (k, v))
            o = rearrange(F.scaled_dot_product_attention(q, k, v, is_causal=True), "b h s d -> b s (h d)")
        return self.out(o)


class Block(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``x + ffn(norm(x))``; ``ffn`` is an MoELayer or SwiGLU."""

    def __init__(self, attn: CausalSelfAttention, ffn: nn.Module, hidden_size: int) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(hidden_size)
        self.attn = attn
        self.ffn_norm = nn.RMSNorm(hidden_size)
        self.ffn = ffn

    def ffn_down_weight(self) -> Tensor:
        return getattr(self.ffn, "experts", self.ffn).w_down

    def forward(self, x_BSD: Tensor) -> Tensor:
        x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD))
        return x_BSD + self.ffn(self.ffn_norm(x_BSD))


class TinyLM(nn.Module):
    """Decoder-only LM. ``forward(ids_BS) -> logits_BSV`` (float32, or float64 for a float64 model).

    Args:
        vocab_size: V.  hidden_size: D.  n_heads: attention heads.  max_seq_len: longest sequence (RoPE table).
        ffns: one FFN module per layer (MoELayer or SwiGLU), built by the router registry.
        shared: a module the FFNs share (e.g. the recurrent router's GRU), registered here so it is trained
            and checkpointed.
        tie_embeddings: the output projection reuses the embedding matrix (one [V, D] tensor).
        n_kv_heads: K/V heads of grouped-query attention (None: ``n_heads``, multi-head attention).
        rope_base: RoPE frequency base (1e4 as in RoFormer; 1e6 in ReMoE's LLaMA setting).
        init_std: std of the normal init of every matrix except router weights (which keep their own init).
        seed: init seed. Embeddings and attention draw from one generator and FFNs from another, so two models
            with the same seed and different routers start with identical embeddings and attention.
    """

    def __init__(self, vocab_size: int, hidden_size: int, n_heads: int, max_seq_len: int, ffns: Sequence[nn.Module],
                 shared: Optional[nn.Module] = None, tie_embeddings: bool = True, init_std: float = 0.02,
                 seed: int = 0, n_kv_heads: Optional[int] = None, rope_base: float = 10000.0) -> None:
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("hidden_size", hidden_size), ("n_heads", n_heads),
                            ("max_seq_len", max_seq_len)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if hidden_size % n_heads or (hidden_size // n_heads) % 2:
            raise ValueError(f"hidden_size={hidden_size} must split into n_heads={n_heads} heads of even size")
        if not isinstance(tie_embeddings, bool):
            raise TypeError(f"tie_embeddings must be a bool, got {tie_embeddings!r}")
        if not ffns or not all(isinstance(f, nn.Module) for f in ffns):
            raise TypeError(f"ffns must be a non-empty sequence of nn.Module (one per layer), got {ffns!r}")
        self.embed = nn.Embedding(vocab_size, hidden_size)
        self.blocks = nn.ModuleList(
            Block(CausalSelfAttention(hidden_size, n_heads, max_seq_len, n_kv_heads, rope_base), ffn, hidden_size)
            for ffn in ffns)
        self.shared = shared
        self.norm = nn.RMSNorm(hidden_size)
        self.lm_head = None if tie_embeddings else nn.Linear(hidden_size, vocab_size, bias=False)
        self.max_seq_len = max_seq_len
        self.reset_parameters(init_std, seed)

    @torch.no_grad()
    def reset_parameters(self, init_std: float, seed: int) -> None:
        """Normal(0, init_std) for every matrix outside the routers (which keep the init their builder drew
        from a seeded generator); norm scales stay 1; residual-output projections scaled by 1/sqrt(2L)."""
        if any(p.is_meta for p in self.parameters()):
            return  # a model built on the meta device only to be measured (`moe-ablate --describe`)
        g_shared = torch.Generator().manual_seed(2 * seed)
        g_ffn = torch.Generator().manual_seed(2 * seed + 1)
        for name, p in self.named_parameters():
            if p.dim() < 2 or name.startswith("shared.") or any(isinstance(m, Router) for m in self._owners(name)):
                continue
            gen = g_ffn if ".ffn." in f".{name}" else g_shared
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) * init_std)
        scale = 1.0 / math.sqrt(2 * len(self.blocks))
        for block in self.blocks:
            block.attn.out.weight.mul_(scale)
            block.ffn_down_weight().mul_(scale)

    def _owners(self, name: str) -> list[nn.Module]:
        mods, m = [], self
        for part in name.split(".")[:-1]:
            m = getattr(m, part)
            mods.append(m)
        return mods

    def forward(self, ids_BS: Tensor) -> Tensor:
        if not isinstance(ids_BS, Tensor) or ids_BS.is_floating_point() or ids_BS.is_complex():
            raise TypeError(f"ids must be an integer tensor [B, S], got {getattr(ids_BS, 'dtype', type(ids_BS))}")
        if ids_BS.dim() != 2 or ids_BS.shape[1] > self.max_seq_len:
            raise ValueError(f"ids must have shape [B, S<={self.max_seq_len}], got {tuple(ids_BS.shape)}")
        x = self.embed(ids_BS)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        w = self.embed.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(x, w)
        return logits if logits.dtype == torch.float64 else logits.float()  # CE in at least float32


def count_params(model: nn.Module, top_k: int) -> tuple[int, int]:
    """(active, total) parameters: an MoE layer's experts count ``top_k / E`` of their weights as active."""
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for m in model.modules():
        if isinstance(m, GroupedExperts):
            n = sum(p.numel() for p in m.parameters())
            inactive += n - n * top_k // m.num_experts
    return total - inactive, total


def ffn_flops_per_token(hidden_size: int, ffn_hidden: int, experts_per_token: float) -> float:
    """Forward FLOPs of SwiGLU experts for one token: 3 matmuls of D x F, 2 FLOPs per multiply-add."""
    return 6.0 * hidden_size * ffn_hidden * experts_per_token
