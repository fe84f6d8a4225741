"""The ``"moe_routing"`` experts implementation for Hugging Face transformers 5.x MoE models.

transformers 5 picks an experts kernel by name: a class decorated with ``use_experts_implementation``
(transformers/integrations/moe.py) looks ``config._experts_implementation`` up in ``ALL_EXPERTS_FUNCTIONS`` on
every call and runs ``fn(experts_module, hidden_states [T, H], top_k_index [T, K], top_k_weights [T, K])``.
`moe_routing_experts_forward` is such a function running this library's dispatch ops: `sort_by_expert`,
`permute`, `grouped_mm` and `combine` (Triton kernels on CUDA with the "auto" backend; ``MOE_ROUTING_BACKEND``
overrides it, see `moe_routing.ops.backend`).

No weight copy: HF stores ``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I] (``nn.Linear`` layout, rows
are outputs); `grouped_mm` takes ``[E, in, out]``, so the experts run on the transposed *views*
``gate_up_proj.transpose(1, 2)`` [E, H, 2I] and ``down_proj.transpose(1, 2)`` [E, I, H] (``torch._grouped_mm``
accepts the transposed strides; the loop fallback slices them). Classes declared ``is_transposed`` already
store ``[E, in, out]`` and are used as they are. The gate/up split and activation are the module's own
``_apply_gate`` (concatenated or interleaved layouts alike), biases and a post-expert norm are honoured.

Not supported: expert parallelism (HF's ``_is_expert_parallel`` sentinel ids), which raises.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops.backend import resolve_backend
from ..ops.combine import combine
from ..ops.counts import invert_permutation, sort_by_expert
from ..ops.grouped_mm import grouped_mm
from ..ops.permute import permute

EXPERTS_IMPLEMENTATION = "moe_routing"


def _as_EDF(weight: Tensor, is_transposed: bool) -> Tensor:
    """HF's ``[E, out, in]`` weight as the ``[E, in, out]`` view `grouped_mm` takes (no copy)."""
    return weight if is_transposed else weight.transpose(1, 2)


def moe_routing_experts_forward(self: nn.Module, hidden_states: Tensor, top_k_index: Tensor,
                                top_k_weights: Tensor) -> Tensor:
    """Run an HF experts module (``self``) on ``hidden_states`` [T, H] with its routing: ``top_k_index`` int
    [T, K] experts and ``top_k_weights`` [T, K] gate weights -> [T, H] in ``hidden_states``' dtype."""
    if getattr(self, "_is_expert_parallel", False):
        raise NotImplementedError("experts_implementation='moe_routing' does not support HF expert parallelism "
                                  "(sentinel expert ids); use 'grouped_mm' for expert-parallel models")
    if top_k_index.dim() != 2 or top_k_weights.shape != top_k_index.shape:
        raise ValueError(f"top_k_index and top_k_weights must both be [T, K], got {tuple(top_k_index.shape)} and "
                         f"{tuple(top_k_weights.shape)}")
    T, K = top_k_index.shape
    E = self.num_experts
    w_in = self.gate_up_proj if self.has_gate else self.up_proj
    # like HF's grouped_mm path: under autocast the input may be float32 while the weights are bf16
    x_TH = hidden_states.reshape(T, hidden_states.shape[-1]).to(w_in.dtype)
    backend = resolve_backend("auto", x_TH.device)
    token_N = torch.arange(T, device=x_TH.device).repeat_interleave(K)
    expert_N = top_k_index.reshape(-1).long()
    pair_of_row_N, counts_E, offsets_E1 = sort_by_expert(expert_N, E, backend)
    x_NH = permute(x_TH, token_N[pair_of_row_N], backend, top_k=K, max_pairs=K)
    h = grouped_mm(x_NH, _as_EDF(w_in, self.is_transposed), counts_E, offsets_E1)
    expert_of_row_N = expert_N[pair_of_row_N] if self.has_bias else None
    if self.has_bias:
        h = h + (self.gate_up_proj_bias if self.has_gate else self.up_proj_bias)[expert_of_row_N]
    h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
    out_NH = grouped_mm(h, _as_EDF(self.down_proj, self.is_transposed), counts_E, offsets_E1)
    if self.has_bias:
        out_NH = out_NH + self.down_proj_bias[expert_of_row_N]
    if self.has_post_expert_norm:
        out_NH = self.post_expert_norm(out_NH)
    # pairs and rows come from sort_by_expert: valid by construction, no per-call host check
    y_TH = combine(out_NH, top_k_weights.reshape(-1), invert_permutation(pair_of_row_N), token_N, T, K, backend,
                   max_pairs=K, check_indices=False)
    return y_TH.to(hidden_states.dtype)
