"""Dense to MoE: sparse upcycling, CMoE carving and Read-ME pre-gating of dense SwiGLU FFNs."""
from .carve import CarvedRouter, NeuronGroups, activation_markers, carve, group_neurons
from .dense import DenseSwiGLU, capture_inputs, dense_swiglu
from .pregate import PLAN_KEY, PreGatedRouter, PreGatingRouter, pregate
from .upcycle import upcycle

__all__ = ["upcycle", "carve", "pregate", "dense_swiglu", "DenseSwiGLU", "capture_inputs", "CarvedRouter",
           "NeuronGroups", "activation_markers", "group_neurons", "PreGatingRouter", "PreGatedRouter", "PLAN_KEY"]
