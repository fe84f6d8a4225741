"""Pretraining ablations: small MoE language models compared across routers (``moe-ablate``).

``moe_routing.ablate.cli.main(argv)`` runs a preset; the pieces (presets, model, router registry, data,
training with checkpoint/resume, results, plots) live in the sibling modules.
"""
from .config import PRESETS, Preset, get_preset
from .registry import ROUTER_BUILDERS, build_model

__all__ = ["PRESETS", "Preset", "get_preset", "ROUTER_BUILDERS", "build_model"]
