"""The selection an MoE layer routes with -- native, replayed, or its original forward's in a recomputation.

`LayerRouting` is an `MoELayer`'s routing state outside the state dict: the replay and recorders the context
managers of `moe_routing.replay` install, and the selections kept for activation-checkpoint recomputation.

Recompute safety. A layer recomputed by ``torch.utils.checkpoint`` must route exactly as its original forward
(a near-tie flipped by a slightly different recomputed input would change N, or silently the gradient). So every
forward with autograd keeps its selection (``experts_TK``, or a variable-k router's routing map) owned by a small
marker node on the layer's output: the selection lives exactly as long as that forward's graph, whatever order
backward passes run in (gradient accumulation, pipeline schedules), and is never kept by a queue. A forward is a
recomputation when it runs inside a backward (``torch._C._current_graph_task_id() != -1``) with grad enabled;
it then forces the kept selection of the same token count. When several are alive (micro-batches in flight),
the one whose input fingerprint (column sums of the router input, float32) is nearest to the recomputed input's
is picked on the device (argmin and a gather: no host sync); on a tie a graph-owned selection wins, then the
newest no-grad one. Two forwards of the *same* input whose graphs are both alive but whose selections differ
(one replayed, one native) cannot be told apart: on the CPU (accelerators: ``MOE_ROUTING_DEBUG=1``) the
recomputation raises rather than silently using the other's selection.

Reentrant checkpoints (``use_reentrant=True``) run the original forward under ``no_grad``, so there is no graph
to own the selection: a no-grad forward of a layer in training mode whose parameters require grad keeps its
selection in a bounded per-layer list (`NO_GRAD_SLOTS`, oldest dropped; compact uint8/int16 ids), read by
fingerprint as above. Limits: at most `NO_GRAD_SLOTS` reentrant micro-batches in flight per layer (an older one's
recomputation no longer finds its selection and routes afresh), and an eval-mode forward under a reentrant
checkpoint keeps nothing (its recomputation routes afresh). Inside a ``torch.compile`` graph nothing is kept (a
Python object cannot ride through a traced graph): replay works there, checkpoint recompute safety is eager-only.
"""
from __future__ import annotations

import copy
import weakref
from typing import Callable, Optional

import torch
from torch import Tensor

from .decision import RoutingContext, RoutingDecision
from .settings import debug_checks

#: no-grad forwards (reentrant checkpoint) whose selection a layer keeps for a recomputation
NO_GRAD_SLOTS = 8


def in_recomputation() -> bool:
    """Whether a forward is an activation-checkpoint recomputation: it runs inside backward with grad enabled."""
    return torch.is_grad_enabled() and torch._C._current_graph_task_id() != -1


def compact_ids(ids: Tensor, num_experts: int) -> Tensor:
    """Expert ids in the smallest dtype holding [0, E): uint8 when E <= 256, else int16."""
    return ids.to(torch.uint8 if num_experts <= 256 else torch.int16)


def selection_of(decision: RoutingDecision) -> Tensor:
    """The decision's choice: int64 [T, K] experts (fixed k) or a bool [T, E] routing map (variable k)."""
    if decision.top_k is not None:
        return decision.experts_TK.detach()
    T, E = decision.num_tokens, decision.num_experts
    map_TE = torch.zeros(T, E, dtype=torch.bool, device=decision.expert_N.device)
    return map_TE.index_put_((decision.token_N, decision.expert_N), torch.ones((), dtype=torch.bool,
                                                                               device=map_TE.device))


class KeptSelection:
    """One forward's selection (int [T, K] or bool [T, E]) and its input fingerprint (float32 [D])."""

    __slots__ = ("selection", "fingerprint_D", "__weakref__")

    def __init__(self, selection: Tensor, fingerprint_D: Tensor) -> None:
        self.selection, self.fingerprint_D = selection, fingerprint_D


class _KeepWithGraph(torch.autograd.Function):
    """Identity on the layer output whose node owns the forward's `KeptSelection` (it dies with the graph)."""

    @staticmethod
    def forward(ctx, y: Tensor, kept: KeptSelection) -> Tensor:
        ctx.kept = kept
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def fingerprint(x_TD: Tensor) -> Tensor:
    return x_TD.detach().sum(0, dtype=torch.float32)


def with_layer_entry(ctx: Optional[RoutingContext], field: str, layer_key: object, value) -> RoutingContext:
    """``ctx`` (not modified) with ``ctx.<field>[layer_key] = value`` (``field``: ``forced_experts``,
    ``logit_offsets`` or ``logit_edits``); a shallow copy, so per-layer state stays shared."""
    out = RoutingContext() if ctx is None else copy.copy(ctx)
    setattr(out, field, {**getattr(out, field), layer_key: value})
    return out


def _compose(edits: list[Callable[[Tensor], Tensor]]) -> Callable[[Tensor], Tensor]:
    def edit(logits_TE: Tensor) -> Tensor:
        for fn in edits:  # outer blocks first, the innermost last
            logits_TE = fn(logits_TE)
        return logits_TE
    return edit


