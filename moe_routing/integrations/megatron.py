"""Routers of this library inside Megatron-Core's `MoELayer`, with no fork of Megatron.

Megatron-Core (>= 0.16; megatron/core/transformer/moe/moe_layer.py) builds an MoE layer's router from
``MoESubmodules.router``, a builder called as ``builder(config=..., pg_collection=...)`` (0.19 adds
``is_mtp_layer=``), and calls the router as ``router(hidden_states [S, B, D], padding_mask [S, B] | None)``, True
marking padding, expecting ``(probs [T, E], routing_map bool [T, E])`` with ``T = S * B`` tokens in ``[S, B]``
order. `router_builder` returns such a builder; the module it builds, `MegatronRouter`, runs one of our `Router`s,
scatters its `RoutingDecision` into ``probs`` (float32, the gate weight at routed pairs, 0 elsewhere) and
``routing_map``, and attaches our losses the way mcore's own ``TopKRouter`` attaches its aux losses
(router.py: ``MoEAuxLossAutoScaler`` on ``probs``, values logged in mcore's aux-loss tracker).

Loss conventions (followed from mcore's router.py): the summed value of our losses is divided by the
tensor x context parallel size (each of those ranks computes a full loss on its own tokens; mcore scales its
z-loss the same way), multiplied by the local non-padding token count when ``calculate_per_token_loss`` is set
(and, from core 0.19, by the tensor x context parallel size too), and its gradient is scaled by
``MoEAuxLossAutoScaler.set_loss_scale`` as mcore's are. Each loss is logged under its own name (``switch_aux``,
``seq_aux``, ``z_loss``, ``relu_l1``, ...) without its coefficient, averaged over the tp x dp x cp group.
``seq_aux`` treats each of the B columns of ``[S, B]`` as one sequence, as mcore's seq_aux_loss does.

Variable-k routers (ReLU, expert choice) route a data-dependent number of pairs. The all-gather dispatcher
sizes everything from ``routing_map``; the all-to-all dispatcher assumes ``T * moe_router_topk`` pairs in
dropless mode (core 0.19's argsort permute truncates to that count), so with it the builder requires either
``moe_expert_capacity_factor`` set (then the dispatcher counts ``routing_map.sum()``; a factor >= E / k drops
nothing) or ``moe_router_topk = E`` (every pair dispatched, non-routed ones with weight 0: E / k times the
expert compute). See the README section "Inside Megatron-Core" for measured costs.

Per-step controllers (aux-free bias, ReMoE's lambda) run through `moe_routing.step`; `with_controllers` wraps
mcore's ``finalize_model_grads`` so they run once per optimizer step, where mcore updates its own expert bias.
"""
from __future__ import annotations

import dataclasses
import inspect
import weakref
from functools import partial
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

try:
    from megatron.core import package_info
    from megatron.core.transformer.module import MegatronModule
    from megatron.core.transformer.moe.moe_layer import MoELayer as McoreMoELayer
    from megatron.core.transformer.moe.moe_utils import (MoEAuxLossAutoScaler, apply_router_token_dropping,
                                                         save_to_aux_losses_tracker)
    from megatron.core.transformer.spec_utils import ModuleSpec
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError("moe_routing.integrations.megatron needs megatron-core >= 0.16: "
                      "pip install 'moe_routing[megatron]'") from err

from ..control import step
from ..decision import RoutingContext, RoutingDecision
from ..losses.base import Loss, LossInputs
from ..losses.erc import ERCLoss
from ..ops.backend import check_backend_name, resolve_backend
from ..routers import ROUTERS, RecurrentRouterGroup, Router

_MCORE_VERSION = (int(package_info.MAJOR), int(package_info.MINOR))

try:
    # 0.19.2 logs through moe_logging's MoEMetricsTracker; there 0.16.1's save_to_aux_losses_tracker is a deprecated
    # wrapper (it warns) and get_moe_layer_wise_logging_tracker returns a fresh dict on each call (its clear()
    # clears nothing). Detected by import: moe_logging.py exists in 0.19.2, not in 0.16.1.
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
except ImportError:
    get_moe_metrics_tracker = None
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker


