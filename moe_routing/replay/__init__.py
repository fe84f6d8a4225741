"""Routing replay for RL on MoE models: engine layouts, micro-batch packing, mismatch metrics, RSPO weights and
Megatron-Core interop (the pure-tensor parts; record and replay contexts live beside them)."""
from .engine import from_engine, pack_records
from .megatron import from_megatron, get_megatron_record, set_megatron_replay, to_megatron
from .metrics import LogprobMismatch, RoutingMismatch, logprob_mismatch, router_shift_weights, routing_mismatch

__all__ = ["from_engine", "pack_records", "router_shift_weights", "routing_mismatch", "RoutingMismatch",
           "logprob_mismatch", "LogprobMismatch", "to_megatron", "from_megatron", "set_megatron_replay",
           "get_megatron_record"]