class LayerRouting:
    """Routing state of one `MoELayer` that is not part of its state dict (a copy or unpickle starts empty).

    Attributes:
        replay: ``(num_tokens, device) -> forced selection`` installed by `replay_routing`, or None.
        recorders: callables receiving each original forward's `RoutingDecision` (`record_routing`).
        logit_offsets: float [E] offsets the active `moe_routing.intervene` blocks add to the router logits
            (nested blocks add up), applied to every forward while installed, recomputations included.
        logit_edits: ``logits_TE -> logits_TE`` functions the active `moe_routing.rerouting` blocks apply after
            the offsets (composed in installation order).
    """

    def __init__(self) -> None:
        self.replay: Optional[Callable[[int, torch.device], Tensor]] = None
        self.recorders: list[Callable[[RoutingDecision], None]] = []
        self.logit_offsets: list[Tensor] = []
        self.logit_edits: list[Callable[[Tensor], Tensor]] = []
        self._with_graph: list[weakref.ref] = []
        self._no_grad: list[KeptSelection] = []

    def __reduce__(self):
        return (LayerRouting, ())

    def __deepcopy__(self, memo) -> "LayerRouting":
        return LayerRouting()

    def kept(self) -> list[KeptSelection]:
        """Selections alive for a recomputation: graph-owned first, then the no-grad ones, newest first (a
        reentrant checkpoint's forward is newer than an earlier no-grad pass over the same tokens, e.g. the
        old-log-prob pass, and must win a fingerprint tie against it)."""
        return self._graph_owned() + self._no_grad[::-1]

    def _graph_owned(self) -> list[KeptSelection]:
        alive = [k for k in (r() for r in self._with_graph) if k is not None]
        self._with_graph = [weakref.ref(k) for k in alive]
        return alive

    def route(self, layer, x_TD: Tensor, ctx: Optional[RoutingContext],
              backend: str) -> tuple[RoutingDecision, Optional[KeptSelection]]:
        """Route ``x_TD`` through ``layer.router`` with the selection this call must use; returns the decision
        and the selection to attach to the output (`keep`) when this forward builds a graph."""
        recompute = not torch.compiler.is_compiling() and in_recomputation()
        forced = self._recomputed_selection(x_TD) if recompute else None
        if forced is None and self.replay is not None:
            forced = self.replay(x_TD.shape[0], x_TD.device)
        if forced is not None:
            ctx = with_layer_entry(ctx, "forced_experts", layer.layer_key, forced)
        if self.logit_offsets:
            ctx = with_layer_entry(ctx, "logit_offsets", layer.layer_key, torch.stack(self.logit_offsets).sum(0))
        if self.logit_edits:
            ctx = with_layer_entry(ctx, "logit_edits", layer.layer_key, _compose(list(self.logit_edits)))
        decision = layer.router(x_TD, ctx, layer.layer_key, backend)
        if recompute:
            return decision, None
        for record in self.recorders:
            record(decision)
        if torch.compiler.is_compiling():
            return decision, None  # a compiled graph keeps nothing (see the module docstring)
        if torch.is_grad_enabled():
            return decision, KeptSelection(selection_of(decision), fingerprint(x_TD))
        if layer.training and any(p.requires_grad for p in layer.parameters()):
            sel = selection_of(decision)
            if decision.top_k is not None:
                sel = compact_ids(sel, decision.num_experts)
            self._no_grad = [*self._no_grad[-(NO_GRAD_SLOTS - 1):], KeptSelection(sel, fingerprint(x_TD))]
        return decision, None

    def keep(self, y: Tensor, kept: Optional[KeptSelection]) -> Tensor:
        """``y`` carrying ``kept`` in its graph (unchanged when there is no graph to carry it)."""
        if kept is None or not y.requires_grad:
            return y
        # dropping the dead references here bounds the list by the graphs alive (no growth over a long run)
        self._with_graph = [r for r in self._with_graph if r() is not None]
        self._with_graph.append(weakref.ref(kept))
        return _KeepWithGraph.apply(y, kept)

    def _recomputed_selection(self, x_TD: Tensor) -> Optional[Tensor]:
        T = x_TD.shape[0]
        graph_owned = [k for k in self._graph_owned() if k.selection.shape[0] == T]
        candidates = graph_owned + [k for k in self._no_grad[::-1] if k.selection.shape[0] == T]
        if not candidates:
            return None
        if len(candidates) == 1:
            return candidates[0].selection.to(x_TD.device)
        fp_D = fingerprint(x_TD)
        fps_CD = torch.stack([k.fingerprint_D.to(fp_D.device) for k in candidates])
        dist_C = (fps_CD - fp_D).abs().sum(1)
        best = dist_C.argmin()  # first of equals: a graph-owned selection wins a tie
        sels = [k.selection.to(x_TD.device) for k in candidates]
        if sels[0].dtype != torch.bool:
            sels = [s.long() for s in sels]
        if x_TD.device.type == "cpu" or debug_checks():
            self._check_unambiguous(len(graph_owned), dist_C, sels)
        return torch.stack(sels).index_select(0, best.reshape(1))[0]

    @staticmethod
    def _check_unambiguous(n_graph: int, dist_C: Tensor, sels: list[Tensor]) -> None:
        """Two forwards with graphs alive whose inputs match the recomputed one equally well (the same tokens
        run twice) but whose selections differ (e.g. one replayed, one native): the fingerprint cannot tell
        which is recomputed, and picking one would silently give the other's gradient. A host sync: on the CPU,
        or on accelerators with ``MOE_ROUTING_DEBUG=1``."""
        tied = [i for i in (dist_C == dist_C.min()).nonzero().flatten().tolist() if i < n_graph]
        if any(not torch.equal(sels[tied[0]], sels[i]) for i in tied[1:]):
            raise RuntimeError(
                f"activation-checkpoint recomputation of an MoE layer: {len(tied)} forwards of the same input "
                f"({sels[0].shape[0]} tokens) with different expert selections have their graphs alive, so the "
                "recomputation cannot tell which one it recomputes; run backward on one before the next forward "
                "of the same tokens with other routing (e.g. replayed vs native)")
