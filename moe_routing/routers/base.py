"""Router bases: `Router` (decide, never dispatch) and `GatedRouter` (a router with an [E, D] gate).

The split follows the usual gating / selection separation: `GatedRouter.route` owns everything routers share
(input checks, float32 parameters, the logits, the non-finite-logit policy and its statistic, routing replay
through ``forced_experts``, intervention offsets through ``logit_offsets``) and asks the subclass only how experts and gate weights are chosen from the
logits and scores (`select` + `gates` for fixed-k routers, `choose_pairs` for variable-k ones).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, ClassVar, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..decision import RoutingContext, RoutingDecision
from ..validation import check_bool, check_float, check_int
from .forced import forced_experts_TK, forced_routing_map, forced_selection, reject_forced_experts  # noqa: F401

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def keep_float32(fn: Callable) -> Callable:
    """Wrap an ``nn.Module._apply`` function so a cast to bf16/fp16 leaves floating tensors float32 (a cast to
    float64 or a device move still applies)."""
    def apply(t: Tensor) -> Tensor:
        out = fn(t)
        if isinstance(out, Tensor) and t.is_floating_point() and out.dtype in _LOW_PRECISION:
            # from the original values: a round trip through bf16/fp16 would round the weights and bias
            out = t.to(device=out.device, dtype=torch.float32)
        return out

    return apply


def param_factory(device, dtype) -> dict:
    """``factory_kwargs`` for router parameters: float32 unless float64 is asked for (bf16/fp16 give float32)."""
    return {"device": device, "dtype": torch.float32 if dtype in (None, *_LOW_PRECISION) else dtype}


class Router(nn.Module, ABC):
    """Base class for routers: decide which experts each token uses; never dispatch.

    Subclasses implement ``route(x_TD, ctx, layer_key, backend) -> RoutingDecision``; most should subclass
    `GatedRouter` instead, which implements ``route`` around a learned [E, D] gate.

    Router parameters and buffers stay float32 when the model is cast to bf16/fp16 (small bias updates vanish
    in bf16), but follow a cast up to float64. Router math runs in the parameters' dtype, at least float32,
    with autocast disabled.

    Per-optimizer-step controllers (aux-free bias, ReMoE's lambda) implement `step_statistics` (what is summed
    over data-parallel ranks) and `apply_step`; `moe_routing.step` / `moe_routing.attach` run every router of a
    model with ONE all-reduce for all of them (`Router.moe_step_all`).
    """

    #: variable-k routers (ReLU, expert choice) give each token 0..E experts; ``top_k`` is then nominal
    variable_k: ClassVar[bool] = False
    #: chunk length L of the token- and chunk-level sparsity (``tls``, ``cls``) the layer adds to its stats for
    #: this router; None (the default) skips them. BlockFFN's router sets 8; any router instance may set it.
    stats_chunk_len: Optional[int] = None
    #: routers that may read every expert's response to every token (`wants_expert_responses`); a layer then
    #: needs all experts on its device
    uses_expert_responses: ClassVar[bool] = False

    def __init__(self, hidden_size: int, num_experts: int, top_k: int = 1) -> None:
        super().__init__()
        self.hidden_size = check_int("hidden_size", hidden_size, 1)
        self.num_experts = check_int("num_experts", num_experts, 1)
        self.top_k = check_int("top_k", top_k, 1, num_experts)

    def _apply(self, fn: Callable, recurse: bool = True):  # noqa: D401 - torch override
        return super()._apply(keep_float32(fn), recurse)

    @property
    def math_dtype(self) -> torch.dtype:
        """The dtype router math runs in: the parameters' (or buffers') dtype, at least float32."""
        t = next(self.parameters(), None)
        if t is None:
            t = next((b for b in self.buffers() if b.is_floating_point()), None)
        if t is None or t.dtype in _LOW_PRECISION:
            return torch.float32
        return t.dtype

    def forward(self, x_TD: Tensor, ctx: Optional[RoutingContext] = None, layer_key: object = None,
                backend: str = "torch") -> RoutingDecision:
        """Decide for ``x_TD`` [T, D]. ``backend``: the layer's resolved kernel backend (routing ops may use it)."""
        if not isinstance(x_TD, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x_TD).__name__}")
        if not x_TD.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got dtype {x_TD.dtype}")
        if x_TD.dim() != 2 or x_TD.shape[-1] != self.hidden_size:
            raise ValueError(f"x must have shape [T, {self.hidden_size}], got {tuple(x_TD.shape)}")
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            return self.route(x_TD.to(self.math_dtype), ctx, layer_key, backend)

    @abstractmethod
    def route(self, x_TD: Tensor, ctx: Optional[RoutingContext], layer_key: object,
              backend: str = "torch") -> RoutingDecision:
        """Decide for ``x_TD`` [T, D] (already in ``math_dtype``, autocast off)."""

    def default_losses(self) -> list:
        """Losses a layer uses when the user passes none (see the README's router table)."""
        return []

    # --- the expert-response hook (CompeteSMoE): the layer runs the experts, the router only reads ---
    def wants_expert_responses(self, layer_key: object) -> bool:
        """Whether this forward needs ``ctx.expert_responses[layer_key]`` (the layer then runs every expert on
        every token and passes `expert_response` of the outputs). Default: never."""
        return False

    def expert_response(self, h_TED: Tensor) -> Tensor:
        """[T, E] response of each expert from its outputs ``h_TED`` [T, E, D]."""
        raise NotImplementedError(f"{type(self).__name__} does not read expert responses")

    # --- tensors a layer-level loss may read (filled into `LossInputs` by the layer) ---
    def gate_weight_ED(self) -> Optional[Tensor]:
        """The [E, D] projection from the input to the expert logits, or None (ERC needs it)."""
        return None

    def sparsity_coeff(self) -> Optional[Tensor]:
        """The sparsity-loss coefficient this router's controller sets (ReMoE's L1 lambda, BlockFFN's CSL lambda),
        or None."""
        return None

    # --- per-optimizer-step controllers ---
    def observe_loss_stats(self, stats: dict[str, Tensor]) -> None:
        """Called by the layer after its losses with their detached statistics, so a controller can follow a
        loss value (BlockFFN's adaptive chunk-sparsification coefficient). Default: nothing."""

    def should_accumulate(self) -> bool:
        """Controller statistics count only in training forwards with grad enabled, and not in the
        recomputation a non-reentrant activation checkpoint runs inside backward (no double counting)."""
        if not (self.training and torch.is_grad_enabled()):
            return False
        return torch._C._current_graph_task_id() == -1

    def step_statistics(self) -> Optional[Tensor]:
        """1-D statistics accumulated since the last step, summed over data-parallel ranks before `apply_step`
        (and then reset); None when the router has no controller."""
        return None

    @classmethod
    def apply_step(cls, routers: Sequence["Router"], statistics: Sequence[Tensor]) -> None:
        """Update every router of this class from its rank-summed statistics (float64). A class overrides it to
        pool over layers (ReMoE's lambda follows the model-wide sparsity)."""
        if routers:
            raise NotImplementedError(f"{cls.__name__} returns step_statistics but does not implement apply_step")

    @staticmethod
    @torch.no_grad()
    def moe_step_all(routers: Sequence["Router"], group=None) -> None:
        """One controller step for ``routers``: their statistics in one stacked all-reduce over ``group`` (when
        `torch.distributed` is initialised), then each router class's `apply_step`."""
        unique = list({id(r): r for r in routers}.values())
        owners, stats = [], []
        for r in unique:
            s = r.step_statistics()
            if s is not None:
                owners.append(r)
                stats.append(s.detach().reshape(-1).to(torch.float64))  # exact for counts below 2**53
        if not owners:
            return
        sizes = [s.numel() for s in stats]
        flat = torch.cat([s.to(stats[0].device) for s in stats])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flat, group=group)
        by_class: dict[type, tuple[list, list]] = {}
        for r, s in zip(owners, flat.split(sizes)):
            entry = by_class.setdefault(type(r), ([], []))
            entry[0].append(r)
            entry[1].append(s.to(_device_of(r)))
        for cls, (members, member_stats) in by_class.items():
            cls.apply_step(members, member_stats)

    def moe_step(self, group=None) -> None:
        """This router's controller step alone (`moe_step_all` runs a whole model's in one all-reduce)."""
        Router.moe_step_all([self], group)


