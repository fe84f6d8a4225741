"""Layerwise recurrent router (RMoE, arXiv 2408.06793): one GRU cell, shared by all MoE layers, carries a
routing state down the depth of the model, so each layer's choice can depend on earlier layers' routing.

Per MoE layer i (recurrence over depth only; tokens are independent and run in parallel):

    xp_TP     = x_TD @ w1_PD.T              per-layer projection, no bias
    h_TP      = GRUCell(xp_TP, hprev_TP)    ONE GRUCell(P, P) shared by every layer; hprev = 0 at layer 0
    logits_TE = h_TP @ w2_EP.T              per-layer, no bias
    experts   = top-k of the logits, gates = softmax over those k logits (Mixtral)

P is the projection / GRU width (``proj_dim``). Gradients flow through ``hprev``, i.e. layer i's loss reaches the
projections of layers < i and the shared GRU.

Reference: qiuzh20/RMoE, ``llama_moe_rnn/llama_moe_modeling.py`` (``MixtralSparseMoeBlock``: ``weight1`` [P, D],
``weight2`` [E, P], softmax -> top-k -> renormalise, i.e. the softmax over the k chosen logits;
``load_balancing_loss_func``; ``LlamaForCausalLM.forward`` adds ``router_aux_loss_coef`` x that loss),
``llama_moe_rnn/rnn.py`` (``CustomGRUCell``: the torch GRU cell's equations, ``init_weights`` applies the model's
``init_method`` to every weight and bias) and ``llama_moe_rnn/configuration_llama_moe_rnn.py``
(``moe_router_rnn_hidden_size=256``, ``router_aux_loss_coef=0.001``, ``initializer_range=0.02``).

The hidden state of a forward lives in ``RoutingContext.layer_state`` under a key private to the group and the
layer index (not `MoELayer.layer_key`), so it never outlives the context, and a layer recomputed by a
non-reentrant activation checkpoint after later layers ran still reads its predecessor's state. Layer 0 counts
forwards in the context, so a reused context reports state left by an earlier forward instead of reading it.
Known limit: one context reused for two checkpointed forwards before their backward makes the first forward's
recomputation read the second's state; use a fresh context per forward (what `routing_context` does).
A *reentrant* checkpoint around each layer cannot carry the state's gradient (it passes outside the
checkpoint's inputs): its recomputation raises ValueError; one reentrant checkpoint around all layers works.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ..decision import RoutingContext, RoutingDecision
from ..validation import check_float, check_int

GRU_INITS = ("reference", "torch")
BALANCE_LOSSES = ("reference", "switch")
from .base import GatedRouter, keep_float32, param_factory, softmax_over_chosen, switch_gates_at_k1

_CONTEXT_HINT = ("run the model inside `with moe_routing.routing_context(model): ...` (a fresh context per "
                 "forward) or pass ctx=RoutingContext() to every MoE layer")


class _GroupKey:
    """Identity token of one `RecurrentRouterGroup` in ``layer_state`` keys (a deepcopy gets a new one)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"<RecurrentRouterGroup state {id(self):#x}>"


@dataclass
class _LayerState:
    h_TP: Tensor      # the layer's GRU output, part of the autograd graph
    generation: int   # which forward (counted by layer 0 in this context) wrote it


def _not_in_backward() -> bool:
    """False inside autograd's backward, where activation-checkpoint recomputation runs."""
    return torch._C._current_graph_task_id() == -1


def _recompute_hint() -> str:
    return (" (this is an activation-checkpoint recomputation during backward: call backward inside the "
            "routing_context block, or pass ctx through the checkpointed function)" if not _not_in_backward() else "")


