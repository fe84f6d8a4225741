"""Routers decide which experts each token uses; they never dispatch."""
from .base import Router
from .topk import TopKRouter

ROUTERS = {"topk": TopKRouter}

__all__ = ["Router", "TopKRouter", "ROUTERS"]