class _SharedContext:
    """The `RoutingContext` of one forward, shared by the layers of one builder (RMoE carries its state through
    it). The builder's first layer starts a new one on each forward; an activation-checkpoint recomputation
    (inside backward) keeps the current one."""

    def __init__(self) -> None:
        self.ctx: Optional[RoutingContext] = None

    def get(self, starts_forward: bool) -> RoutingContext:
        in_backward = torch._C._current_graph_task_id() != -1
        if self.ctx is None or (starts_forward and not in_backward):
            self.ctx = RoutingContext()
        return self.ctx


class MegatronRouter(MegatronModule):
    """Megatron-Core router interface (``forward(hidden_states, padding_mask) -> (probs, routing_map)``,
    ``set_layer_number``) around one of our `Router`s (``self.router``) and its losses. Built by `router_builder`.

    Attributes: ``last_aux_losses`` (each loss's value with its coefficient, detached) and ``last_stats`` (the
    losses' statistics and the router's ``decision.extra``), from the last training forward.
    """

    def __init__(self, router: Router, config: Any, pg_collection: Any = None, *,
                 losses: Optional[Sequence[Loss]] = None, backend: str = "auto", is_mtp_layer: bool = False,
                 shared_context: Optional[_SharedContext] = None, starts_forward: bool = True) -> None:
        super().__init__(config)
        if not isinstance(router, Router):
            raise TypeError(f"router must be a moe_routing Router, got {type(router).__name__}")
        if router.num_experts != config.num_moe_experts or router.hidden_size != config.hidden_size:
            raise ValueError(f"router has num_experts={router.num_experts}, hidden_size={router.hidden_size}; the "
                             f"config has {config.num_moe_experts}, {config.hidden_size}")
        self.router = router
        self.losses = list(router.default_losses() if losses is None else losses)
        for loss in self.losses:
            if not isinstance(loss, Loss):
                raise TypeError(f"losses must be Loss instances (e.g. SwitchAuxLoss(1e-2)), got {type(loss).__name__}")
        self.backend = check_backend_name(backend)
        self.is_mtp_layer = bool(is_mtp_layer)
        self.layer_number: Optional[int] = None
        self.tp_cp_group = getattr(pg_collection, "tp_cp", None)
        self.tp_dp_cp_group = getattr(pg_collection, "tp_dp_cp", None)
        self._context = shared_context if shared_context is not None else _SharedContext()
        self._starts_forward = starts_forward
        self._experts: Optional[weakref.ref] = None
        self.last_aux_losses: dict[str, Tensor] = {}
        self.last_stats: dict[str, Tensor] = {}
        for p in router.parameters():
            # as mcore's router weight: with sequence parallelism each TP rank routes its own tokens, so
            # finalize_model_grads must sum the router gradients over TP
            p.sequence_parallel = config.sequence_parallel
        _check_dispatch(config, router)

    def set_layer_number(self, layer_number: int) -> None:
        """Called by mcore's transformer layer (1-based over the model); keys logging and routing state."""
        self.layer_number = layer_number

    def bind_experts(self, experts: nn.Module) -> None:
        """Give ERC access to the layer's expert gate weights (see `bind_experts`)."""
        self._experts = weakref.ref(experts)

    def forward(self, hidden_states: Tensor, padding_mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        D, E = self.router.hidden_size, self.router.num_experts
        x_TD = hidden_states.reshape(-1, D)
        T = x_TD.shape[0]
        pad_T = None if padding_mask is None else padding_mask.reshape(-1).to(device=x_TD.device, dtype=torch.bool)
        if pad_T is not None and pad_T.numel() != T:
            raise ValueError(f"padding_mask has {pad_T.numel()} elements but hidden_states has {T} tokens")
        ctx = self._context.get(self._starts_forward)
        ctx.padding_mask = pad_T
        key = self.layer_number if self.layer_number is not None else id(self)
        decision = self.router(x_TD, ctx, key, resolve_backend(self.backend, x_TD.device))
        probs_TE, map_TE = decision_to_probs_map(decision, dense_map=self.config.moe_router_topk == E)
        if self.config.moe_expert_capacity_factor is not None:
            probs_TE, map_TE = apply_router_token_dropping(
                probs_TE, map_TE, router_topk=self.router.top_k,
                capacity_factor=self.config.moe_expert_capacity_factor,
                drop_policy=self.config.moe_token_drop_policy,
                pad_to_capacity=self.config.moe_pad_expert_input_to_capacity)
        self.last_aux_losses, self.last_stats = {}, dict(decision.extra)
        if self.losses and self.training and torch.is_grad_enabled():
            seq_T, num_seqs = None, 1
            if hidden_states.dim() == 3:  # [S, B, D]: token s * B + b belongs to sequence b
                num_seqs = hidden_states.shape[1]
                seq_T = torch.arange(T, device=x_TD.device) % num_seqs
            probs_TE = self._attach_losses(probs_TE, decision, None if pad_T is None else ~pad_T, seq_T, num_seqs)
        return probs_TE, map_TE

    def _expert_gate_EDF(self) -> Tensor:
        """The SwiGLU gate projections of the layer's experts as [E, D, F] (SequentialMLP, all E experts local)."""
        experts = self._experts() if self._experts is not None else None
        if experts is None:
            raise ValueError("ERCLoss inside Megatron-Core needs the layer's expert weights: call "
                             "moe_routing.integrations.megatron.bind_experts(model) once after building the model")
        mlps = getattr(experts, "local_experts", None)
        F = self.config.moe_ffn_hidden_size
        if mlps is None or len(mlps) != self.router.num_experts or not self.config.gated_linear_unit:
            raise ValueError("ERCLoss inside Megatron-Core supports SwiGLU SequentialMLP experts (local spec, "
                             "moe_grouped_gemm=False, gated_linear_unit=True) with all experts on each rank "
                             "(expert_model_parallel_size=1)")
        ws = [m.linear_fc1.weight for m in mlps]
        if ws[0].shape != (2 * F, self.router.hidden_size):
            raise ValueError(f"ERCLoss needs unsharded expert fc1 weights [2F, D] = [{2 * F}, "
                             f"{self.router.hidden_size}], got {tuple(ws[0].shape)} (expert tensor parallelism?)")
        return torch.stack([w[:F].t() for w in ws])  # mcore's GLU: the first half of fc1 is the gate

    def _attach_losses(self, probs_TE: Tensor, decision: RoutingDecision, valid_T: Optional[Tensor],
                       seq_T: Optional[Tensor], num_seqs: int) -> Tensor:
        needs_gate = any(isinstance(loss, ERCLoss) for loss in self.losses)
        inputs = LossInputs(decision=decision, top_k=self.router.top_k, valid_T=valid_T, seq_T=seq_T,
                            num_seqs=num_seqs, training=self.training, gate_weight_ED=self.router.gate_weight_ED(),
                            expert_gate_EDF=self._expert_gate_EDF() if needs_gate else None,
                            l1_coeff=self.router.sparsity_coeff())
        total = probs_TE.new_zeros(())
        for loss in self.losses:
            out = loss(inputs)
            value = out.value.detach()
            self.last_aux_losses[loss.name] = value
            self.last_stats.update(out.stats)
            total = total + out.value
            if loss.coeff > 0:
                self._log(loss.name, value / loss.coeff)
        if not total.requires_grad:
            return probs_TE
        tp_cp = self.tp_cp_group.size() if self.tp_cp_group is not None else 1
        total = total / tp_cp
        if self.config.calculate_per_token_loss:
            # finalize_model_grads divides every gradient by the global token count; undo it for the aux loss
            num_tokens = valid_T.sum() if valid_T is not None else probs_TE.shape[0]
            total = total * num_tokens * (tp_cp if _MCORE_VERSION >= (0, 19) else 1)
        return MoEAuxLossAutoScaler.apply(probs_TE, total)

    def _log(self, name: str, value: Tensor) -> None:
        if self.layer_number is None:
            return
        num_layers = self.config.num_layers + (self.config.mtp_num_layers or 0)
        layer = self.layer_number + (self.config.num_layers if self.is_mtp_layer else 0)
        if get_moe_metrics_tracker is not None:
            get_moe_metrics_tracker().record(name, value, layer, num_layers, avg_group=self.tp_dp_cp_group)
        else:
            save_to_aux_losses_tracker(name, value, layer, num_layers, avg_group=self.tp_dp_cp_group)


def logged_losses() -> dict[str, Tensor]:
    """What mcore's aux-loss tracker holds now (our losses and mcore's own): name -> per-layer values
    ``[num_layers]`` (the live tensors: zeroing one resets that entry)."""
    if get_moe_metrics_tracker is not None:
        return {name: entry.values for name, entry in get_moe_metrics_tracker().metrics.items()}
    return {name: entry["values"] for name, entry in get_moe_layer_wise_logging_tracker().items()}


def clear_logged_losses() -> None:
    """Empty mcore's aux-loss tracker (mcore's training loop does it after each logging step)."""
    if get_moe_metrics_tracker is not None:
        get_moe_metrics_tracker().clear()
    else:
        get_moe_layer_wise_logging_tracker().clear()


def decision_to_probs_map(decision: RoutingDecision, dense_map: bool = False) -> tuple[Tensor, Tensor]:
    """``(probs [T, E] float32, routing_map bool [T, E])`` of a decision: the gate weight at each routed pair
    (differentiable), 0 elsewhere. ``dense_map``: every entry of the map True (``moe_router_topk = E``: the
    dispatcher then sends every pair, the non-routed ones with weight 0)."""
    T, E = decision.num_tokens, decision.num_experts
    idx = (decision.token_N, decision.expert_N)
    probs_TE = decision.weight_N.new_zeros((T, E), dtype=torch.float32).index_put(idx, decision.weight_N.float())
    if dense_map:
        return probs_TE, torch.ones((T, E), dtype=torch.bool, device=probs_TE.device)
    map_TE = torch.zeros((T, E), dtype=torch.bool, device=probs_TE.device)
    map_TE[idx] = True
    return probs_TE, map_TE


def _check_dispatch(config: Any, router: Router) -> None:
    """Refuse dispatcher settings that would silently mis-route a variable-k router."""
    if not router.variable_k or config.moe_router_topk == router.num_experts:
        return
    kind = config.moe_token_dispatcher_type
    if kind == "flex" or (kind == "alltoall" and config.moe_expert_capacity_factor is None):
        raise ValueError(
            f"{type(router).__name__} routes a variable number of experts per token, but the {kind!r} dispatcher "
            f"assumes T * moe_router_topk pairs: use moe_token_dispatcher_type='allgather', or (alltoall) set "
            f"moe_expert_capacity_factor (>= num_experts / top_k = {router.num_experts / router.top_k:g} drops "
            f"nothing), or set moe_router_topk={router.num_experts} (= num_experts: dense map, weight 0 off the "
            f"routed pairs) and pass the nominal top_k to router_builder")


def _num_moe_layers(config: Any) -> int:
    freq = config.moe_layer_freq
    if isinstance(freq, int):
        return sum(1 for i in range(config.num_layers) if i % freq == 0)
    return int(sum(freq))


class RouterBuilder:
    """A builder for ``MoESubmodules.router`` (see `router_builder`)."""

    def __init__(self, router: Union[str, type, RecurrentRouterGroup], losses: Optional[Sequence[Loss]],
                 backend: str, router_kwargs: dict) -> None:
        if isinstance(router, str) and router not in ROUTERS and router != "recurrent":
            raise ValueError(f"router must be one of {sorted([*ROUTERS, 'recurrent'])}, a Router subclass or a "
                             f"RecurrentRouterGroup, got {router!r}")
        if not isinstance(router, (str, RecurrentRouterGroup)) and not (isinstance(router, type)
                                                                         and issubclass(router, Router)):
            raise TypeError(f"router must be a name, a Router subclass or a RecurrentRouterGroup, got {router!r}")
        self.router, self.losses, self.router_kwargs = router, losses, dict(router_kwargs)
        self.backend = check_backend_name(backend)
        self.group = router if isinstance(router, RecurrentRouterGroup) else None
        self.num_built = 0
        self.shared_context = _SharedContext()

    def __repr__(self) -> str:
        return f"RouterBuilder(router={self.router!r}, losses={self.losses!r}, kwargs={self.router_kwargs!r})"

    def __call__(self, *, config: Any, pg_collection: Any = None, is_mtp_layer: bool = False,
                 **_newer_kwargs: Any) -> MegatronRouter:
        on_cpu = config.use_cpu_initialization or not torch.cuda.is_available()
        device = "cpu" if on_cpu else torch.cuda.current_device()
        kwargs = dict(self.router_kwargs)
        top_k = kwargs.pop("top_k", config.moe_router_topk)
        recurrent = self.router == "recurrent" or self.group is not None
        if recurrent:
            if self.group is None:
                kwargs.setdefault("init_std", config.init_method_std)
                num_layers = kwargs.pop("num_layers", None) or _num_moe_layers(config)
                self.group = RecurrentRouterGroup(config.hidden_size, config.num_moe_experts, top_k, num_layers,
                                                  device=device, **kwargs)
            if self.num_built >= self.group.num_layers:
                raise ValueError(f"the RecurrentRouterGroup has {self.group.num_layers} layers, but a further MoE "
                                 "layer is being built (MTP layers and pipeline stages are not supported for RMoE)")
            router = self.group.routers[self.num_built]
        else:
            cls = ROUTERS[self.router] if isinstance(self.router, str) else self.router
            if "init_std" in inspect.signature(cls.__init__).parameters:
                kwargs.setdefault("init_std", config.init_method_std)  # mcore's router init
            router = cls(config.hidden_size, config.num_moe_experts, top_k, device=device, **kwargs)
        built = MegatronRouter(router, config, pg_collection, losses=self.losses, backend=self.backend,
                               is_mtp_layer=is_mtp_layer,
                               shared_context=self.shared_context if recurrent else None,
                               starts_forward=not recurrent or self.num_built == 0)
        self.num_built += 1
        return built


def router_builder(router: Union[str, type, RecurrentRouterGroup] = "relu", *,
                   losses: Optional[Sequence[Loss]] = None, backend: str = "auto",
                   **router_kwargs: Any) -> RouterBuilder:
    """A builder for Megatron-Core's ``MoESubmodules.router``.

    Args:
        router: a name from `moe_routing.routers.ROUTERS` ("topk", "relu", "sinkhorn", "expert_choice"),
            "recurrent" (RMoE: one `RecurrentRouterGroup` for the MoE layers this builder builds, in build order),
            a `Router` subclass, or a `RecurrentRouterGroup` to use as is.
        losses: our layer-level losses (None: the router's defaults, e.g. ReMoE's L1 for "relu"). Set mcore's
            own ``moe_aux_loss_coeff`` / ``moe_z_loss_coeff`` to 0 / None: they belong to mcore's router only.
        backend: kernel backend for routing ops ("auto", "torch", "triton", "cuda").
        router_kwargs: passed to the router (``top_k`` defaults to ``config.moe_router_topk``, ``init_std`` to
            ``config.init_method_std``; "recurrent" also takes ``num_layers``, default: the model's MoE layers).

    Each call ``builder(config=..., pg_collection=..., [is_mtp_layer=...])`` builds one `MegatronRouter`.
    """
    return RouterBuilder(router, losses, backend, router_kwargs)


def with_router(spec: Any, builder: Callable) -> Any:
    """``spec`` (an mcore MoE spec: a ``ModuleSpec`` (core 0.16) or a ``functools.partial`` of ``MoELayer``
    (core 0.19)) with ``submodules.router`` replaced by ``builder``; ``spec`` itself is left unchanged."""
    if isinstance(spec, ModuleSpec):
        return dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, router=builder))
    if isinstance(spec, partial) and "submodules" in spec.keywords:
        keywords = {**spec.keywords, "submodules": dataclasses.replace(spec.keywords["submodules"], router=builder)}
        return partial(spec.func, *spec.args, **keywords)
    raise TypeError(f"spec must be an mcore MoE ModuleSpec or partial(MoELayer, submodules=...), got {spec!r}")


