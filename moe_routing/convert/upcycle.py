"""Sparse upcycling (Komatsuzaki et al., "Sparse Upcycling: Training Mixture-of-Experts from Dense
Checkpoints", ICLR 2023, arXiv 2212.05055; the authors' code, in google-research/vmoe and T5X, was not read).

Every expert starts as a copy of the dense FFN; the router is the only new parameter. Following the paper, the
router is freshly initialised (zero-mean normal, no bias; its std 0.02 is the library's default, not taken from
the paper) and token-choice top-k routing with k = 2 is the default, as in the paper's decoder. With gates that
sum to 1 over the k chosen experts (softmax over the chosen logits, the default for k > 1), identical experts
make the upcycled layer compute the dense FFN exactly whatever the router does: the upcycled model starts from
the dense model's function.

``noise_std`` (not in the paper; the usual remedy for identical experts that stay identical, e.g.
Drop-Upcycling, arXiv 2502.19261, re-initialises parts instead) adds independent Gaussian noise to each copy,
scaled by each dense matrix's own standard deviation.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..layer import MoELayer
from ..validation import check_float, check_int
from .dense import dense_swiglu


@torch.no_grad()
def upcycle(ffn: nn.Module, num_experts: int, top_k: int = 2, *, noise_std: float = 0.0,
            seed: Optional[int] = None, **layer_kwargs) -> MoELayer:
    """An `MoELayer` whose E experts are copies of the dense SwiGLU ``ffn`` (see `dense_swiglu` for the modules
    read: the ablation model's `SwiGLU`, a Hugging Face ``LlamaMLP``/``Qwen2MLP``...).

    Args:
        ffn: the dense FFN (left unchanged).  num_experts: E >= 1.  top_k: k in [1, E].
        noise_std: std of the Gaussian noise added to each copy, relative to each dense matrix's std (0: exact
            copies).
        seed: seed of the noise (None: torch's global generator).
        layer_kwargs: the other `MoELayer` arguments (``router``, ``router_kwargs``, ``losses``,
            ``capacity_factor``, ...). Default router: "topk" (softmax over the k chosen logits for k > 1, so the
            gates sum to 1; at k = 1 Switch gates, which scale the output by the chosen probability).

    The layer is created on the FFN's device and dtype.
    """
    dense = dense_swiglu(ffn)
    check_int("num_experts", num_experts, 1)
    check_int("top_k", top_k, 1, num_experts)
    noise_std = check_float("noise_std", noise_std, 0.0)
    for reserved in ("hidden_size", "ffn_hidden_size", "num_experts", "top_k", "activation"):
        if reserved in layer_kwargs:
            raise ValueError(f"upcycle sets {reserved} from the dense FFN; do not pass it in layer_kwargs")
    w = dense.w_up_DF
    layer_kwargs.setdefault("device", w.device)
    layer_kwargs.setdefault("dtype", w.dtype)
    layer = MoELayer(dense.hidden_size, dense.ffn_hidden_size, num_experts, top_k, activation="swiglu",
                     **layer_kwargs)
    gen = None if seed is None else torch.Generator(device=w.device).manual_seed(check_int("seed", seed))
    experts = layer.experts
    for name, src in (("w_gate", dense.w_gate_DF), ("w_up", dense.w_up_DF), ("w_down", dense.w_down_FD)):
        dst = getattr(experts, name)
        copies = src.to(dst.dtype).expand_as(dst).clone()
        if noise_std > 0:
            scale = noise_std * float(src.double().std()) if src.numel() > 1 else noise_std
            copies += scale * torch.randn(copies.shape, generator=gen, device=w.device, dtype=torch.float32
                                          ).to(copies.dtype)
        dst.copy_(copies)
    return layer
