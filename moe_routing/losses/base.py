"""What a layer-level loss reads (`LossInputs`), what it returns (`LossOutput`), and the `Loss` base class.

A loss sees explicit, typed inputs -- never the layer itself -- and returns its value together with its
detached statistics; it writes nothing into the router's decision and keeps no per-forward state, so one loss
object can serve several layers and a compiled graph has no hidden side effects. A loss that accumulates across
forwards (`GlobalBatchAuxLoss` over the micro-batches of one optimizer step) declares its state with
`Loss.init_state`: each layer holds its own copy as a buffer, hands it in as ``LossInputs.state`` and zeroes
it at every optimizer step (`moe_routing.step` / `moe_routing.attach`).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

from ..decision import RoutingDecision
from ..validation import check_float


@dataclass(frozen=True)
class LossInputs:
    """Everything a layer-level loss may read.

    Attributes:
        decision: the router's `RoutingDecision` for this forward.
        top_k: the layer's (nominal) experts per token k.
        valid_T: bool [T], False at padding; None when nothing is padding.
        seq_T: int64 [T] sequence id of each token; None for a single sequence.
        num_seqs: number of sequences S.
        training: whether the layer is in training mode (losses that only shape parameters skip eval).
        gate_weight_ED: the router's [E, D] input-to-logit projection (`Router.gate_weight_ED`), or None.
        expert_gate_EDF: the experts' SwiGLU gate projection ``w_gate`` [E, D, F], or None (GELU/ReLU experts).
        l1_coeff: the adaptive coefficient a router's controller sets (`Router.sparsity_coeff`: ReMoE's L1
            lambda, BlockFFN's chunk-sparsification lambda), or None.
        state: this loss's running state in this layer (the tensor `Loss.init_state` made), which the loss
            updates in place; None for a stateless loss.
    """

    decision: RoutingDecision
    top_k: int
    valid_T: Optional[Tensor] = None
    seq_T: Optional[Tensor] = None
    num_seqs: int = 1
    training: bool = True
    gate_weight_ED: Optional[Tensor] = None
    expert_gate_EDF: Optional[Tensor] = None
    l1_coeff: Optional[Tensor] = None
    state: Optional[Tensor] = None


class LossOutput(NamedTuple):
    """A loss's value (coefficient applied, a 0-d tensor in the graph) and its detached statistics."""

    value: Tensor
    stats: dict[str, Tensor]


class Loss(ABC):
    """A layer-level loss: ``coeff * formula``. Subclasses define ``name`` and ``compute``.

    ``compute(inputs)`` returns the loss without its coefficient, either as a scalar tensor or as
    ``(scalar, stats)`` with ``stats`` a dict of detached tensors that the layer adds to its ``last_stats``.
    """

    name = "loss"

    def __init__(self, coeff: float) -> None:
        self.coeff = check_float(f"{type(self).__name__} coeff", coeff, 0.0)

    @abstractmethod
    def compute(self, inputs: LossInputs) -> Union[Tensor, tuple[Tensor, dict[str, Tensor]]]:
        """The loss without its coefficient (and optionally its statistics)."""

    def init_state(self, num_experts: int, device: Optional[torch.device] = None) -> Optional[Tensor]:
        """A fresh (zero) running state for one layer, or None (the default: the loss is stateless).

        The layer keeps the tensor as a non-persistent buffer, passes it as ``LossInputs.state`` and zeroes it in
        `moe_routing.step`. Use an integer dtype for counts: a model cast to bf16 leaves integer buffers alone.
        """
        return None

    def __call__(self, inputs: LossInputs) -> LossOutput:
        out = self.compute(inputs)
        value, stats = out if isinstance(out, tuple) else (out, {})
        return LossOutput(self.coeff * value, dict(stats))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(coeff={self.coeff:g})"