def _device_of(router: nn.Module) -> torch.device:
    t = next(router.parameters(), None)
    if t is None:
        t = next(router.buffers(), None)
    return t.device if t is not None else torch.device("cpu")


class GatedRouter(Router):
    """A router with a learned float32 gate ``weight`` [E, D] (no bias): ``logits = x @ weight.T``.

    ``route`` computes the logits (`gating`), applies the non-finite-logit policy, the scores (`scores`:
    softmax by default) and routing replay, then lets the subclass choose:

    - fixed-k routers implement ``select(logits_TE, scores_TE, ctx) -> experts_TK`` (int64 [T, K]) and may
      override ``gates(experts_TK, logits_TE, scores_TE) -> [T, K]`` (default: the scores at the chosen
      experts). Replay (``ctx.forced_experts[layer_key]``) replaces ``select`` and keeps ``gates``, so replayed
      experts keep their weight and gradient. For extra statistics override ``choose`` instead.
    - variable-k routers set ``variable_k = True`` and implement ``choose_pairs(logits_TE, scores_TE, ctx)``
      returning a `RoutingDecision`; replay of a routing map [T, E] needs ``forced_map`` and ``forced_pairs``
      (ReLU has them; by default replay raises: there is no per-token [T, K] choice to force).

    Replay rows holding -1 (any column) route natively: the router's ``select`` decides them (padding, tokens an
    inference engine did not report), the rest keep the replayed experts.

    Args:
        hidden_size: D.  num_experts: E.  top_k: K in [1, E] (nominal for variable-k routers).
        init_std: std of the normal initialisation of ``weight``.
        strict: raise on non-finite logits on accelerators too (CPU always raises).
        gate_weight: False for routers that compute their logits otherwise (generated or recurrent weights).
    """

    #: whether each row of ``scores`` sums to 1 (a distribution over experts); losses and metrics normalise
    #: the scores of routers where it does not (sigmoid, ReLU)
    scores_normalized: ClassVar[bool] = True

    def __init__(self, hidden_size: int, num_experts: int, top_k: int = 1, *, init_std: float = 0.02,
                 strict: bool = False, gate_weight: bool = True, device=None, dtype=None) -> None:
        super().__init__(hidden_size, num_experts, top_k)
        self.init_std = check_float("init_std", init_std, 0.0)
        self.strict = check_bool("strict", strict)
        if gate_weight:
            self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, **param_factory(device, dtype)))
            nn.init.normal_(self.weight, std=self.init_std)

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, num_experts={self.num_experts}, top_k={self.top_k}"

    def gate_weight_ED(self) -> Optional[Tensor]:
        return self.weight

    def default_losses(self) -> list:
        """The switch aux loss (1e-2), unless a router balances otherwise."""
        from ..losses.balance import SwitchAuxLoss

        return [SwitchAuxLoss(1e-2)]

    # --- the hooks a subclass implements ---
    def gating(self, x_TD: Tensor, ctx: Optional[RoutingContext]) -> Tensor:
        """Logits [T, E] (at least float32)."""
        return x_TD @ self.weight.t()

    def scores(self, logits_TE: Tensor) -> Tensor:
        """Scores [T, E] the router selects on and balance losses read (default: softmax over experts)."""
        return logits_TE.softmax(-1)

    def select(self, logits_TE: Tensor, scores_TE: Tensor, ctx: Optional[RoutingContext]) -> Tensor:
        """int64 [T, K] experts of each token (fixed-k routers)."""
        raise NotImplementedError(f"{type(self).__name__} must implement select() (or choose())")

    def gates(self, experts_TK: Tensor, logits_TE: Tensor, scores_TE: Tensor) -> Tensor:
        """[T, K] gate weights of the chosen experts (default: their scores)."""
        return scores_TE.gather(1, experts_TK)

    def choose(self, logits_TE: Tensor, scores_TE: Tensor, forced_TK: Optional[Tensor],
               ctx: Optional[RoutingContext], backend: str) -> tuple[Tensor, Tensor, dict]:
        """``(experts_TK, gates_TK, extra)``: `select` unless replayed, then `gates`; ``extra`` holds detached
        router statistics for the layer's ``last_stats``."""
        experts_TK = forced_TK if forced_TK is not None else self.select(logits_TE, scores_TE.detach(), ctx)
        return experts_TK, self.gates(experts_TK, logits_TE, scores_TE), {}

    def balance_experts(self, scores_TE: Tensor) -> Optional[Tensor]:
        """[T, K] experts balance losses should count when the choice is biased or restricted (see
        `RoutingDecision.balance_experts_TK`); None (the default) counts the chosen experts."""
        return None

    def choose_pairs(self, logits_TE: Tensor, scores_TE: Tensor,
                     ctx: Optional[RoutingContext]) -> RoutingDecision:
        """The routed pairs of a variable-k router."""
        raise NotImplementedError(f"{type(self).__name__} sets variable_k and must implement choose_pairs()")

    def forced_map(self, ctx: Optional[RoutingContext], layer_key: object, num_tokens: int,
                   device: torch.device) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """A variable-k router's replayed routing map ``(chosen_TE bool, native_T bool or None)``, or
        ``(None, None)`` without replay. Default: replay raises (a router that can replay overrides this and
        `forced_pairs`)."""
        reject_forced_experts(self, ctx, layer_key)
        return None, None

    def forced_pairs(self, chosen_TE: Tensor, native_T: Optional[Tensor], logits_TE: Tensor, scores_TE: Tensor,
                     ctx: Optional[RoutingContext]) -> RoutingDecision:
        """The routed pairs of a variable-k router replaying ``chosen_TE`` (rows ``native_T`` route natively)."""
        raise NotImplementedError(f"{type(self).__name__} overrides forced_map and must implement forced_pairs()")

    # --- the shared path ---
    def route(self, x_TD: Tensor, ctx: Optional[RoutingContext], layer_key: object,
              backend: str = "torch") -> RoutingDecision:
        T = x_TD.shape[0]
        # replay is checked before any compute
        if self.variable_k:
            forced, native_T = self.forced_map(ctx, layer_key, T, x_TD.device)
        else:
            forced, native_T = forced_selection(ctx, layer_key, T, self.top_k, self.num_experts, x_TD.device)
        logits_TE = self.gating(x_TD, ctx)
        if ctx is not None and layer_key in ctx.logit_offsets:  # a routing intervention (moe_routing.intervene)
            logits_TE = logits_TE + ctx.logit_offsets[layer_key].to(logits_TE.device, logits_TE.dtype)
        if ctx is not None and layer_key in ctx.logit_edits:  # test-time rerouting (moe_routing.rerouting)
            edited = ctx.logit_edits[layer_key](logits_TE)
            if not isinstance(edited, Tensor) or edited.shape != logits_TE.shape:
                raise ValueError(f"a logit edit must return a tensor of shape {tuple(logits_TE.shape)}, got "
                                 f"{getattr(edited, 'shape', type(edited).__name__)}")
            logits_TE = edited
        logits_TE, nonfinite = check_finite_logits(logits_TE, self.strict)
        scores_TE = self.scores(logits_TE)
        if self.variable_k:
            decision = (self.choose_pairs(logits_TE, scores_TE, ctx) if forced is None
                        else self.forced_pairs(forced, native_T, logits_TE, scores_TE, ctx))
        else:
            if native_T is not None:  # sentinel rows: the router's own choice there
                native_TK = self.select(logits_TE, scores_TE.detach(), ctx)
                forced = torch.where(native_T[:, None], native_TK, forced)
            experts_TK, gates_TK, extra = self.choose(logits_TE, scores_TE, forced, ctx, backend)
            decision = RoutingDecision.from_topk(experts_TK, gates_TK, logits_TE, scores_TE,
                                                 scores_normalized=self.scores_normalized, extra=extra)
            decision.balance_experts_TK = self.balance_experts(scores_TE.detach())
        if nonfinite is not None:
            decision.extra["nonfinite_tokens"] = nonfinite
        return decision


