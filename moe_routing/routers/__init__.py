"""Routers decide which experts each token uses; they never dispatch."""
from .base import GatedRouter, Router
from .bilevel import BilevelRouter
from .blockffn import BlockFFNRouter
from .compete import CompeteRouter
from .expert_choice import ExpertChoiceRouter
from .hash import HashRouter
from .hyper import HyperRouter
from .mor import MixtureOfRoutersRouter
from .recurrent import RecurrentRouter, RecurrentRouterGroup
from .relu import ReLURouter
from .sinkhorn import SinkhornRouter
from .topk import TopKRouter

# Routers a layer can build by name (the recurrent router needs its model-level group, so it is not here).
ROUTERS = {"topk": TopKRouter, "relu": ReLURouter, "sinkhorn": SinkhornRouter, "expert_choice": ExpertChoiceRouter,
           "hash": HashRouter, "hyper": HyperRouter, "blockffn": BlockFFNRouter, "mor": MixtureOfRoutersRouter,
           "compete": CompeteRouter, "bilevel": BilevelRouter}

__all__ = ["Router", "GatedRouter", "TopKRouter", "ReLURouter", "RecurrentRouter", "RecurrentRouterGroup", "SinkhornRouter",
           "ExpertChoiceRouter", "HashRouter", "HyperRouter", "BlockFFNRouter",
           "MixtureOfRoutersRouter", "CompeteRouter", "BilevelRouter", "ROUTERS"]
