"""SMEARLayer: Soft Merging of Experts with Adaptive Routing (Muqeeth, Liu & Raffel, arXiv 2306.03745).

Instead of sending tokens to experts, SMEAR merges the experts: for each example (sequence) a router turns the
example's mean-pooled input into a distribution ``p`` over the E experts, and the example runs through ONE
expert whose weights are ``sum_e p_e W_e``. Every operation is differentiable, so the router gets exact
gradients (no estimator), at the cost of one FFN per example plus the merge.

Reference: r-three/smear, ``hyperformer/hyperformer/adapters/adapter_controller_fast.py`` (the
``parameter_averaging`` path: ``prob_dist @ weights`` per example, router over ``mean(z, dim=1)``). There the
experts are adapters with biases; here they are the library's `GroupedExperts` (no biases, SwiGLU by default),
so a `MoELayer` checkpoint's ``experts.*`` (and ``shared_experts.*``) tensors load unchanged.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .decision import RoutingContext
from .experts import GroupedExperts, SharedExperts
from .routers.base import param_factory
from .settings import debug_checks
from .validation import check_bool, check_float, check_int


class SMEARLayer(nn.Module):
    """One merged expert per example: ``y_s = FFN(x_s; sum_e p_se W_e)``, ``p_s = softmax(W_r mean_t x_st)``.

    ``y = layer(x, ctx=None)`` maps ``x`` [..., D] to the same shape and dtype. Examples: each ``[S, D]`` row of a
    ``[B, S, D]`` input; the sequences of ``ctx.seq_lens`` for a packed ``[T, D]`` input; else the whole
    ``[T, D]`` input is one example. Padding (``ctx.padding_mask``) is left out of the mean the router reads.

    Args (as `MoELayer` where they apply; keyword-only after E, since `MoELayer`'s 4th positional is top_k):
        hidden_size: D.  ffn_hidden_size: F of each expert.  num_experts: E.
        activation: "swiglu" | "gelu" | "relu" (the experts' `GroupedExperts` layout: ``w_gate``/``w_up``
            [E, D, F], ``w_down`` [E, F, D]).
        num_shared_experts: always-on dense FFN of ``num_shared_experts * F`` added to the output (not merged).
        router_kwargs: ``{"init_std": 0.02}``: std of the router weight's normal init (no bias).
        layer_idx, track_stats, device, dtype: as `MoELayer`. ``last_stats`` holds ``smear_probs_mean`` [E]
            (mean routing distribution over examples) and ``smear_entropy`` (mean entropy of p, nats).

    Router maths runs in float32 (float64 for a float64 layer) with autocast off; the router weight stays float32
    under a cast to bf16/fp16. The merge runs in the experts' dtype. Not applicable: ``top_k``, ``router``
    (every expert takes part), capacity, dispatch backends, balance losses (the paper uses none).
    """

    def __init__(self, hidden_size: int, ffn_hidden_size: int, num_experts: int, *, activation: str = "swiglu",
                 num_shared_experts: int = 0, router_kwargs: Optional[dict] = None,
                 layer_idx: Optional[int] = None, track_stats: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        check_int("hidden_size", hidden_size, 1)
        check_int("num_experts", num_experts, 1)
        check_int("num_shared_experts", num_shared_experts, 0)
        if layer_idx is not None:
            check_int("layer_idx", layer_idx, 0)
        self.track_stats = check_bool("track_stats", track_stats)
        kwargs = dict(router_kwargs or {})
        unknown = set(kwargs) - {"init_std"}
        if unknown:
            raise ValueError(f"router_kwargs accepts only 'init_std' for SMEARLayer, got {sorted(unknown)}")
        init_std = check_float("router_kwargs['init_std']", kwargs.get("init_std", 0.02), 0.0)
        self.hidden_size, self.num_experts, self.layer_idx = hidden_size, num_experts, layer_idx
        self.router_weight = nn.Parameter(torch.empty(num_experts, hidden_size, **param_factory(device, dtype)))
        nn.init.normal_(self.router_weight, std=init_std)
        self.experts = GroupedExperts(num_experts, hidden_size, ffn_hidden_size, activation, device=device,
                                      dtype=dtype)
        self.shared_experts = (SharedExperts(hidden_size, num_shared_experts * ffn_hidden_size, activation,
                                             device=device, dtype=dtype) if num_shared_experts else None)
        self.last_stats: dict[str, Tensor] = {}

    def _apply(self, fn: Callable, recurse: bool = True):  # noqa: D401 - torch override
        # only the router weight keeps float32 under a bf16/fp16 cast; the experts follow the cast
        before = self.router_weight.data
        out = super()._apply(fn, recurse)
        after = self.router_weight.data
        if after.dtype in (torch.float16, torch.bfloat16):  # from the original values, not a bf16 round trip
            self.router_weight.data = before.to(device=after.device, dtype=torch.float32)
        return out

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, num_experts={self.num_experts}"

    # --- the pieces, public so that they can be checked one by one ---
    def examples(self, x: Tensor, ctx: Optional[RoutingContext]) -> list[int]:
        """Token count of each example, in order (they sum to T)."""
        T = x.numel() // self.hidden_size
        if ctx is not None and ctx.seq_lens is not None:
            lens = ctx.seq_lens
            if lens.device.type == "cpu" or debug_checks():
                if lens.dim() != 1 or int(lens.sum()) != T or bool((lens < 0).any()):
                    raise ValueError(f"seq_lens must be a 1-D tensor of non-negative lengths summing to the token "
                                     f"count {T}, got shape {tuple(lens.shape)} and sum {int(lens.sum())}")
            return [int(n) for n in lens.tolist()]
        if x.dim() >= 3:
            return [x.shape[-2]] * (T // x.shape[-2]) if T else []
        return [T]

    def routing_probs(self, x_TD: Tensor, lens: list[int], valid_T: Optional[Tensor]) -> Tensor:
        """[B, E] routing distribution of each example from its mean-pooled (non-padding) input."""
        dtype = self.router_weight.dtype if self.router_weight.dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            x = x_TD.to(dtype)
            ex_T = torch.repeat_interleave(torch.arange(len(lens), device=x.device),
                                           torch.tensor(lens, device=x.device), output_size=x.shape[0])
            w_T = torch.ones(x.shape[0], dtype=dtype, device=x.device) if valid_T is None else valid_T.to(dtype)
            sum_BD = x.new_zeros(len(lens), self.hidden_size).index_add(0, ex_T, x * w_T[:, None])
            count_B = x.new_zeros(len(lens)).index_add(0, ex_T, w_T).clamp_min(1.0)
            logits_BE = (sum_BD / count_B[:, None]) @ self.router_weight.to(dtype).t()
            return logits_BE.softmax(-1)

    def merged_weights(self, probs_BE: Tensor) -> dict[str, Tensor]:
        """The merged expert of each example: ``{"w_gate"?, "w_up": [B, D, F], "w_down": [B, F, D]}``."""
        out = {}
        for name in ("w_gate", "w_up", "w_down"):
            w = getattr(self.experts, name)
            if w is not None:
                out[name] = torch.einsum("be,e...->b...", probs_BE.to(w.dtype), w)
        return out

    def _ffn(self, x_BSD: Tensor, merged: dict[str, Tensor]) -> Tensor:
        """The merged experts on their examples: [B, S, D] -> [B, S, D]."""
        up = x_BSD @ merged["w_up"].to(x_BSD.dtype)
        act = self.experts.activation
        if act == "swiglu":
            h = F.silu(x_BSD @ merged["w_gate"].to(x_BSD.dtype)) * up
        else:
            h = F.gelu(up) if act == "gelu" else F.relu(up)
        return h @ merged["w_down"].to(h.dtype)

    def forward(self, x: Tensor, ctx: Optional[RoutingContext] = None) -> Tensor:
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating-point torch.Tensor, got {getattr(x, 'dtype', type(x).__name__)}")
        if x.dim() < 1 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"x must have shape [..., {self.hidden_size}] (hidden_size), got {tuple(x.shape)}")
        w = self.experts.w_up
        if x.dtype != w.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"x has dtype {x.dtype} but the expert weights are {w.dtype}; cast the layer")
        lens = self.examples(x, ctx)
        x_TD = x.reshape(-1, self.hidden_size)
        T = x_TD.shape[0]
        if T == 0:
            self.last_stats = {}
            return x * 0
        pad_T = None if ctx is None else ctx.to(x.device).padding_T(T)
        probs_BE = self.routing_probs(x_TD, lens, None if pad_T is None else ~pad_T)
        merged = self.merged_weights(probs_BE)
        if len(set(lens)) == 1:  # equal lengths: one batched matmul per weight
            y_TD = self._ffn(x_TD.reshape(len(lens), lens[0], self.hidden_size), merged).reshape(T, self.hidden_size)
        else:  # one merged FFN per example
            y_TD = torch.cat([self._ffn(x_SD[None], {k: w[b:b + 1] for k, w in merged.items()})[0]
                              for b, x_SD in enumerate(x_TD.split(lens))])
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD)
        if self.track_stats:
            p = probs_BE.detach()
            self.last_stats = {"smear_probs_mean": p.mean(0),
                               "smear_entropy": -(p * p.clamp_min(1e-30).log()).sum(-1).mean()}
        return y_TD.reshape(x.shape).to(x.dtype)