def switch_gates_at_k1(owner: str, top_k: int, softmax_before_topk: Optional[bool],
                       normalize: bool = False) -> bool:
    """Resolve ``softmax_before_topk`` so that no configuration gives every token a constant gate of 1.

    A softmax over the k chosen logits (or scores renormalised over them) is exactly 1 at k = 1: the router
    would get no gradient from the task loss, silently. Default (None): Switch gates (softmax over all E at the
    chosen expert) at k = 1, the softmax over the k chosen logits otherwise; asking for a constant gate raises.
    """
    if softmax_before_topk is None:
        softmax_before_topk = top_k == 1
    check_bool("softmax_before_topk", softmax_before_topk)
    if top_k == 1 and (not softmax_before_topk or normalize):
        raise ValueError(f"{owner} with top_k=1 and "
                         f"{'normalize=True' if softmax_before_topk else 'softmax_before_topk=False'} gives every "
                         "token a gate of exactly 1, so the router gets no gradient from the task loss; use "
                         "softmax_before_topk=True and normalize=False (Switch gates, the default at k=1)")
    return softmax_before_topk


def softmax_over_chosen(experts_TK: Tensor, logits_TE: Tensor) -> Tensor:
    """Gate weights = softmax over the K chosen logits (Mixtral / Qwen); sums to 1 per token."""
    return logits_TE.gather(1, experts_TK).softmax(-1)


