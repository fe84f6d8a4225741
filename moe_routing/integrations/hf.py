"""Hugging Face transformers 5.x integration (optional extra ``hf``).

Importing this module registers ``"moe_routing"`` in transformers' ``ALL_EXPERTS_FUNCTIONS``, so
``from_pretrained(..., experts_implementation="moe_routing")``, ``model.set_experts_implementation("moe_routing")``
or ``config._experts_implementation = "moe_routing"`` runs a model's experts on this library's dispatch ops
(`hf_experts`). `swap_routers` puts this library's routers into a model's sparse blocks (`hf_routers`).

Tested on CPU with transformers 5.24 (Qwen3-MoE, Mixtral, OLMoE, DeepSeek-V3).
"""
from __future__ import annotations

try:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError("moe_routing.integrations.hf needs transformers>=5 (pip install 'moe_routing[hf]')") from err

from .hf_experts import EXPERTS_IMPLEMENTATION, moe_routing_experts_forward
from .hf_routers import (SUPPORTED_GATES, MoEBlock, RouterGate, RouterLogitsTap, family_topk_kwargs,
                         swap_routers)

ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPLEMENTATION, moe_routing_experts_forward)

__all__ = ["EXPERTS_IMPLEMENTATION", "moe_routing_experts_forward", "swap_routers", "family_topk_kwargs",
           "RouterGate", "RouterLogitsTap", "MoEBlock", "SUPPORTED_GATES"]
