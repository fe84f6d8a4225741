"""BlockFFN's router (arXiv 2507.08771): ReLU + RMSNorm gates and an adaptive chunk-sparsification coefficient."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..decision import RoutingContext, RoutingDecision
from ..validation import check_bool, check_float, check_int
from .base import GatedRouter


class BlockFFNRouter(GatedRouter):
    """``A = RMSNorm(ReLU(x @ weight.T))`` (``weight`` [E, D], no bias, RMSNorm with a learned [E] scale): expert e
    serves token t iff its logit is positive, with gate ``A[t, e]``, so experts per token vary (0..E).

    Follows thunlp/BlockFFN ``pretrain/cpm/dragonfly/blockffn.py`` as its ``entrance.sh`` runs it
    (``router_activate_fn=relu``, ``norm_after_router=rms``, RMSNorm eps 1e-6 and scale initialised to 1, no
    balance or L1 loss). Default losses: ``[ActivationLocalityLoss(2e-3), ChunkSparsificationLoss(chunk_len=64)]``
    (`moe_routing.losses.blockffn`), the coefficients and chunk length of those runs.

    Chunk-sparsification coefficient lambda (``csl_coeff``, a float32 buffer read by the loss through
    ``LossInputs.l1_coeff``): the authors' ``AdaptiveLinearScheduler`` (``cpm/training_utils/value_scheduler.py``)
    counted in optimizer steps. lambda stays at ``csl_coeff_init`` for ``csl_stable_steps`` steps; after that, at
    the end of every window of ``csl_window`` steps, ``r`` = mean CSL of that window / mean CSL of the window
    before (pooled over all BlockFFN layers and data-parallel ranks); ``r > 1`` is raised to at least
    ``csl_min_factor``, and ``r`` is capped so that lambda never exceeds ``csl_max_factor * csl_coeff_init``;
    lambda then moves linearly from its value to ``r`` times it over the next window. A growing CSL thus raises
    lambda, a shrinking one lowers it. Runs through the controller protocol (`moe_routing.attach` /
    `moe_routing.step`) from the ``csl`` statistic the loss reports (`observe_loss_stats`; training forwards only).
    ``csl_adaptive=False`` keeps lambda fixed.

    Args:
        hidden_size: D.  num_experts: E.  top_k: nominal k (the layer's; BlockFFN has no k).
        stats_chunk_len: L of the ``cls`` statistic in the layer's stats (8, the paper's 8-token CLS).
        norm_eps: RMSNorm epsilon (1e-6).
        csl_coeff_init: lambda_0 (5e-2).  csl_adaptive: enable the controller (True).
        csl_stable_steps, csl_window: steps before the first change (1000), window length in steps (100).
        csl_min_factor, csl_max_factor: smallest upward ratio (1.025), ceiling on lambda / lambda_0 (4.0).

    Routing replay (``forced_experts``) raises, as for every variable-k router. Stats: ``tls``, ``cls``
    (`moe_routing.metrics.sparsity_stats`), ``max_experts_per_token``, ``csl_coeff``.
    """

    variable_k = True
    scores_normalized = False

    def __init__(self, hidden_size: int, num_experts: int, top_k: int = 1, *, stats_chunk_len: int = 8,
                 norm_eps: float = 1e-6, csl_coeff_init: float = 5e-2, csl_adaptive: bool = True,
                 csl_stable_steps: int = 1000, csl_window: int = 100, csl_min_factor: float = 1.025,
                 csl_max_factor: float = 4.0, init_std: float = 0.02, strict: bool = False, device=None,
                 dtype=None) -> None:
        super().__init__(hidden_size, num_experts, top_k, init_std=init_std, strict=strict, device=device,
                         dtype=dtype)
        self.stats_chunk_len = check_int("stats_chunk_len", stats_chunk_len, 1)
        norm_eps = check_float("norm_eps", norm_eps, 0.0, low_inclusive=False)
        self.csl_coeff_init = check_float("csl_coeff_init", csl_coeff_init, 0.0, low_inclusive=False)
        self.csl_adaptive = check_bool("csl_adaptive", csl_adaptive)
        self.csl_stable_steps = check_int("csl_stable_steps", csl_stable_steps, 0)
        self.csl_window = check_int("csl_window", csl_window, 1)
        self.csl_min_factor = check_float("csl_min_factor", csl_min_factor, 1.0)
        self.csl_max_factor = check_float("csl_max_factor", csl_max_factor, 1.0)
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.norm = nn.RMSNorm(num_experts, eps=norm_eps, **factory)
        self.register_buffer("csl_coeff", torch.tensor(csl_coeff_init, **factory))
        wide = {"device": self.weight.device, "dtype": torch.float64}
        # the linear ramp lambda follows: its start value, its end / start ratio, and steps taken into it
        self.register_buffer("csl_ramp", torch.tensor([csl_coeff_init, 1.0, 0.0], **wide))
        self.register_buffer("csl_steps", torch.zeros((), dtype=torch.int64, device=self.weight.device))
        # the current window's CSL sum and sample count, and the previous window's mean (-1: none yet)
        self.register_buffer("csl_window_stats", torch.tensor([0.0, 0.0, -1.0], **wide))
        # CSL sum and sample count since the last optimizer step (the controller's step_statistics)
        self.register_buffer("csl_accum", torch.zeros(2, **wide))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, stats_chunk_len={self.stats_chunk_len}, csl_adaptive={self.csl_adaptive}"

    def default_losses(self) -> list:
        from ..losses.blockffn import ActivationLocalityLoss, ChunkSparsificationLoss

        return [ActivationLocalityLoss(2e-3), ChunkSparsificationLoss(chunk_len=64)]

    def sparsity_coeff(self) -> Optional[Tensor]:
        return self.csl_coeff

    def scores(self, logits_TE: Tensor) -> Tensor:
        return self.norm(torch.relu(logits_TE))

    def choose_pairs(self, logits_TE: Tensor, scores_TE: Tensor, ctx: Optional[RoutingContext]) -> RoutingDecision:
        active_TE = logits_TE > 0
        token_N, expert_N = active_TE.nonzero(as_tuple=True)  # row-major: sorted by token
        pad_T = None if ctx is None else ctx.padding_T(logits_TE.shape[0])
        valid_active = active_TE if pad_T is None else active_TE[~pad_T]
        extra = {"max_experts_per_token": (valid_active.sum(-1).max() if valid_active.numel()
                                           else torch.zeros((), dtype=torch.int64)),
                 "csl_coeff": self.csl_coeff.detach().clone()}
        return RoutingDecision(token_N=token_N, expert_N=expert_N, weight_N=scores_TE[token_N, expert_N],
                               logits_TE=logits_TE, scores_TE=scores_TE, num_experts=self.num_experts, top_k=None,
                               scores_normalized=False, extra=extra)

    # --- the adaptive CSL coefficient ---
    def observe_loss_stats(self, stats: dict[str, Tensor]) -> None:
        csl = stats.get("csl")
        if csl is not None and self.csl_adaptive and self.should_accumulate():
            with torch.no_grad():
                self.csl_accum[0] += csl.to(self.csl_accum.dtype)
                self.csl_accum[1] += 1

    def step_statistics(self) -> Optional[Tensor]:
        return self.csl_accum if self.csl_adaptive else None

    @classmethod
    @torch.no_grad()
    def apply_step(cls, routers: Sequence["BlockFFNRouter"], statistics: Sequence[Tensor]) -> None:
        """One controller step for every BlockFFN router of a model from the CSL pooled over layers (and ranks)."""
        total, count = torch.stack([s.to(torch.float64).cpu() for s in statistics]).sum(0).tolist()
        for r in routers:
            r._advance(total, count)
            r.csl_accum.zero_()

    def _advance(self, csl_sum: float, csl_count: float) -> None:
        window_sum, window_count, prev_mean = self.csl_window_stats.tolist()
        base, ratio, ramp_pos = self.csl_ramp.tolist()
        step = int(self.csl_steps) + 1
        window_sum, window_count = window_sum + csl_sum, window_count + csl_count
        current = float(self.csl_coeff)
        if step % self.csl_window == 0:
            mean = window_sum / window_count if window_count > 0 else -1.0
            if step >= self.csl_stable_steps and mean > 0 and prev_mean > 0:
                r = mean / prev_mean
                if r > 1:
                    r = max(self.csl_min_factor, r)
                r = min(self.csl_coeff_init * self.csl_max_factor / current, r)
                base, ratio, ramp_pos = current, r, 0.0
            window_sum, window_count, prev_mean = 0.0, 0.0, mean
        ramp_pos += 1
        progress = min(1.0, ramp_pos / self.csl_window)
        self.csl_coeff.fill_(base * (ratio + (1.0 - ratio) * (1.0 - progress)))
        self.csl_ramp.copy_(torch.tensor([base, ratio, ramp_pos], dtype=self.csl_ramp.dtype))
        self.csl_steps.fill_(step)
        self.csl_window_stats.copy_(torch.tensor([window_sum, window_count, prev_mean],
                                                 dtype=self.csl_window_stats.dtype))
