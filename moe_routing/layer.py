"""MoELayer: a drop-in ``nn.Module`` wiring router -> losses -> dispatch -> experts -> combine -> stats."""
from __future__ import annotations

import copy
import dataclasses
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .decision import RoutingContext, RoutingDecision
from .dispatch import Dispatcher, LocalDispatcher
from .experts import SharedExperts
from .losses.attach import inject_aux_loss
from .losses.base import Loss, LossInputs
from .metrics import layer_stats, sparsity_stats
from .ops.backend import check_backend_name, resolve_backend
from .ops.capacity import DROP_POLICIES, expert_capacity
from .routers import ROUTERS, Router
from .selection import LayerRouting
from .settings import debug_checks
from .validation import check_bool, check_int


class MoELayer(nn.Module):
    """Mixture-of-Experts FFN layer.

    ``y = layer(x)`` maps ``x`` [..., D] to ``y`` of the same shape and dtype ([B, S, D] and [T, D] alike).

    Args:
        hidden_size: D.  ffn_hidden_size: F, each expert's hidden size.  num_experts: E.
        top_k: experts per token (nominal k for variable-k routers, used by losses and capacity).
        router: a name from `moe_routing.routers.ROUTERS` ("topk", "relu", "sinkhorn", "expert_choice", "hash",
            "hyper", "blockffn", "mor", "compete", "bilevel") or a `Router` instance (its E, D and top_k must match).
        router_kwargs: extra arguments when ``router`` is a name (e.g. ``{"score_func": "sigmoid"}``).
        activation: "swiglu" | "gelu" | "relu".
        capacity_factor: None = dropless; else capacity ``ceil(cf * T * k / E)`` per expert.
        drop_policy: capacity mode: "weight" drops the lowest gate weights, "position" the latest tokens.
        num_shared_experts: always-on experts (one dense FFN of ``num_shared_experts * F``), added to the output.
        backend: dispatch backend, "auto" | "torch" | "triton" | "cuda".
        expert_impl: "auto" | "grouped_mm" | "loop" (see `ops.grouped_mm`).
        losses: layer-level losses; None uses the router's defaults (`Router.default_losses`).
        return_aux_loss: return ``(y, aux_loss)`` instead of injecting the aux loss into the backward.
        layer_idx: key of this layer's state in a `RoutingContext` (assigned by `routing_context` if None).
        track_stats: keep per-forward routing stats in ``last_stats`` (read by `routing_report`).
        dispatcher: how routed tokens reach the experts (`moe_routing.dispatch`); None = `LocalDispatcher` (all
            experts on this device). An `AllToAllDispatcher` shards the experts over its group: ``experts`` then
            holds this rank's shard.
    """

    def __init__(self, hidden_size: int, ffn_hidden_size: int, num_experts: int, top_k: int = 2,
                 router: Union[str, Router] = "topk", activation: str = "swiglu",
                 capacity_factor: Optional[float] = None, num_shared_experts: int = 0, backend: str = "auto", *,
                 router_kwargs: Optional[dict] = None, drop_policy: str = "weight", expert_impl: str = "auto",
                 losses: Optional[Sequence[Loss]] = None, return_aux_loss: bool = False,
                 layer_idx: Optional[int] = None, track_stats: bool = True,
                 dispatcher: Optional[Dispatcher] = None, device=None, dtype=None) -> None:
        super().__init__()
        check_int("hidden_size", hidden_size, 1)
        check_int("num_experts", num_experts, 1)
        check_int("top_k", top_k, 1, num_experts)
        check_int("num_shared_experts", num_shared_experts, 0)
        if layer_idx is not None:
            check_int("layer_idx", layer_idx, 0)
        for name, flag in (("return_aux_loss", return_aux_loss), ("track_stats", track_stats)):
            check_bool(name, flag)
        if capacity_factor is not None:
            expert_capacity(capacity_factor, 1, 1, 1)  # validates > 0
        if drop_policy not in DROP_POLICIES:
            raise ValueError(f"drop_policy must be one of {DROP_POLICIES}, got {drop_policy!r}")
        if dispatcher is not None and not isinstance(dispatcher, Dispatcher):
            raise TypeError(f"dispatcher must be a moe_routing.dispatch.Dispatcher or None, got "
                            f"{type(dispatcher).__name__}")
        self.dispatcher = dispatcher if dispatcher is not None else LocalDispatcher()
        self.hidden_size, self.num_experts, self.top_k = hidden_size, num_experts, top_k
        self.capacity_factor, self.drop_policy = capacity_factor, drop_policy
        self.backend = check_backend_name(backend)
        self.return_aux_loss = return_aux_loss
        self.layer_idx = layer_idx
        self.track_stats = track_stats
        # a tensor updated in place (`set_aux_loss_scale`), not a Python float: a compiled graph or CUDA graph
        # reads it as an input, so a changing scale (AMP, accumulation) is never baked in as a constant
        self.register_buffer("aux_loss_scale", torch.ones((), dtype=torch.float32, device=device),
                             persistent=False)
        self.router = self._build_router(router, router_kwargs or {}, device, dtype)
        if self.router.uses_expert_responses and not isinstance(self.dispatcher, LocalDispatcher):
            raise ValueError(f"router {type(self.router).__name__} reads every expert's response to every token, "
                             f"which needs all experts on this device; dispatcher must be a LocalDispatcher, got "
                             f"{self.dispatcher!r}")
        config = {"top_k": top_k, "router": type(self.router).__name__, "capacity_factor": capacity_factor,
                  "drop_policy": drop_policy, "num_shared_experts": num_shared_experts}
        self.experts = self.dispatcher.build_experts(num_experts, hidden_size, ffn_hidden_size, activation,
                                                     expert_impl, config=config, device=device, dtype=dtype)
        self.shared_experts = (SharedExperts(hidden_size, num_shared_experts * ffn_hidden_size, activation,
                                             device=device, dtype=dtype) if num_shared_experts else None)
        self.losses = list(self.router.default_losses() if losses is None else losses)
        for loss in self.losses:
            if not isinstance(loss, Loss):
                raise TypeError(f"losses must be Loss instances (e.g. SwitchAuxLoss(1e-2)), got "
                                f"{type(loss).__name__}")
        # which loss each loss_state_{i} buffer was made for, so an edited ``losses`` list gets fresh state
        self._loss_state_owners: dict[int, Loss] = {}
        for i, loss in enumerate(self.losses):
            self._loss_state(i, loss, device)
        self.last_stats: dict[str, Tensor] = {}
        self.last_aux_losses: dict[str, Tensor] = {}
        self._ctx: Optional[RoutingContext] = None
        # replay / recording hooks and the selections kept for checkpoint recomputation (`selection.py`)
        self._routing = LayerRouting()

    def _build_router(self, router, kwargs: dict, device, dtype=None) -> Router:
        if isinstance(router, Router):
            if router.num_experts != self.num_experts or router.hidden_size != self.hidden_size:
                raise ValueError(f"router has num_experts={router.num_experts}, hidden_size={router.hidden_size}; "
                                 f"the layer has {self.num_experts}, {self.hidden_size}")
            # variable-k routers expose their nominal k as top_k; losses and capacity use the layer's
            k = router.top_k
            if k != self.top_k:
                raise ValueError(f"router has top_k={k} but the layer has top_k={self.top_k}; pass the same k "
                                 "to both")
            return router
        if router not in ROUTERS:
            raise ValueError(f"router must be a Router instance or one of {sorted(ROUTERS)}, got {router!r}")
        # dtype: a float64 layer gets a float64 router; bf16/fp16 give float32 (the router keeps float32)
        return ROUTERS[router](self.hidden_size, self.num_experts, self.top_k, **{"device": device, "dtype": dtype,
                                                                                  **kwargs})

    def _apply(self, fn: Callable, recurse: bool = True):  # noqa: D401 - torch override
        # the aux-loss scale stays float32 under model.to(bf16): 1/3 in bf16 would skew the aux gradient
        scale = self._buffers["aux_loss_scale"]
        out = super()._apply(fn, recurse)
        new = self._buffers["aux_loss_scale"]
        if new.dtype != torch.float32:
            self._buffers["aux_loss_scale"] = scale.to(device=new.device, dtype=torch.float32)
        return out

    def _loss_state(self, i: int, loss: Loss, device=None) -> Optional[Tensor]:
        """The running state of the i-th loss in this layer (`Loss.init_state`), or None: a non-persistent buffer
        made at construction (or on first use when ``losses`` was edited afterwards), zeroed by `moe_step`."""
        name = f"loss_state_{i}"
        if self._loss_state_owners.get(i) is not loss:
            fresh = loss.init_state(self.num_experts, device if device is not None else self.experts.w_up.device)
            self._buffers.pop(name, None)
            if fresh is not None:
                self.register_buffer(name, fresh, persistent=False)
            self._loss_state_owners[i] = loss
        return self._buffers.get(name)

    @torch.no_grad()
    def moe_step(self, group=None) -> None:
        """Restart the losses' running state (`Loss.init_state`) for the next optimizer step; `moe_routing.step`
        and `moe_routing.attach` call it. ``group`` is unused: the state already holds data-parallel sums."""
        for name, buf in self._buffers.items():
            if name.startswith("loss_state_") and buf is not None:
                buf.zero_()

    @property
    def layer_key(self) -> object:
        return self.layer_idx if self.layer_idx is not None else id(self)

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        if x.dim() < 1 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"x must have shape [..., {self.hidden_size}] (hidden_size), got {tuple(x.shape)}")
        w = self.experts.w_up
        if x.device != w.device:
            raise ValueError(f"x is on {x.device} but the layer's parameters are on {w.device}")
        if x.dtype != w.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"x has dtype {x.dtype} but the expert weights are {w.dtype}; cast the layer "
                            "(layer.to(x.dtype)) or run under torch.autocast")

    def _sequences(self, x: Tensor, ctx: Optional[RoutingContext], T: int) -> tuple[Optional[Tensor], int]:
        """Sequence id of each token (int64 [T], or None for one sequence) and the number of sequences.

        ``seq_lens`` is checked on the host (CPU tensors, the usual case, or a CPU input), and on an
        accelerator only with ``MOE_ROUTING_DEBUG=1``: there the check would sync the host on every forward.
        """
        if ctx is not None and ctx.seq_lens is not None:
            lens = ctx.seq_lens
            if x.device.type == "cpu":
                lens = lens.to(x.device)  # bringing them to the host syncs anyway, so they are checked there
            if lens.device.type == "cpu" or debug_checks():
                if lens.dim() != 1 or int(lens.sum()) != T or bool((lens < 0).any()):
                    raise ValueError(f"seq_lens must be a 1-D tensor of non-negative lengths summing to the token "
                                     f"count {T}, got shape {tuple(lens.shape)} and sum {int(lens.sum())}")
            lens = lens.to(x.device)
            seq_T = torch.repeat_interleave(torch.arange(lens.numel(), device=x.device), lens, output_size=T)
            return seq_T, lens.numel()
        if x.dim() >= 3:
            S = x.shape[-2]
            num_seqs = T // S
            return torch.arange(num_seqs, device=x.device).repeat_interleave(S), num_seqs
        return None, 1

    def forward(self, x: Tensor, ctx: Optional[RoutingContext] = None):
        self._check_input(x)
        backend = resolve_backend(self.backend, x.device)  # an unavailable backend fails before any compute
        ctx = ctx if ctx is not None else self._ctx
        x_TD = x.reshape(-1, self.hidden_size)
        T = x_TD.shape[0]
        # a collective dispatcher's rank with no tokens still runs: it may hold experts other ranks route to
        if T == 0 and not self.dispatcher.collective:
            # nothing was routed: stale stats of the previous batch must not be reported as this one's
            self.last_stats, self.last_aux_losses = {}, {}
            y = x * 0  # empty; stays in x's graph so a backward through an empty micro-batch works
            return (y, x.new_zeros((), dtype=torch.float32)) if self.return_aux_loss else y
        # seq_lens: validated once, before any compute and while still on the host, whether or not a loss reads it
        seqs = self._sequences(x, ctx, T) if ctx is not None and ctx.seq_lens is not None else None
        if ctx is not None:
            ctx = ctx.to(x.device)  # masks built on the CPU for a model elsewhere; routers read them too
        pad_T = ctx.padding_T(T) if ctx is not None else None
        valid_T = None if pad_T is None else ~pad_T

        if self.router.uses_expert_responses and self.router.wants_expert_responses(self.layer_key):
            ctx = self._with_expert_responses(x_TD, ctx)
        decision, kept = self._routing.route(self, x_TD, ctx, backend)
        aux, loss_stats = self._losses(decision, x, ctx, valid_T, seqs)
        if loss_stats:
            self.router.observe_loss_stats(loss_stats)
        y_TD, load_E, routed, dropped = self._dispatch(x_TD, decision, valid_T, backend)
        if self.shared_experts is not None:
            y_TD = y_TD + self._run(self.shared_experts, x_TD)
        if self.track_stats:
            stats = layer_stats(decision, load_E, routed, dropped, valid_T)
            if self.router.stats_chunk_len is not None:
                seq_T, num_seqs = seqs if seqs is not None else self._sequences(x, ctx, T)
                stats.update(sparsity_stats(decision.token_N, decision.expert_N, T, self.num_experts,
                                            self.router.stats_chunk_len, seq_T, num_seqs, valid_T))
            self.last_stats = {**stats, **loss_stats}
        y = self._routing.keep(y_TD.reshape(x.shape).to(x.dtype), kept)
        if self.return_aux_loss:
            return y, aux
        if aux.requires_grad and torch.is_grad_enabled():
            y = inject_aux_loss(y, aux, self.aux_loss_scale)
        return y

    def _with_expert_responses(self, x_TD: Tensor, ctx: Optional[RoutingContext]) -> RoutingContext:
        """``ctx`` (copied, not modified) with ``expert_responses[layer_key]``: every expert on every token
        (E * T rows through the grouped GEMM, expert-major), reduced by the router's `expert_response`."""
        T, E = x_TD.shape[0], self.num_experts
        counts_E = torch.full((E,), T, dtype=torch.long, device=x_TD.device)
        offsets_E1 = torch.arange(E + 1, device=x_TD.device) * T
        h_ETD = self._run(self.experts, x_TD.repeat(E, 1), counts_E, offsets_E1).reshape(E, T, -1)
        responses_TE = self.router.expert_response(h_ETD.transpose(0, 1))
        out = copy.copy(ctx) if ctx is not None else RoutingContext()
        out.expert_responses = {**out.expert_responses, self.layer_key: responses_TE}
        return out

    @staticmethod
    def _run(module: nn.Module, x: Tensor, *args) -> Tensor:
        """Run ``module`` on ``x``; under autocast, in the autocast dtype (grouped GEMMs have no autocast rule)."""
        device = x.device.type
        if not torch.is_autocast_enabled(device):
            return module(x, *args)
        dtype = torch.get_autocast_dtype(device)
        with torch.autocast(device_type=device, enabled=False):
            params = {k: v.to(dtype) for k, v in module.named_parameters()}
            return torch.func.functional_call(module, params, args=(x.to(dtype), *args))

    def _losses(self, decision: RoutingDecision, x: Tensor, ctx, valid_T: Optional[Tensor],
                seqs: Optional[tuple[Optional[Tensor], int]]) -> tuple[Tensor, dict[str, Tensor]]:
        """Sum of the layer's losses (a 0-d tensor) and their statistics; values kept in ``last_aux_losses``.

        Computed when they can matter: grad enabled (training), ``track_stats`` (logging) or
        ``return_aux_loss`` (the caller reads the value). Otherwise -- inference with stats off -- skipped:
        0 is returned and ``last_aux_losses`` is empty.
        """
        total = decision.logits_TE.new_zeros(())
        self.last_aux_losses = {}
        stats: dict[str, Tensor] = {}
        if not self.losses or not (torch.is_grad_enabled() or self.track_stats or self.return_aux_loss):
            return total, stats
        seq_T, num_seqs = seqs if seqs is not None else self._sequences(x, ctx, decision.num_tokens)
        inputs = LossInputs(decision=decision, top_k=self.top_k, valid_T=valid_T, seq_T=seq_T, num_seqs=num_seqs,
                            training=self.training, gate_weight_ED=self.router.gate_weight_ED(),
                            expert_gate_EDF=self.experts.w_gate, l1_coeff=self.router.sparsity_coeff())
        for i, loss in enumerate(self.losses):
            state = self._loss_state(i, loss)
            out = loss(inputs if state is None else dataclasses.replace(inputs, state=state))
            self.last_aux_losses[loss.name] = out.value.detach()
            stats.update(out.stats)
            total = total + out.value
        return total, stats

    def _dispatch(self, x_TD: Tensor, d: RoutingDecision, valid_T: Optional[Tensor], backend: str):
        x_ND, counts_E, offsets_E1, meta = self.dispatcher.dispatch(
            x_TD, d, valid_T, top_k=self.top_k, capacity_factor=self.capacity_factor, drop_policy=self.drop_policy,
            backend=backend)
        h_ND = self._run(self.experts, x_ND, counts_E, offsets_E1)
        return self.dispatcher.combine(h_ND, meta), meta.load_E, meta.routed, meta.dropped
