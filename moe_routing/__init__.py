"""moe_routing: Mixture-of-Experts routers, balance losses, dispatch ops and a drop-in MoE layer."""
from .control import attach, aux_losses, moe_layers, routing_context, set_aux_loss_scale, step, total_aux_loss
from .decision import RoutingContext, RoutingDecision
from .dispatch import AllToAllDispatcher, Dispatcher, LocalDispatcher, reshard_expert_state_dicts
from .experts import GroupedExperts, SharedExperts
from .layer import MoELayer
from .losses import (DPSLoss, ERCLoss, GlobalBatchAuxLoss, Loss, LossInputs, LossOutput, ReLUL1Loss,
                     SequenceAuxLoss, SwitchAuxLoss, ZLoss)
from .metrics import format_routing_report, routing_report
from . import replay  # routing replay for RL: mr.replay.from_engine, pack_records, metrics, Megatron interop
from .replay import RoutingRecord, record_routing, replay_routing
# Hugging Face's pooled load-balancing loss
from .control import record_router_logits
from .losses import hf_load_balancing_loss
from .routers import (ExpertChoiceRouter, GatedRouter, HashRouter, HyperRouter, RecurrentRouter, RecurrentRouterGroup,
                      ReLURouter, Router, SinkhornRouter, TopKRouter)
from .multihash import MultiHashFFN
from .routers.hash import count_tokens, frequency_balanced_expert_map, id_balanced_expert_map
from .routers.hyper import hyper_top_k, set_hyper_top_k

# BlockFFN and Mixture of Routers (issue 17)
from .losses import ActivationLocalityLoss, ChunkSparsificationLoss
from .routers import BlockFFNRouter, MixtureOfRoutersRouter

# routing analysis and interventions (issue 18)
from . import analysis  # mr.analysis.collect_routing, srp, sch, simulate_cache, ...
from .interventions import intervene, promote_experts
from .control import routing_layers  # MoELayers and swapped HF routers
# test-time rerouting (issue 18): R2-T2 and online additive-vector rerouting
from . import rerouting
from .rerouting import OnlineRerouter, r2t2
# CompeteSMoE and bi-level routing (issue 17)
from .dispatch import expert_groups
from .losses import CompeteDistillLoss, GroupBalanceLoss
from .routers import BilevelRouter, CompeteRouter
from .losses import NodeLocalityLoss  # LocMoE's locality loss, finite form

from .smear import SMEARLayer  # SMEAR: one merged expert per example
from . import convert  # dense to MoE: convert.upcycle, convert.carve, convert.pregate

__version__ = "0.1.0"

__all__ = ["MoELayer", "GatedRouter", "LossInputs", "LossOutput", "attach", "TopKRouter", "ReLURouter", "RecurrentRouter", "RecurrentRouterGroup", "SinkhornRouter",
           "ExpertChoiceRouter", "HashRouter", "HyperRouter", "ReLUL1Loss", "Router", "RoutingDecision", "RoutingContext", "routing_context",
           "GroupedExperts", "SharedExperts", "Loss", "SwitchAuxLoss", "SequenceAuxLoss", "GlobalBatchAuxLoss",
           "ZLoss", "ERCLoss", "DPSLoss", "step", "set_aux_loss_scale", "aux_losses", "total_aux_loss", "moe_layers",
           "routing_report", "format_routing_report",
           "MultiHashFFN", "count_tokens", "frequency_balanced_expert_map", "id_balanced_expert_map", "hyper_top_k",
           "set_hyper_top_k", "Dispatcher", "LocalDispatcher", "AllToAllDispatcher", "reshard_expert_state_dicts",
           "BlockFFNRouter", "MixtureOfRoutersRouter", "ActivationLocalityLoss", "ChunkSparsificationLoss",
           "RoutingRecord", "record_routing", "replay_routing",
           "record_router_logits", "hf_load_balancing_loss", "analysis", "intervene", "promote_experts", "routing_layers", "rerouting", "r2t2", "OnlineRerouter",
           "CompeteRouter", "CompeteDistillLoss", "BilevelRouter", "GroupBalanceLoss", "NodeLocalityLoss", "expert_groups", "SMEARLayer", "convert"]
