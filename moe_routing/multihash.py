"""MultiHash layer (Roller et al. 2021, "Hash Layers For Large Sparse Models", sec. 3, "MultiHash Layers").

One FFN of hidden width F is split into N segments, and each segment takes its weights from the bucket chosen
by its own hash of the token id. With K buckets, each a full FFN (``w_up`` [K, D, F], ``w_down`` [K, F, D]),
N hashes ``k_i = hash_i(id)`` and segment widths ``F/N`` (hidden) and ``D/N`` (output):

    v_t   = [ act(x_t @ w_up[k_1][:, seg_1]), ..., act(x_t @ w_up[k_N][:, seg_N]) ]       [F]
    y_t   = [ v_t @ w_down[k_1][:, out_1],  ..., v_t @ w_down[k_N][:, out_N] ]            [D]

(``seg_i`` = hidden columns ``i F/N : (i+1) F/N``, ``out_i`` = output columns ``i D/N : (i+1) D/N``; SwiGLU
gates ``w_gate`` the same way as ``w_up``). Every second-layer segment reads the whole concatenated hidden
``v_t``, whose parts come from different buckets: a token's output is not a weighted sum of whole experts, so
this is a layer rather than a `Router`. N = 1 is the plain hash layer (one whole expert per token).

Deviations from the paper: no biases, our expert activations (SwiGLU default, or ReLU as the paper / GELU), and
the hashes are seeded random tables balancing the number of ids per bucket (`id_balanced_expert_map`, one
seed per hash) or table-free seeded hashes (`hash_experts`); the paper's MultiHash uses random hashes. The
authors' public hash layer (facebookresearch/ParlAI ``projects/params_vs_compute/hash_ladder/hash_ladder.py``)
has no MultiHash.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .decision import RoutingContext
from .experts import ACTIVATIONS, GroupedExperts
from .ops.counts import invert_permutation, sort_by_expert
from .ops.grouped_mm import grouped_mm
from .routers.hash import hash_experts, id_balanced_expert_map
from .validation import check_int


class MultiHashFFN(nn.Module):
    """N-hash segmented FFN over K buckets; needs token ids (``forward(x, token_ids=...)`` or ``ctx``).

    Args:
        hidden_size: D (divisible by N).  ffn_hidden_size: F (divisible by N).
        num_buckets: K, the full FFNs segments are drawn from.  num_hashes: N (the paper's runs: 16).
        vocab_size: with it, N seeded random tables (buffer ``hash_map`` int64 [V, N], column i from seed
            ``seed + i``); ids must lie in [0, V). Without it, N table-free hashes (`hash_experts`, ids >= 0).
        activation: "swiglu" (default), "relu" (the paper's) or "gelu".  seed: 0.
        expert_impl, init_std: as `GroupedExperts` (whose ``w_up``/``w_gate``/``w_down`` this holds as
            ``experts``).
    """

    def __init__(self, hidden_size: int, ffn_hidden_size: int, num_buckets: int, num_hashes: int, *,
                 vocab_size: Optional[int] = None, activation: str = "swiglu", seed: int = 0,
                 expert_impl: str = "auto", init_std: Optional[float] = None, device=None, dtype=None) -> None:
        super().__init__()
        D = check_int("hidden_size", hidden_size, 1)
        Fh = check_int("ffn_hidden_size", ffn_hidden_size, 1)
        K = check_int("num_buckets", num_buckets, 1)
        N = check_int("num_hashes", num_hashes, 1)
        if D % N or Fh % N:
            raise ValueError(f"num_hashes must divide hidden_size and ffn_hidden_size (the segments), got "
                             f"num_hashes={N}, hidden_size={D}, ffn_hidden_size={Fh}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.hidden_size, self.ffn_hidden_size, self.num_buckets, self.num_hashes = D, Fh, K, N
        self.seed = check_int("seed", seed, 0)
        self.vocab_size = None if vocab_size is None else check_int("vocab_size", vocab_size, 1)
        self.experts = GroupedExperts(K, D, Fh, activation, expert_impl, init_std, device=device, dtype=dtype)
        if vocab_size is not None:
            table = torch.cat([id_balanced_expert_map(vocab_size, K, 1, seed + i) for i in range(N)], 1)
            self.register_buffer("hash_map", table.to(device))
        else:
            self.hash_map = None

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, ffn_hidden_size={self.ffn_hidden_size}, "
                f"num_buckets={self.num_buckets}, num_hashes={self.num_hashes}, vocab_size={self.vocab_size}, "
                f"activation={self.experts.activation!r}, seed={self.seed}")

    def buckets(self, ids_T: Tensor) -> Tensor:
        """int64 [T, N]: the bucket of each token's segment i."""
        if self.hash_map is not None:
            return self.hash_map[ids_T]
        return torch.stack([hash_experts(ids_T, self.num_buckets, 1, self.seed + i)[:, 0]
                            for i in range(self.num_hashes)], 1)

    def forward(self, x: Tensor, token_ids: Optional[Tensor] = None, ctx: Optional[RoutingContext] = None) -> Tensor:
        """``x`` [..., D] and its token ids (``token_ids`` [...] or ``ctx.token_ids``) -> [..., D]."""
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.shape[-1] != self.hidden_size:
            raise ValueError(f"x must be a floating-point tensor [..., {self.hidden_size}]")
        x_TD = x.reshape(-1, self.hidden_size)
        T = x_TD.shape[0]
        ids = token_ids if token_ids is not None else (None if ctx is None else ctx.token_ids)
        if ids is None:
            raise ValueError("MultiHashFFN needs token ids: pass token_ids= (int, shaped like x without its last "
                             "dim) or ctx=RoutingContext(token_ids=...)")
        if not isinstance(ids, Tensor) or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError("token_ids must be an integer tensor")
        ids_T = ids.reshape(-1).to(x.device).long()
        if ids_T.numel() != T:
            raise ValueError(f"token_ids has {ids_T.numel()} elements but x has {T} tokens")
        if T and ids_T.device.type == "cpu":
            high = self.vocab_size if self.vocab_size is not None else float("inf")
            if int(ids_T.min()) < 0 or int(ids_T.max()) >= high:
                raise ValueError(f"token_ids must lie in [0, {high}) (vocab_size)")
        bucket_TN = self.buckets(ids_T)
        N, K, ex = self.num_hashes, self.num_buckets, self.experts
        Fn, Dn = self.ffn_hidden_size // N, self.hidden_size // N
        x_TD = x_TD.to(ex.w_up.dtype)
        plans = []
        for i in range(N):  # one stable sort per hash: segment i's tokens grouped by their bucket
            order_T, counts_K, offsets_K1 = sort_by_expert(bucket_TN[:, i], K)
            plans.append((order_T, invert_permutation(order_T), counts_K, offsets_K1))
        hidden = []
        for i, (order_T, back_T, counts_K, offsets_K1) in enumerate(plans):
            xs = x_TD.index_select(0, order_T)
            cols = slice(i * Fn, (i + 1) * Fn)
            up = grouped_mm(xs, ex.w_up[:, :, cols].contiguous(), counts_K, offsets_K1, ex.expert_impl)
            if ex.activation == "swiglu":
                h = F.silu(grouped_mm(xs, ex.w_gate[:, :, cols].contiguous(), counts_K, offsets_K1,
                                      ex.expert_impl)) * up
            else:
                h = F.gelu(up) if ex.activation == "gelu" else F.relu(up)
            hidden.append(h.index_select(0, back_T))
        v_TF = torch.cat(hidden, 1)
        out = []
        for i, (order_T, back_T, counts_K, offsets_K1) in enumerate(plans):
            w = ex.w_down[:, :, i * Dn:(i + 1) * Dn].contiguous()
            out.append(grouped_mm(v_TF.index_select(0, order_T), w, counts_K, offsets_K1,
                                  ex.expert_impl).index_select(0, back_T))
        return torch.cat(out, 1).to(x.dtype).reshape(x.shape)
