"""moe_routing: Mixture-of-Experts routers, balance losses, dispatch ops and a drop-in MoE layer."""
from .control import attach, aux_losses, moe_layers, routing_context, set_aux_loss_scale, step, total_aux_loss
from .decision import RoutingContext, RoutingDecision
from .experts import GroupedExperts, SharedExperts
from .layer import MoELayer
from .losses import (DPSLoss, ERCLoss, GlobalBatchAuxLoss, Loss, LossInputs, LossOutput, ReLUL1Loss,
                     SequenceAuxLoss, SwitchAuxLoss, ZLoss)
from .metrics import format_routing_report, routing_report
from . import replay  # routing replay for RL: mr.replay.from_engine, pack_records, metrics, Megatron interop
from .routers import (ExpertChoiceRouter, GatedRouter, HashRouter, HyperRouter, RecurrentRouter, RecurrentRouterGroup,
                      ReLURouter, Router, SinkhornRouter, TopKRouter)

from .smear import SMEARLayer  # SMEAR: one merged expert per example
from . import convert  # dense to MoE: convert.upcycle, convert.carve, convert.pregate

__version__ = "0.1.0"

__all__ = ["MoELayer", "GatedRouter", "LossInputs", "LossOutput", "attach", "TopKRouter", "ReLURouter", "RecurrentRouter", "RecurrentRouterGroup", "SinkhornRouter",
           "ExpertChoiceRouter", "HashRouter", "HyperRouter", "ReLUL1Loss", "Router", "RoutingDecision", "RoutingContext", "routing_context",
           "GroupedExperts", "SharedExperts", "Loss", "SwitchAuxLoss", "SequenceAuxLoss", "GlobalBatchAuxLoss",
           "ZLoss", "ERCLoss", "DPSLoss", "step", "set_aux_loss_scale", "aux_losses", "total_aux_loss", "moe_layers",
           "routing_report", "format_routing_report", "SMEARLayer", "convert"]