class RecurrentRouter(GatedRouter):
    """Layer ``layer_index`` of a `RecurrentRouterGroup` (build it through the group, which owns the GRU).

    Parameters: ``w1`` [P, D] (input projection), ``w2`` [E, P] (expert logits), both normal(0, init_std);
    ``gru`` is the group's shared ``nn.GRUCell(P, P)`` (a submodule here too, so a model holding only the MoE
    layers still trains, moves and saves it; ``model.parameters()`` lists it once).

    ``route`` needs a `RoutingContext`; layers of the group must run in depth order 0..L-1 on the same tokens
    within one forward. ``ctx.forced_experts[layer_key]`` (int [T, K]) replaces the selection (routing replay);
    gates are then the softmax over the forced experts' logits, so they keep their gradient.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, layer_index: int, gru: nn.GRUCell,
                 group_key: _GroupKey, *, init_std: float = 0.02, softmax_before_topk: Optional[bool] = None,
                 aux_coeff: float = 1e-2, strict: bool = False, device=None, dtype=None) -> None:
        super().__init__(hidden_size, num_experts, top_k, init_std=init_std, strict=strict, gate_weight=False,
                         device=device, dtype=dtype)
        self.layer_index = check_int("layer_index", layer_index, 0)
        if not isinstance(gru, nn.GRUCell) or gru.input_size != gru.hidden_size:
            raise TypeError(f"gru must be an nn.GRUCell(P, P), got {gru!r}")
        if not isinstance(group_key, _GroupKey):
            raise TypeError("group_key must come from a RecurrentRouterGroup; build routers with the group")
        self.proj_dim = gru.hidden_size
        self.softmax_before_topk = switch_gates_at_k1("RecurrentRouter", top_k, softmax_before_topk)
        self.w1 = nn.Parameter(torch.empty(self.proj_dim, hidden_size, **param_factory(device, dtype)))
        self.w2 = nn.Parameter(torch.empty(num_experts, self.proj_dim, **param_factory(device, dtype)))
        nn.init.normal_(self.w1, std=self.init_std)
        nn.init.normal_(self.w2, std=self.init_std)
        self.gru = gru
        self._group_key = group_key
        self.aux_coeff = check_float("aux_coeff", aux_coeff, 0.0)

    def default_losses(self) -> list:
        """``[SwitchAuxLoss(aux_coeff)]``; the group sets ``aux_coeff`` (see `RecurrentRouterGroup`)."""
        from ..losses.balance import SwitchAuxLoss

        return [SwitchAuxLoss(self.aux_coeff)]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, proj_dim={self.proj_dim}, layer_index={self.layer_index}"

    def gate_weight_ED(self) -> Optional[Tensor]:
        return None  # the logits come from the recurrent state, not from a projection of x alone

    def _previous_state(self, ctx: RoutingContext, T: int) -> tuple[Optional[Tensor], int]:
        """``(hprev_TP or None at layer 0, generation)``; raises ValueError on out-of-order or stale state."""
        gen_key = (self._group_key, "generation")
        if self.layer_index == 0:
            generation = ctx.layer_state.get(gen_key, 0)
            if _not_in_backward():  # a checkpoint recomputation belongs to the forward that already counted
                generation += 1
                ctx.layer_state[gen_key] = generation
            return None, generation
        i = self.layer_index
        prev = ctx.layer_state.get((self._group_key, i - 1))
        if prev is None:
            raise ValueError(f"RecurrentRouter layer {i} found no state from layer {i - 1} in this RoutingContext:"
                             f" the group's layers must run in depth order 0..{i} within one forward"
                             f"{_recompute_hint()}")
        generation = ctx.layer_state.get(gen_key, 0)
        if prev.generation != generation:
            raise ValueError(f"RecurrentRouter layer {i}: the state of layer {i - 1} in this RoutingContext is from "
                             f"an earlier forward (layer {i - 1} did not run in this one); {_CONTEXT_HINT}")
        own = ctx.layer_state.get((self._group_key, i))
        if own is not None and own.generation == generation and _not_in_backward():
            # a second forward of this layer without layer 0 starting a new one would read the state the
            # previous forward left (a checkpoint recomputation runs in backward and is allowed)
            raise ValueError(f"RecurrentRouter layer {i} already ran in this forward of the RoutingContext: a new "
                             f"forward must start at layer 0; {_CONTEXT_HINT}")
        if prev.h_TP.shape[0] != T:
            raise ValueError(f"RecurrentRouter layer {i} got {T} tokens but layer {i - 1} routed "
                             f"{prev.h_TP.shape[0]}; every layer of the group must see the same tokens")
        if (not _not_in_backward() and torch.is_grad_enabled() and not prev.h_TP.requires_grad
                and any(p.requires_grad for p in self.gru.parameters())):
            # a checkpoint recomputation reading a state made without autograd: a *reentrant* checkpoint (forward
            # in no_grad, the state passed outside its inputs) would silently drop the recurrence's gradient.
            # Only in backward: a forward whose lower layers run under no_grad on purpose stays allowed.
            raise ValueError(f"RecurrentRouter layer {i} is recomputed by an activation checkpoint with autograd, "
                             f"but the state of layer {i - 1} was computed without it (a reentrant checkpoint, "
                             "use_reentrant=True, around each layer): its gradient through the recurrence would "
                             "be lost; use torch.utils.checkpoint.checkpoint(..., use_reentrant=False), or one "
                             "checkpoint around all of the group's layers")
        return prev.h_TP, generation

    def route(self, x_TD: Tensor, ctx: Optional[RoutingContext], layer_key: object,
              backend: str = "torch") -> RoutingDecision:
        if ctx is None:
            where = _recompute_hint()
            raise ValueError(f"RecurrentRouter needs a RoutingContext to carry its state between layers{where}; "
                             f"{_CONTEXT_HINT}")
        return super().route(x_TD, ctx, layer_key, backend)

    def gating(self, x_TD: Tensor, ctx: Optional[RoutingContext]) -> Tensor:
        hprev_TP, generation = self._previous_state(ctx, x_TD.shape[0])
        h_TP = self.gru(x_TD @ self.w1.t(), hprev_TP)  # hprev None: GRUCell starts from zeros
        ctx.layer_state[(self._group_key, self.layer_index)] = _LayerState(h_TP, generation)
        return h_TP @ self.w2.t()

    def select(self, logits_TE: Tensor, scores_TE: Tensor, ctx: Optional[RoutingContext]) -> Tensor:
        # select on logits: softmax can round distinct logits to equal probabilities
        return logits_TE.detach().topk(self.top_k, dim=-1).indices

    def gates(self, experts_TK: Tensor, logits_TE: Tensor, scores_TE: Tensor) -> Tensor:
        if self.softmax_before_topk:  # Switch gates: full softmax at the chosen experts (k=1 keeps a gradient)
            return scores_TE.gather(1, experts_TK)
        return softmax_over_chosen(experts_TK, logits_TE)


class RecurrentRouterGroup(nn.Module):
    """The model-level owner of RMoE's shared GRU and its per-layer routers.

    Args:
        hidden_size: D.  num_experts: E.  top_k: K in [1, E].  num_layers: L, MoE layers using the group.
        proj_dim: P, the projection and GRU width. Default 256, the reference config's
            ``moe_router_rnn_hidden_size`` (the paper's runs use 128).
        init_std: std of the normal init of every layer's ``w1`` [P, D] and ``w2`` [E, P] (the reference's
            ``init_method``, N(0, 0.02)).
        gru_init: "reference" (default): every GRU weight and bias ~ N(0, init_std), as the reference's
            ``CustomGRUCell.init_weights``; "torch": ``nn.GRUCell``'s U(-1/sqrt(P), 1/sqrt(P)).
        balance_loss: the routers' default loss. "reference" (default): the reference's Mixtral-style loss,
            per layer: ``SwitchAuxLoss(k * aux_coeff / L)`` with ``aux_coeff`` 1e-3 (see below). "switch":
            ``SwitchAuxLoss(aux_coeff)`` per layer with ``aux_coeff`` 1e-2 (the library's usual default).
        aux_coeff: the coefficient above (None: 1e-3 for "reference", 1e-2 for "switch").
        softmax_before_topk: gates = the softmax over all E at the chosen experts (Switch) instead of the
            softmax over the k chosen logits (Mixtral, the paper's). Default: Switch at k=1 (where the Mixtral
            gate is a constant 1 and the router would learn from the aux loss only; asking for that raises),
            Mixtral otherwise.
        strict: raise on non-finite logits on accelerators too (CPU always raises).

    The reference's aux loss pools all L layers: with ``c^l_e`` the tokens of layer l whose top-k holds e (counts
    not divided by k) and ``P^l_e`` layer l's mean softmax probability over T tokens, it is
    ``coef * E * sum_e (sum_l c^l_e / (L T)) * (sum_l P^l_e / L)``. The per-layer "reference" form here sums, over
    layers, ``(k coef / L) * E * sum_e (c^l_e / (k T)) P^l_e = coef * E / L * sum_l sum_e (c^l_e / T) P^l_e``: the
    same normalisation (k coef at perfect balance, the same value whenever every layer has the same counts and
    probabilities); in general the two differ by the cross-layer terms, ``coef * E / L^2 * sum_e sum_{l != m}
    (c^l_e / T) (P^m_e - P^l_e)``, and the pooled loss pushes layer l's probabilities by the pooled count
    ``sum_m c^m_e / L`` rather than its own. For the pooled form exactly, pass ``losses=[]`` to the layers and add
    the model-level HF-pooled loss over the layers' decisions (its counts per layer not divided by k). The reference
    adds its loss only when ``output_router_logits`` is set (its config default is False; the training recipe is
    not public), so ``losses=[]`` on every layer is the other reading of its defaults.

    The ablation's ``rmoe`` keeps the library's earlier choices: ``proj_dim=min(128, D/2)``, ``gru_init="torch"``,
    ``balance_loss="switch"`` (1e-2, as its ``topk`` arm).
    ``group.routers[i]`` is layer i's `RecurrentRouter`; use it as ``MoELayer(D, F, E, K, router=group.routers[i])``
    and run each forward inside ``with moe_routing.routing_context(model):`` (or pass ``ctx=`` to every layer).
    Parameters stay float32 under ``.to(torch.bfloat16)``, the GRU included; a float64 cast applies.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, num_layers: int, proj_dim: int = 256, *,
                 init_std: float = 0.02, gru_init: str = "reference", balance_loss: str = "reference",
                 aux_coeff: Optional[float] = None, softmax_before_topk: Optional[bool] = None, device=None,
                 dtype=None, strict: bool = False) -> None:
        super().__init__()
        check_int("hidden_size", hidden_size, 1)
        check_int("num_experts", num_experts, 1)
        check_int("top_k", top_k, 1, num_experts)
        check_int("num_layers", num_layers, 1)
        check_int("proj_dim", proj_dim, 1)
        init_std = check_float("init_std", init_std, 0.0, low_inclusive=False)
        if gru_init not in GRU_INITS:
            raise ValueError(f"gru_init must be one of {GRU_INITS}, got {gru_init!r}")
        if balance_loss not in BALANCE_LOSSES:
            raise ValueError(f"balance_loss must be one of {BALANCE_LOSSES}, got {balance_loss!r}")
        if aux_coeff is None:
            aux_coeff = 1e-3 if balance_loss == "reference" else 1e-2
        aux_coeff = check_float("aux_coeff", aux_coeff, 0.0)
        self.hidden_size, self.num_experts, self.top_k = hidden_size, num_experts, top_k
        self.num_layers, self.proj_dim = num_layers, proj_dim
        self.gru_init, self.balance_loss, self.aux_coeff = gru_init, balance_loss, aux_coeff
        self.gru = nn.GRUCell(proj_dim, proj_dim, **param_factory(device, dtype))
        if gru_init == "reference":
            with torch.no_grad():
                for p in self.gru.parameters():
                    p.normal_(0.0, init_std)
        layer_coeff = top_k * aux_coeff / num_layers if balance_loss == "reference" else aux_coeff
        key = _GroupKey()
        self.layer_routers = nn.ModuleList(
            RecurrentRouter(hidden_size, num_experts, top_k, i, self.gru, key, init_std=init_std,
                            softmax_before_topk=softmax_before_topk, aux_coeff=layer_coeff, strict=strict,
                            device=device, dtype=dtype)
            for i in range(num_layers))

    @property
    def routers(self) -> list[RecurrentRouter]:
        """One `RecurrentRouter` per MoE layer, in depth order."""
        return list(self.layer_routers)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_experts={self.num_experts}, top_k={self.top_k}, "
                f"num_layers={self.num_layers}, proj_dim={self.proj_dim}, gru_init={self.gru_init!r}, "
                f"balance_loss={self.balance_loss!r}, aux_coeff={self.aux_coeff:g}")

    def _apply(self, fn: Callable, recurse: bool = True):  # noqa: D401 - torch override
        # Same rule as Router: the shared GRU is reached from here too, and a bf16 round trip would round it.
        return super()._apply(keep_float32(fn), recurse)
