"""moe_routing/routers/expert_choice.py: each expert's choice of tokens against a per-expert loop (capacity,
padding, dropped tokens), the exact capacity, the warning that it is not causal, pairs built without reading
device values, and argument checks."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from moe_routing import RoutingContext
from moe_routing.routers.expert_choice import ExpertChoiceRouter

from reference import ec_capacity, pairs_expert_choice

D, E = 7, 6
pytestmark = pytest.mark.filterwarnings("ignore:ExpertChoiceRouter is not causal")


@pytest.mark.parametrize("T,cf,n_pad", [(1, 2, 0), (17, 2, 4), (9, 0.5, 2), (5, 4, 0), (4, 2, 4)])
def test_expert_choice_against_per_expert_loop(T, cf, n_pad):
    torch.manual_seed(T)
    r = ExpertChoiceRouter(D, E, 2, capacity_factor=cf).double()
    with torch.no_grad():
        r.weight.normal_(0, 0.7)
    x = torch.randn(T, D, dtype=torch.float64)
    pad = torch.zeros(T, dtype=torch.bool)
    pad[torch.randperm(T)[:n_pad]] = True
    d = r(x, RoutingContext(padding_mask=pad))
    pairs = pairs_expert_choice(x, r.weight.detach(), cf, (~pad).tolist())
    assert d.token_N.tolist() == [t for t, _, _ in pairs] and d.expert_N.tolist() == [e for _, e, _ in pairs]
    torch.testing.assert_close(d.weight_N.detach(), torch.stack([w for _, _, w in pairs]) if pairs
                               else torch.zeros(0, dtype=torch.float64), rtol=1e-12, atol=0)
    assert d.top_k is None and bool((d.token_N.diff() >= 0).all())
    cap = ec_capacity(cf, T - n_pad, E)
    assert int(d.extra["capacity"]) == cap
    assert torch.equal(torch.bincount(d.expert_N, minlength=E), torch.full((E,), cap))
    assert not bool(pad[d.token_N].any())
    chosen = set(d.token_N.tolist())
    dropped = sum(1 for t in range(T) if not pad[t] and t not in chosen)
    assert float(d.extra["dropped_token_fraction"]) == pytest.approx(dropped / max(T - n_pad, 1))


def test_expert_choice_capacity_exact_and_clamped():
    r = ExpertChoiceRouter(D, 10, 2, capacity_factor=1.1)
    assert r.capacity(100) == 11  # float arithmetic would give ceil(11.000000000000002) = 12
    assert ExpertChoiceRouter(D, 3, 2).capacity(5) == 4  # default capacity_factor = top_k: ceil(2 * 5 / 3)
    assert ExpertChoiceRouter(D, 3, 3, capacity_factor=4).capacity(5) == 5  # ceil(20 / 3) = 7 > T clamps to T
    assert ExpertChoiceRouter(D, 4, 1).capacity(0) == 0


def test_expert_choice_warns_once_per_instance_and_rejects_replay():
    x = torch.randn(3, D)
    r = ExpertChoiceRouter(D, E, 2)
    with pytest.warns(UserWarning, match="not causal"):
        r(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r(x)
    with pytest.warns(UserWarning, match="not causal"):
        ExpertChoiceRouter(D, E, 2)(x)
    with pytest.raises(ValueError, match="forced_experts"):
        r(x, RoutingContext(forced_experts={0: torch.zeros(3, 2, dtype=torch.long)}), 0)


def test_expert_choice_builds_pairs_without_reading_device_values():
    """Pairs came from a nonzero over the [T, E] choice mask: a host sync on accelerators, although N = E * C is
    known on the host. The meta device stands in for an accelerator: any host read of its values raises."""
    r = ExpertChoiceRouter(D, E, 2, capacity_factor=1.5).to("meta")
    d = r.route(torch.empty(9, D, device="meta"), None, None)  # Router.forward's autocast guard has no meta
    cap = ec_capacity(1.5, 9, E)
    assert d.token_N.shape == d.expert_N.shape == d.weight_N.shape == (E * cap,)
    assert d.token_N.device.type == "meta" and d.extra["max_experts_per_token"].device.type == "meta"


BAD = [
    (lambda: ExpertChoiceRouter(D, E, 7), ValueError, "top_k"),
    (lambda: ExpertChoiceRouter(D, E, 2, capacity_factor=0), ValueError, "capacity_factor"),
    (lambda: ExpertChoiceRouter(D, E, 2, capacity_factor=math.inf), ValueError, "capacity_factor"),
    (lambda: ExpertChoiceRouter(D, E, 2, capacity_factor="2"), TypeError, "capacity_factor"),
]


@pytest.mark.parametrize("make,exc,match", BAD)
def test_bad_arguments(make, exc, match):
    with pytest.raises(exc, match=match):
        make()
