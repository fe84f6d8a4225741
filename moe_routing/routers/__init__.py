"""Routers decide which experts each token uses; they never dispatch."""
from .base import Router
from .relu import ReLURouter
from .topk import TopKRouter

ROUTERS = {"topk": TopKRouter, "relu": ReLURouter}

__all__ = ["Router", "TopKRouter", "ReLURouter", "ROUTERS"]
