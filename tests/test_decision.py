"""moe_routing/decision.py: RoutingDecision's probabilities (normalised for non-softmax scores) and
RoutingContext.to (tensors moved, state shared) with its padding / token-id accessors."""
from __future__ import annotations

import pytest
import torch

import moe_routing as mr
from moe_routing import RoutingContext

D, E, K = 10, 7, 3


def test_decision_probs_normalise_non_softmax_scores():
    r = mr.TopKRouter(D, E, K, score_func="sigmoid")
    d = r(torch.randn(5, D))
    assert not d.scores_normalized
    torch.testing.assert_close(d.probs_TE.sum(-1), torch.ones(5))
    d = mr.TopKRouter(D, E, K)(torch.randn(5, D))
    assert d.scores_normalized and d.probs_TE is d.scores_TE


def test_context_to_moves_tensors_and_shares_state():
    ctx = RoutingContext(token_ids=torch.arange(6), padding_mask=torch.zeros(6, dtype=torch.bool),
                         seq_lens=[2, 4], forced_experts={0: torch.zeros(6, 2, dtype=torch.long)})
    assert ctx.to("cpu") is ctx  # nothing to move: no copy
    moved = ctx.to("meta")
    assert moved is not ctx
    for name in ("token_ids", "padding_mask", "seq_lens"):
        assert getattr(moved, name).device.type == "meta" and getattr(ctx, name).device.type == "cpu"
    assert moved.layer_state is ctx.layer_state and moved.forced_experts is ctx.forced_experts
    assert ctx.padding_T(6, device=torch.device("meta")).device.type == "meta"
    assert ctx.token_ids_T(6, device="meta").shape == (6,)
    assert ctx.padding_T(6).device.type == "cpu"
    with pytest.raises(ValueError, match="padding_mask has 6 elements"):
        ctx.padding_T(5, device="meta")
