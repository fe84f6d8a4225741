"""Test-time rerouting of trained MoE models (nothing in the model is trained).

- `r2t2` / `build_reference` (R2-T2, arXiv 2502.20395): move a test input's routing weights toward those of
  correctly handled reference samples in its neighbourhood ("ngd", "kernel", "mode").
- `OnlineRerouter` / `generate` ("Rewiring Experts on the Fly", arXiv 2510.14853): additive router-logit vectors
  optimised on the context by next-token loss at prefill and at intervals during generation.
- `edit_router_logits` / `add_to_router_logits`: the mechanism both use (a router's logits replaced by
  ``fn(logits)`` on chosen layers for a block).
"""
from .logits import add_to_router_logits, edit_router_logits, output_logits, without_aux_gradient
from .online import OnlineRerouter, generate, next_token_loss
from .r2t2 import (R2T2Reference, R2T2Result, build_reference, kernel_weights, last_token_correct, last_token_loss,
                   neighborhood_loss, r2t2)

__all__ = ["r2t2", "build_reference", "R2T2Reference", "R2T2Result", "kernel_weights", "neighborhood_loss",
           "last_token_loss", "last_token_correct", "OnlineRerouter", "generate", "next_token_loss",
           "edit_router_logits", "add_to_router_logits", "without_aux_gradient", "output_logits"]
