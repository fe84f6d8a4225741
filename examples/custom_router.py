"""Writing your own router: a fixed-k router is a `GatedRouter` that says how experts and gates are chosen.

The base owns the float32 [E, D] gate `weight`, the logits, the non-finite-logit policy, the `top_k` check and
routing replay (`forced_experts`); this subclass adds Shazeer et al.'s (2017) noisy top-k gating.
Run: `.venv/bin/python examples/custom_router.py`.
"""
import torch
import torch.nn.functional as F
from torch import nn

import moe_routing as mr
from moe_routing.routers.base import softmax_over_chosen


class NoisyTopKRouter(mr.GatedRouter):
    """Top-k of ``x W^T + N(0, 1) * softplus(x W_noise^T)`` (noise in training only); softmax over the k."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int = 2, **kwargs) -> None:
        super().__init__(hidden_size, num_experts, top_k, **kwargs)
        self.w_noise = nn.Parameter(torch.zeros_like(self.weight))

    def gating(self, x_TD, ctx):
        logits_TE = x_TD @ self.weight.t()
        if self.training:
            logits_TE = logits_TE + torch.randn_like(logits_TE) * F.softplus(x_TD @ self.w_noise.t())
        return logits_TE

    def select(self, logits_TE, scores_TE, ctx):
        return logits_TE.detach().topk(self.top_k, dim=-1).indices

    def gates(self, experts_TK, logits_TE, scores_TE):
        return softmax_over_chosen(experts_TK, logits_TE)


if __name__ == "__main__":
    torch.manual_seed(0)
    layer = mr.MoELayer(64, 128, 8, 2, router=NoisyTopKRouter(64, 8, 2))  # default loss: switch aux 1e-2
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    mr.attach(layer, optimizer)  # per-step controllers run after every optimizer.step()
    for _ in range(5):
        optimizer.zero_grad()
        layer(torch.randn(4, 32, 64)).square().mean().backward()
        optimizer.step()
    print(mr.format_routing_report(mr.routing_report(layer)))