def moe_layer_spec(router: Union[str, type, RecurrentRouterGroup] = "relu", *, num_experts: int,
                   moe_grouped_gemm: bool = False, losses: Optional[Sequence[Loss]] = None, backend: str = "auto",
                   **router_kwargs: Any) -> Any:
    """Megatron-Core's local (no Transformer Engine) MoE spec with our router: put it in a GPT layer spec as
    ``layer_spec.submodules.mlp``. ``router``, ``losses``, ``backend``, ``router_kwargs``: as in `router_builder`."""
    from megatron.core.models.backends import LocalSpecProvider
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend

    spec = get_moe_module_spec_for_backend(LocalSpecProvider(), num_experts=num_experts,
                                           moe_grouped_gemm=moe_grouped_gemm)
    return with_router(spec, router_builder(router, losses=losses, backend=backend, **router_kwargs))


def build_moe_layer(spec: Any, config: Any, layer_number: int = 1, pg_collection: Any = None) -> nn.Module:
    """An MoE layer from ``spec`` (e.g. `moe_layer_spec`'s) as mcore's ``TransformerLayer`` builds its ``mlp``,
    numbered ``layer_number``: 0.16.1 passes a ``ModuleSpec`` to ``build_module``, 0.19.2 calls its builder
    (a ``partial``) with ``config``, ``pg_collection`` and ``is_mtp_layer``."""
    from megatron.core.transformer.spec_utils import build_module

    if isinstance(spec, ModuleSpec):
        layer = build_module(spec, config=config, layer_number=layer_number, pg_collection=pg_collection)
    else:
        layer = spec(config=config, pg_collection=pg_collection, is_mtp_layer=False)
    layer.set_layer_number(layer_number)
    return layer


