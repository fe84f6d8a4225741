"""CompeteSMoE (Pham et al., "CompeteSMoE -- Statistically Guaranteed Mixture of Experts Training via
Competition", arXiv 2402.02526 / 2505.13380): competition routing, a router distilled from it.

Reference: Fsoft-AIC/CompeteSMoE, ``moe_model/model/moe/competesmoe.py`` (``competition_policy``,
``router_policy``, ``router_loss``, the schedule in ``set_total_steps``) and ``moe_model/train/train.py`` (defaults
``rate_flip=0.05``, ``router_loss_coef=0.01``).
"""
from __future__ import annotations

import random
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..decision import RoutingContext, RoutingDecision
from ..validation import check_bool, check_float, check_int
from .base import GatedRouter, check_finite_logits, forced_selection, renormalized

RESPONSES = ("softplus_mean", "l2_norm")


class CompeteRouter(GatedRouter):
    """Competition routing on scheduled training steps, a softmax top-k router distilled from it otherwise.

    On a *competition step* every expert processes every token; the layer hands the router each pair's neural
    response (`expert_response`: the mean softplus of the expert's output, as the authors' code computes it, or
    its L2 norm, the paper's wording) through ``RoutingContext.expert_responses`` (`Router.uses_expert_responses`
    is the documented hook; the router still never dispatches). Each token then takes the k experts of highest
    response, gated by those responses renormalised over the k (gradient flows to the experts through them), and
    the decision carries ``target_TE = softmax(responses)`` (detached) for `CompeteDistillLoss`, the authors'
    ``router_loss``: the MSE between the router's softmax and that target. ``scores_TE`` are then that softmax, so
    the balance loss reads the competition's distribution as the authors' ``balanceloss`` call does.

    On the other steps (and always in eval; the authors test ``x.requires_grad``, we test training mode so a
    reentrant checkpoint's no-grad forward and its recomputation agree) it routes alone: top-k of ``softmax(x W^T)``, the k scores renormalised (k > 1; Switch gates at k = 1).

    Schedule: step ``s`` (optimizer steps, advanced by `moe_routing.step` / `Router.moe_step`, or set
    ``steps``) competes when ``s >= warmup_steps`` and a uniform draw seeded by ``(seed, s, layer index)`` is below
    ``compete_prob`` -- the same on every data-parallel rank and in a checkpoint recomputation, no RNG consumed.

    Cost: a competition step runs E + k expert FFNs per token instead of k (the responses, then the chosen pairs
    are dispatched as usual -- the authors' ``compute_moe`` recomputes them too); ``last_stats`` reports
    ``compete_step`` and ``expert_flops_ratio`` = (E + k) / k on those steps, 1 otherwise (expected overall
    ratio ``1 + compete_prob * E / k``).

    Deviations from the reference: the schedule draws each (step, layer) independently (theirs pre-draws a
    per-layer table and shifts draws so at most ``max_compete_in_iter`` layers compete in one step); warm-up is
    in steps (theirs: a fraction of the run); their optional ``hybrid`` top-k distillation term and the
    expert-diversity loss of later versions are not ported.

    Args:
        hidden_size: D.  num_experts: E.  top_k: K (2).
        compete_prob: probability that a step past warm-up competes (0.05, the authors' ``rate_flip``).
        warmup_steps: optimizer steps routed by the router alone first (0).
        response: "softplus_mean" (the authors' code) | "l2_norm".
        seed: the schedule's seed.  normalize: renormalise the router's k gates (default: k > 1).
        init_std, strict: as `GatedRouter`.
    Default losses: ``[SwitchAuxLoss(1e-2), CompeteDistillLoss(1e-2)]``.
    """

    uses_expert_responses = True

    def __init__(self, hidden_size: int, num_experts: int, top_k: int = 2, *, compete_prob: float = 0.05,
                 warmup_steps: int = 0, response: str = "softplus_mean", seed: int = 0,
                 normalize: Optional[bool] = None, init_std: float = 0.02, strict: bool = False, device=None,
                 dtype=None) -> None:
        super().__init__(hidden_size, num_experts, top_k, init_std=init_std, strict=strict, device=device,
                         dtype=dtype)
        self.compete_prob = check_float("compete_prob", compete_prob, 0.0, 1.0)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, 0)
        if response not in RESPONSES:
            raise ValueError(f"response must be one of {RESPONSES}, got {response!r}")
        self.response = response
        self.seed = check_int("seed", seed, 0)
        self.normalize = top_k > 1 if normalize is None else check_bool("normalize", normalize)
        if top_k == 1 and self.normalize:
            raise ValueError("CompeteRouter with top_k=1 and normalize=True gives every token a gate of exactly 1, "
                             "so the router gets no gradient from the task loss; use normalize=False")
        self.steps = 0

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, compete_prob={self.compete_prob}, warmup_steps={self.warmup_steps}, "
                f"response={self.response!r}")

    def default_losses(self) -> list:
        from ..losses.balance import SwitchAuxLoss
        from ..losses.compete import CompeteDistillLoss

        return [SwitchAuxLoss(1e-2), CompeteDistillLoss(1e-2)]

    # --- the schedule ---
    # a tensor, not a dict: checkpoint formats such as safetensors (moe-ablate's) store tensors only
    def get_extra_state(self) -> Tensor:
        return torch.tensor(self.steps, dtype=torch.int64)

    def set_extra_state(self, state) -> None:
        self.steps = int(state["steps"] if isinstance(state, dict) else state)

    def step_statistics(self) -> Optional[Tensor]:
        return torch.zeros(0, dtype=torch.float64)  # nothing to reduce: the step only advances the schedule

    @classmethod
    def apply_step(cls, routers: Sequence["CompeteRouter"], statistics: Sequence[Tensor]) -> None:
        for r in routers:
            r.steps += 1

    def is_competition_step(self, layer_key: object = None) -> bool:
        """Whether step ``steps`` competes in the layer ``layer_key`` (an int layer index enters the draw)."""
        if self.steps < self.warmup_steps or self.compete_prob == 0.0:
            return False
        layer = layer_key if isinstance(layer_key, int) else 0
        return random.Random(f"{self.seed}:{self.steps}:{layer}").random() < self.compete_prob

    def wants_expert_responses(self, layer_key: object) -> bool:
        # training mode alone, not grad mode: a reentrant checkpoint runs the forward without grad and recomputes
        # it with grad, and both must take the same branch
        return self.training and self.is_competition_step(layer_key)

    def expert_response(self, h_TED: Tensor) -> Tensor:
        """[T, E] neural response of each expert's output ``h_TED`` [T, E, D]."""
        h = h_TED.to(self.math_dtype)
        return F.softplus(h).mean(-1) if self.response == "softplus_mean" else h.norm(dim=-1)

    # --- routing ---
    def select(self, logits_TE: Tensor, scores_TE: Tensor, ctx: Optional[RoutingContext]) -> Tensor:
        return scores_TE.topk(self.top_k, dim=-1).indices

    def gates(self, experts_TK: Tensor, logits_TE: Tensor, scores_TE: Tensor) -> Tensor:
        gates_TK = scores_TE.gather(1, experts_TK)
        return renormalized(gates_TK) if self.normalize else gates_TK

    def choose(self, logits_TE, scores_TE, forced_TK, ctx, backend):
        experts_TK, gates_TK, extra = super().choose(logits_TE, scores_TE, forced_TK, ctx, backend)
        dev = logits_TE.device
        return experts_TK, gates_TK, {**extra, "compete_step": torch.zeros((), device=dev),
                                      "expert_flops_ratio": torch.ones((), dtype=torch.float64, device=dev)}

    def route(self, x_TD: Tensor, ctx: Optional[RoutingContext], layer_key: object,
              backend: str = "torch") -> RoutingDecision:
        responses = None if ctx is None else ctx.expert_responses.get(layer_key)
        if responses is None:
            return super().route(x_TD, ctx, layer_key, backend)
        T, E, K = x_TD.shape[0], self.num_experts, self.top_k
        if responses.shape != (T, E):
            raise ValueError(f"expert_responses[{layer_key!r}] must have shape [{T}, {E}], got "
                             f"{tuple(responses.shape)}")
        forced, native_T = forced_selection(ctx, layer_key, T, K, E, x_TD.device)
        logits_TE, nonfinite = check_finite_logits(self.gating(x_TD, ctx), self.strict)
        resp_TE = responses.to(self.math_dtype)
        experts_TK = resp_TE.detach().topk(K, dim=-1).indices
        if forced is not None:
            experts_TK = forced if native_T is None else torch.where(native_T[:, None], experts_TK, forced)
        # responses are positive for softplus / norms; the floor keeps an all-zero row finite
        gates_TK = renormalized(resp_TE.gather(1, experts_TK))
        target_TE = resp_TE.softmax(-1)
        extra = {"compete_step": torch.ones((), device=x_TD.device),
                 "expert_flops_ratio": torch.full((), (E + K) / K, dtype=torch.float64, device=x_TD.device)}
        decision = RoutingDecision.from_topk(experts_TK, gates_TK, logits_TE, target_TE, extra=extra)
        decision.target_TE = target_TE.detach()
        if nonfinite is not None:
            decision.extra["nonfinite_tokens"] = nonfinite
        return decision