def renormalized(gates_TK: Tensor) -> Tensor:
    """``gates_TK`` divided by its per-token sum (a zero row stays zero instead of becoming NaN)."""
    return gates_TK / gates_TK.sum(-1, keepdim=True).clamp_min(torch.finfo(gates_TK.dtype).tiny)


def check_finite_logits(logits_TE: Tensor, strict: bool) -> tuple[Tensor, Optional[Tensor]]:
    """Reject or sanitise non-finite logits so selection never sees NaN/inf.

    Eager on CPU (or with ``strict``) a non-finite logit raises ValueError. On accelerators a check would sync
    the host, and inside a ``torch.compile`` graph a data-dependent raise cannot be traced: there non-finite
    entries are replaced by 0 and the number of affected tokens is returned for stats (``nonfinite_tokens``).
    """
    compiling = torch.compiler.is_compiling()
    if not compiling and (logits_TE.device.type == "cpu" or strict):
        if not _all_finite(logits_TE):
            bad = int((~torch.isfinite(logits_TE)).any(-1).sum())
            raise ValueError(f"router logits contain NaN/inf for {bad} token(s); check the layer input "
                             "(x) and router weight for non-finite values")
        if logits_TE.device.type == "cpu":
            return logits_TE, None
    finite = torch.isfinite(logits_TE)
    bad_count = (~finite).any(-1).sum()
    return torch.where(finite, logits_TE, torch.zeros_like(logits_TE)), bad_count


def _all_finite(t: Tensor) -> bool:
    """Whether every entry is finite, from the min and max (NaN propagates into both, +-inf reaches one): one
    read pass and no [T, E] mask, where ``isfinite(t).all()`` makes several."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))