def bind_experts(model: nn.Module) -> int:
    """Let each `MegatronRouter` in ``model`` read its layer's expert weights (needed by `ERCLoss` only).
    Returns the number of layers bound."""
    n = 0
    for module in model.modules():
        if isinstance(module, McoreMoELayer) and isinstance(module.router, MegatronRouter):
            module.router.bind_experts(module.experts)
            n += 1
    return n


def with_controllers(finalize_model_grads: Callable, group: Any = None) -> Callable:
    """``finalize_model_grads`` followed by `moe_routing.step` on the model chunks: assign the result to
    ``config.finalize_model_grads_func`` and every per-step controller runs once per optimizer step, where mcore
    updates its own expert bias. ``group``: the group controller statistics are summed over (default: mcore's
    tensor x data x context parallel group, as for its expert bias). A step the optimizer then skips (inf/NaN
    gradients) still runs the controllers."""

    def finalize(model: Sequence[nn.Module], *args: Any, **kwargs: Any) -> Any:
        out = finalize_model_grads(model, *args, **kwargs)
        g = group
        if g is None and torch.distributed.is_initialized():
            from megatron.core import parallel_state
            g = parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True)
        step(nn.ModuleList(list(model)), g)
        return out

    return finalize


__all__ = ["MegatronRouter", "RouterBuilder", "router_builder", "moe_layer_spec", "with_router", "bind_experts",
           "with_controllers", "decision_to_probs_map", "logged_losses", "clear_logged_losses",
           "build_moe_layer"]
