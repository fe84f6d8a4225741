"""`swap_routers`: this library's routers inside Hugging Face transformers 5.x MoE models.

Each supported sparse block (a ``gate`` router plus an ``experts`` module decorated with
``use_experts_implementation``; Qwen3-MoE, Mixtral, OLMoE, DeepSeek-V3 in transformers/models/*/modeling_*.py)
gets one of our routers:

- a fixed-k router keeps HF's block: its ``gate`` becomes a `RouterGate`, which runs our router and returns what
  HF's gate returns, ``(router_logits [T, E], top_k_weights [T, K], top_k_index [T, K])``; HF's experts (any
  ``experts_implementation``) and the rest of the block are untouched.
- a variable-k router (ReLU, expert choice) replaces the whole block with a `MoEBlock`: our `MoELayer` on the
  block's own expert tensors (views, no copy) plus HF's shared experts when the block has them.

``router="topk"`` (the default) builds a `TopKRouter` with the family's gating conventions (`family_topk_kwargs`):
with ``init_from_gate=True`` the swapped model computes what the original does.

``output_router_logits=True``: HF records ``router_logits`` with a forward hook on every instance of the
family's gate class (``_can_record_outputs``: ``OutputRecorder(<Gate>, index=0)``). `RouterGate` and the
`MoEBlock`'s logits tap are built as subclasses of that class, so they are recorded like HF's gate, and HF's
``load_balancing_loss_func`` (a softmax over what is recorded) reads our router's raw logits.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

from ..layer import MoELayer
from ..ops.backend import check_backend_name, resolve_backend
from ..routers import ROUTERS, Router, TopKRouter
from ..selection import LayerRouting
from ..validation import check_bool

# DeepSeek-V3's bias update rate (gamma = 0.001, arXiv 2412.19437 section 2.1.2); it moves only when the user
# runs the controllers (`moe_routing.step` / `moe_routing.attach`)
DEEPSEEK_BIAS_UPDATE_RATE = 1e-3
# HF gate classes (by name) whose routing `family_topk_kwargs` reproduces; their blocks are the ones swapped
SUPPORTED_GATES = ("Qwen3MoeTopKRouter", "OlmoeTopKRouter", "MixtralTopKRouter", "DeepseekV3TopkRouter")


def family_topk_kwargs(gate: nn.Module) -> dict:
    """`TopKRouter` arguments reproducing an HF gate's routing, keyed by the gate's class.

    - Qwen3-MoE, OLMoE: softmax over all E, top-k of the probabilities, renormalised iff ``norm_topk_prob``.
    - Mixtral: softmax over all E, top-k, always renormalised.
    - DeepSeek-V3: sigmoid scores; selection on scores + ``e_score_correction_bias`` within the best
      ``topk_group`` of ``n_group`` groups (a group scores the sum of its 2 best); gates are the chosen
      sigmoid scores, renormalised iff ``norm_topk_prob``, times ``routed_scaling_factor``.
    """
    name = type(gate).__name__
    if name in ("Qwen3MoeTopKRouter", "OlmoeTopKRouter"):
        return {"score_func": "softmax", "softmax_before_topk": True, "normalize": bool(gate.norm_topk_prob)}
    if name == "MixtralTopKRouter":
        return {"score_func": "softmax", "softmax_before_topk": True, "normalize": True}
    if name == "DeepseekV3TopkRouter":
        return {"score_func": "sigmoid", "num_groups": int(gate.num_group), "topk_groups": int(gate.topk_group),
                "group_score": "top2_sum", "normalize": bool(gate.norm_topk_prob),
                "scaling_factor": float(gate.routed_scaling_factor), "bias_update_rate": DEEPSEEK_BIAS_UPDATE_RATE}
    raise ValueError(f"unsupported HF router class {name}; supported: {SUPPORTED_GATES}")


class RouterGate(nn.Module):
    """Stands in for an HF gate: runs ``router`` (ours) and returns HF's gate outputs
    ``(router_logits [T, E] float32 raw logits, top_k_weights [T, K], top_k_index int64 [T, K])``.

    Built by `swap_routers` as a subclass of the replaced gate's class (only for HF's output recorder; none of
    that class's code or parameters is used).

    Routes through a `LayerRouting` (``_routing``) as an `MoELayer` does, so `record_routing`, `replay_routing`,
    `moe_routing.intervene`, `moe_routing.rerouting` and `analysis.collect_routing` act on it
    (`moe_routing.routing_layers`), and an activation-checkpoint recomputation reuses its forward's selection
    (kept on the gate weights' graph).
    """

    def __init__(self, router: Router, layer_idx: int, backend: str = "auto") -> None:
        nn.Module.__init__(self)  # not the HF gate's __init__: nothing of it is kept
        self.router = router
        self.layer_idx = layer_idx
        self.backend = check_backend_name(backend)
        self.top_k, self.num_experts = router.top_k, router.num_experts
        self.hidden_dim = router.hidden_size
        self._routing = LayerRouting()

    @property
    def layer_key(self) -> int:
        return self.layer_idx

    def forward(self, hidden_states: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x_TD = hidden_states.reshape(-1, self.hidden_dim)
        decision, kept = self._routing.route(self, x_TD, None, resolve_backend(self.backend, x_TD.device))
        return decision.logits_TE, self._routing.keep(decision.weights_TK, kept), decision.experts_TK


class RouterLogitsTap(nn.Module):
    """Identity on a [T, E] logits tensor, returning ``(logits,)``: the module HF's output recorder hooks for a
    `MoEBlock` (built as a subclass of the family's gate class)."""

    def __init__(self) -> None:
        nn.Module.__init__(self)

    def forward(self, logits_TE: Tensor) -> tuple[Tensor]:
        return (logits_TE,)


class MoEBlock(nn.Module):
    """An HF sparse block rebuilt on `MoELayer` (for variable-k routers): ``y = moe(x) [+ shared_experts(x)]``.

    ``moe.experts`` holds views of the HF block's ``gate_up_proj`` / ``down_proj`` storage in our layout
    (``w_gate``, ``w_up`` [E, H, I], ``w_down`` [E, I, H]); the router's raw logits pass through
    ``router_logits_tap`` so ``output_router_logits=True`` records them.

    Its state dict has the keys and layout of the HF block it replaced, so ``save_pretrained`` writes (and reverts
    to the checkpoint's original format) what HF's own block would: ``experts.gate_up_proj [E, 2I, H]``,
    ``experts.down_proj [E, H, I]`` (whole tensors, not the strided views safetensors refuses), the router's
    entries under ``gate.`` (its [E, D] ``weight`` where HF's gate weight was) and ``shared_experts.*``.
    ``load_state_dict`` maps them back. Reload: ``from_pretrained`` then `swap_routers` with the same router and
    ``init_from_gate=True``; router state other than ``weight`` (e.g. ReLU's L1 coefficient) reloads only through
    ``load_state_dict`` into a swapped model (``from_pretrained`` reports those keys as unexpected).
    """

    def __init__(self, moe: MoELayer, logits_tap: nn.Module, shared_experts: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.moe = moe
        self.router_logits_tap = logits_tap
        self.shared_experts = shared_experts
        self._register_state_dict_hook(_hf_layout_state_dict)
        self.register_load_state_dict_pre_hook(_our_layout_state_dict)

    def forward(self, hidden_states: Tensor) -> Tensor:
        logits: list[Tensor] = []
        handle = self.moe.router.register_forward_hook(lambda _m, _args, decision: logits.append(decision.logits_TE))
        try:
            y = self.moe(hidden_states)
        finally:
            handle.remove()
        if logits:  # an empty input routes nothing
            self.router_logits_tap(logits[-1])
        if self.shared_experts is not None:
            y = y + self.shared_experts(hidden_states)
        return y


def _packed_gate_up(w_gate_EHI: Tensor, w_up_EHI: Tensor) -> Tensor:
    """HF's ``gate_up_proj`` [E, 2I, H] from our two views of it: the packed tensor itself (no copy) while both
    still view one contiguous [E, 2I, H] storage, else a concatenated copy."""
    E, H, I = w_gate_EHI.shape
    gate_EIH, up_EIH = w_gate_EHI.transpose(1, 2), w_up_EHI.transpose(1, 2)
    packed = gate_EIH.as_strided((E, 2 * I, H), (2 * I * H, H, 1)) if gate_EIH.stride() == (2 * I * H, H, 1) else None
    if (packed is not None and w_gate_EHI.untyped_storage().data_ptr() == w_up_EHI.untyped_storage().data_ptr()
            and up_EIH.storage_offset() == gate_EIH.storage_offset() + I * H and up_EIH.stride() == gate_EIH.stride()):
        return packed
    return torch.cat([gate_EIH, up_EIH], dim=1)


def _hf_layout_state_dict(block: nn.Module, state: dict, prefix: str, _metadata: Any) -> None:
    """State-dict hook of `MoEBlock`: our entries renamed and re-laid out as HF's block (see `MoEBlock`)."""
    experts = prefix + "moe.experts."
    w_gate, w_up, w_down = (state.pop(experts + name) for name in ("w_gate", "w_up", "w_down"))
    for key in [k for k in state if k.startswith(prefix + "moe.router.")]:
        state[prefix + "gate." + key[len(prefix + "moe.router."):]] = state.pop(key)
    state[prefix + "experts.gate_up_proj"] = _packed_gate_up(w_gate, w_up).detach()
    state[prefix + "experts.down_proj"] = w_down.transpose(1, 2).detach()


def _our_layout_state_dict(block: nn.Module, state: dict, prefix: str, *_args: Any) -> None:
    """Load-state-dict pre-hook of `MoEBlock`: the inverse of `_hf_layout_state_dict` (keys already in our layout
    pass through)."""
    gate_up = state.pop(prefix + "experts.gate_up_proj", None)
    if gate_up is not None:
        inter = gate_up.shape[1] // 2
        state[prefix + "moe.experts.w_gate"] = gate_up[:, :inter].transpose(1, 2)
        state[prefix + "moe.experts.w_up"] = gate_up[:, inter:].transpose(1, 2)
    down = state.pop(prefix + "experts.down_proj", None)
    if down is not None:
        state[prefix + "moe.experts.w_down"] = down.transpose(1, 2)
    for key in [k for k in state if k.startswith(prefix + "gate.")]:
        state[prefix + "moe.router." + key[len(prefix + "gate."):]] = state.pop(key)


RouterSpec = Union[str, Callable[..., Router]]


def _build_router(spec: RouterSpec, gate: nn.Module, router_kwargs: dict) -> Router:
    E, D = gate.weight.shape
    k = int(gate.top_k)
    factory = {"device": gate.weight.device}
    if spec == "topk":
        router = TopKRouter(D, E, k, **{**family_topk_kwargs(gate), **factory, **router_kwargs})
    elif isinstance(spec, str):
        if spec not in ROUTERS:
            raise ValueError(f"router must be 'topk', a name from {sorted(ROUTERS)} or a callable "
                             f"(hidden_size, num_experts, top_k) -> Router, got {spec!r}")
        router = ROUTERS[spec](D, E, k, **{**factory, **router_kwargs})
    elif callable(spec):
        router = spec(D, E, k, **router_kwargs).to(gate.weight.device)
    else:
        raise TypeError(f"router must be a name or a callable returning a Router, got {type(spec).__name__}")
    if not isinstance(router, Router):
        raise TypeError(f"the router factory must return a moe_routing Router, got {type(router).__name__}")
    if (router.num_experts, router.hidden_size) != (E, D):
        raise ValueError(f"the router has num_experts={router.num_experts}, hidden_size={router.hidden_size}; the "
                         f"HF block has {E}, {D}")
    return router


@torch.no_grad()
def _init_from_gate(router: Router, gate: nn.Module) -> None:
    weight = router.gate_weight_ED()
    if weight is None or weight.shape != gate.weight.shape:
        raise ValueError(f"init_from_gate=True needs a router with an [E, D] gate weight; {type(router).__name__} "
                         "has none (pass init_from_gate=False)")
    weight.copy_(gate.weight)
    bias = getattr(gate, "e_score_correction_bias", None)
    if bias is not None and getattr(router, "expert_bias", None) is not None:
        router.expert_bias.copy_(bias)


def _expert_views(experts: nn.Module) -> tuple[Tensor, Tensor, Tensor]:
    """``(w_gate, w_up, w_down)`` in `GroupedExperts`' layout as views of the HF experts' tensors."""
    act = getattr(experts.config, "hidden_act", None)
    if (not experts.has_gate or experts.has_bias or experts.is_transposed or not experts.is_concatenated
            or experts.has_post_expert_norm or act not in ("silu", "swish")):
        raise ValueError(f"{type(experts).__name__} is not a concatenated [gate; up] SwiGLU expert stack without "
                         "bias; a variable-k router cannot rebuild this block on MoELayer")
    gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
    inter = gate_up.shape[1] // 2
    return gate_up[:, :inter].transpose(1, 2), gate_up[:, inter:].transpose(1, 2), down.transpose(1, 2)


def _moe_block(block: nn.Module, router: Router, layer_idx: int, backend: str, tap: nn.Module) -> MoEBlock:
    w_gate, w_up, w_down = _expert_views(block.experts)
    E, D, inter = w_gate.shape
    device = w_gate.device
    # built on the meta device: the expert tensors are the HF block's, so nothing is allocated or initialised
    moe = MoELayer(D, inter, E, router.top_k, router=router, activation="swiglu", backend=backend,
                   layer_idx=layer_idx, device="meta", dtype=w_gate.dtype)
    trainable = block.experts.gate_up_proj.requires_grad
    moe.experts.w_gate = nn.Parameter(w_gate, requires_grad=trainable)
    moe.experts.w_up = nn.Parameter(w_up, requires_grad=trainable)
    moe.experts.w_down = nn.Parameter(w_down, requires_grad=block.experts.down_proj.requires_grad)
    moe.register_buffer("aux_loss_scale", torch.ones((), dtype=torch.float32, device=device), persistent=False)
    return MoEBlock(moe, tap, getattr(block, "shared_experts", None))


def _as_subclass_of(base: type, adapter: type) -> type:
    return type(f"{adapter.__name__}As{base.__name__}", (adapter, base), {"__module__": adapter.__module__})


def _sparse_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules()
            if type(getattr(m, "gate", None)).__name__ in SUPPORTED_GATES and hasattr(m, "experts")]


def _recorders_installed(model: nn.Module) -> list[tuple[nn.Module, int]]:
    """The (sub)models whose ``router_logits`` hooks HF has already installed, with the recorded output index.

    HF installs its recording hooks once, on first use; modules added afterwards get the hook from here."""
    found = []
    for m in model.modules():
        if getattr(m, "_output_capturing_hooks_installed", False):
            spec = getattr(type(m), "_can_record_outputs", None) or {}
            recorder = spec.get("router_logits")
            if recorder is not None:
                found.append((m, int(getattr(recorder, "index", 0))))
    return found


def swap_routers(model: nn.Module, router: RouterSpec = "topk", init_from_gate: bool = True, *,
                 router_kwargs: Optional[dict] = None, backend: str = "auto") -> list[str]:
    """Replace the router of every supported sparse MoE block of an HF model; returns the swapped blocks' names.

    Args:
        model: a transformers 5.x model (Qwen3-MoE, Mixtral, OLMoE, DeepSeek-V3 families).
        router: "topk" (a `TopKRouter` with the family's gating, `family_topk_kwargs`), another name from
            `moe_routing.routers.ROUTERS` ("relu", ...), or a callable ``(hidden_size, num_experts, top_k,
            **router_kwargs) -> Router`` (a router class, a ``functools.partial``). Fixed-k routers keep HF's block
            (`RouterGate`); variable-k ones replace it with a `MoEBlock` on the same expert tensors.
        init_from_gate: copy HF's gate weight [E, D] (and DeepSeek-V3's ``e_score_correction_bias`` into the
            aux-free bias) into the new router.
        router_kwargs: extra router arguments (override the family's for "topk").
        backend: dispatch backend of our routers and `MoELayer` ("auto": Triton on CUDA).

    Our routers keep float32 parameters whatever the model dtype. Controllers (aux-free bias, ReLU's L1
    coefficient) update only through `moe_routing.step(model)` / `moe_routing.attach(model, optimizer)`.
    HF's ``attention_mask`` does not reach our routers: padding tokens count in their statistics.
    """
    check_bool("init_from_gate", init_from_gate)
    check_backend_name(backend)
    router_kwargs = dict(router_kwargs or {})
    blocks = _sparse_blocks(model)
    if not blocks:
        raise ValueError(f"no supported sparse MoE block found in {type(model).__name__} (routers supported: "
                         f"{SUPPORTED_GATES})")
    recorders = _recorders_installed(model)
    new_modules, swapped = [], []
    for layer_idx, (name, block) in enumerate(blocks):
        gate = block.gate
        ours = _build_router(router, gate, router_kwargs)
        if init_from_gate:
            _init_from_gate(ours, gate)
        if ours.variable_k:
            tap = _as_subclass_of(type(gate), RouterLogitsTap)()
            new = _moe_block(block, ours, layer_idx, backend, tap)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, new)
            new_modules.append(tap)
        else:
            new = _as_subclass_of(type(gate), RouterGate)(ours, layer_idx, backend)
            block.gate = new
            new_modules.append(new)
        swapped.append(name)
    if recorders:
        from transformers.utils.output_capturing import install_output_capuring_hook

        for owner, index in recorders:
            owned = {id(m) for m in owner.modules()}
            for m in new_modules:
                if id(m) in owned:
                    install_output_capuring_hook(m, "router_logits", index)
    return swapped
