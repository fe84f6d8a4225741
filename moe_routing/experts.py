"""Expert FFNs with stacked weights (grouped matmul over expert-sorted rows) and always-on shared experts."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ops.grouped_mm import check_impl, grouped_mm
from .validation import check_float, check_int

ACTIVATIONS = ("swiglu", "gelu", "relu")


def _act(name: str, h: Tensor) -> Tensor:
    return F.gelu(h) if name == "gelu" else F.relu(h)


class GroupedExperts(nn.Module):
    """E expert FFNs. SwiGLU: ``(silu(x @ w_gate[e]) * (x @ w_up[e])) @ w_down[e]``; GELU/ReLU:
    ``act(x @ w_up[e]) @ w_down[e]`` (no ``w_gate``).

    Weights: ``w_gate``, ``w_up`` [E, D, F]; ``w_down`` [E, F, D].
    """

    def __init__(self, num_experts: int, hidden_size: int, ffn_hidden_size: int, activation: str = "swiglu",
                 expert_impl: str = "auto", init_std: Optional[float] = None, device=None, dtype=None) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        check_impl(expert_impl)
        check_int("num_experts", num_experts, 1)
        check_int("hidden_size", hidden_size, 1)
        check_int("ffn_hidden_size", ffn_hidden_size, 1)
        if init_std is not None:
            check_float("init_std", init_std, 0.0)
        self.num_experts, self.hidden_size, self.ffn_hidden_size = num_experts, hidden_size, ffn_hidden_size
        self.activation = activation
        self.expert_impl = expert_impl
        factory = {"device": device, "dtype": dtype}
        E, D, Fh = num_experts, hidden_size, ffn_hidden_size
        if activation == "swiglu":
            self.w_gate = nn.Parameter(torch.empty(E, D, Fh, **factory))
        else:
            self.register_parameter("w_gate", None)
        self.w_up = nn.Parameter(torch.empty(E, D, Fh, **factory))
        self.w_down = nn.Parameter(torch.empty(E, Fh, D, **factory))
        self.reset_parameters(init_std)

    def reset_parameters(self, init_std: Optional[float] = None) -> None:
        """Normal init with std ``1/sqrt(fan_in)`` per matrix unless ``init_std`` is given."""
        for w in (self.w_gate, self.w_up, self.w_down):
            if w is not None:
                nn.init.normal_(w, std=init_std if init_std is not None else 1.0 / math.sqrt(w.shape[1]))

    def forward(self, x_ND: Tensor, counts_E: Tensor, offsets_E1: Tensor) -> Tensor:
        """``x_ND`` [N, D] rows sorted by expert (``counts_E`` per expert, CSR ``offsets_E1`` [E+1]) -> [N, D]."""
        up = grouped_mm(x_ND, self.w_up, counts_E, offsets_E1, self.expert_impl)
        if self.activation == "swiglu":
            h = F.silu(grouped_mm(x_ND, self.w_gate, counts_E, offsets_E1, self.expert_impl)) * up
        else:
            h = _act(self.activation, up)
        return grouped_mm(h, self.w_down, counts_E, offsets_E1, self.expert_impl)


class SharedExperts(nn.Module):
    """Always-on dense FFN of hidden size ``num_shared * ffn_hidden_size`` (DeepSeek-style shared experts)."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int, activation: str = "swiglu", device=None,
                 dtype=None) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.activation = activation
        factory = {"device": device, "dtype": dtype}
        D, Fh = hidden_size, ffn_hidden_size
        self.w_gate = nn.Parameter(torch.empty(D, Fh, **factory)) if activation == "swiglu" else None
        self.w_up = nn.Parameter(torch.empty(D, Fh, **factory))
        self.w_down = nn.Parameter(torch.empty(Fh, D, **factory))
        for w in (self.w_gate, self.w_up, self.w_down):
            if w is not None:
                nn.init.normal_(w, std=1.0 / math.sqrt(w.shape[0]))

    def forward(self, x_TD: Tensor) -> Tensor:
        up = x_TD @ self.w_up
        h = F.silu(x_TD @ self.w_gate) * up if self.activation == "swiglu" else _act(self.activation, up)
        return h @ self.w_down
