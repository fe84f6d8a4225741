"""Routing replay for RL on MoE models: record a forward's routing and replay it in another (R2/R3), engine layouts,
micro-batch packing, mismatch metrics, RSPO weights and Megatron-Core interop.

`record_routing` / `replay_routing` (context managers over a model's `MoELayer`s) and `RoutingRecord` (the engine
layout [T, L, K] on the host, saved as safetensors). Recompute safety (a checkpointed layer re-routes exactly as
its forward) lives in `moe_routing.selection`, used by every `MoELayer`.
"""
from .context import record_routing, replay_routing
from .engine import from_engine, pack_records
from .megatron import from_megatron, get_megatron_record, set_megatron_replay, to_megatron
from .metrics import LogprobMismatch, RoutingMismatch, logprob_mismatch, router_shift_weights, routing_mismatch
from .record import RoutingRecord, ids_dtype

__all__ = ["RoutingRecord", "record_routing", "replay_routing", "ids_dtype", "from_engine", "pack_records",
           "router_shift_weights", "routing_mismatch", "RoutingMismatch", "logprob_mismatch", "LogprobMismatch",
           "to_megatron", "from_megatron", "set_megatron_replay", "get_megatron_record"]
