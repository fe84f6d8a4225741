"""The routers of moe_routing/routers/ sinkhorn.py, expert_choice.py, hash.py and hyper.py inside MoELayer, each
test over all four: outputs and gradients against a naive loop in float64, forward / backward in float32 and
bfloat16, E = 1 and k = E with a strided input, and the forced-experts and input checks they share. Each router's
own tests are in test_router_<name>.py; the naive references in reference.py."""
from __future__ import annotations

import pytest
import torch

from moe_routing import MoELayer, RoutingContext, routing_context
from moe_routing.routers.expert_choice import ExpertChoiceRouter
from moe_routing.routers.hash import HashRouter
from moe_routing.routers.hyper import HyperRouter
from moe_routing.routers.sinkhorn import SinkhornRouter

from reference import (assert_output_and_grads_close, leaf, naive_ffn, naive_moe, pairs_expert_choice, pairs_hyper,
                       pairs_sinkhorn)

D, E, V = 7, 6, 50
pytestmark = pytest.mark.filterwarnings("ignore:ExpertChoiceRouter is not causal")


def make_router(name, k=2):
    r = {"sinkhorn": lambda: SinkhornRouter(D, E, k, tol=1e-12, max_iters=10000),
         "expert_choice": lambda: ExpertChoiceRouter(D, E, k), "hash": lambda: HashRouter(D, E, k, vocab_size=V),
         "hyper": lambda: HyperRouter(D, E, k, hyper_hidden=5)}[name]()
    if isinstance(getattr(r, "weight", None), torch.nn.Parameter):
        with torch.no_grad():
            r.weight.normal_(0, 0.7)  # decisive logits: no near-ties between float32 and float64
    return r


ROUTERS = ["sinkhorn", "expert_choice", "hash", "hyper"]


def naive_pairs(name, router, x, ids, k):
    """The naive pairs for ``router`` and [(router parameter, its naive leaf)] for the gradient comparison."""
    if name in ("sinkhorn", "expert_choice"):
        w = leaf(router.weight)
        pairs = pairs_sinkhorn(x, w, k) if name == "sinkhorn" else pairs_expert_choice(x, w, router.capacity_factor)
        return pairs, [(router.weight, w)]
    if name == "hash":
        return [(t, int(e), 1.0 / k) for t in range(x.shape[0]) for e in router.expert_map[ids[t]]], []
    emb = leaf(router.embedding)
    return pairs_hyper(x, emb, [p.detach() for p in router.hypernet.parameters()], k, E), [(router.embedding, emb)]


# one token with Sinkhorn: the balanced plan is uniform, its top-k a tie (test_sinkhorn_single_token_...)
@pytest.mark.parametrize("name,T,k", [(n, T, k) for n in ROUTERS for T, k in [(1, 1), (11, 2), (13, 3)]
                                      if (n, T) != ("sinkhorn", 1)])
def test_layer_matches_naive_loop_with_gradients(name, T, k):
    torch.manual_seed(T * 10 + k)
    router = make_router(name, k)
    layer = MoELayer(D, 5, E, k, router=router, losses=[]).double()
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, V, (T,))
    y = layer(x, RoutingContext(token_ids=ids))

    ex = [layer.experts.w_gate, layer.experts.w_up, layer.experts.w_down]
    x_ref, ex_ref = leaf(x), [leaf(p) for p in ex]
    pairs, router_leaves = naive_pairs(name, router, x_ref, ids.tolist(), k)
    y_ref = naive_moe(x_ref, ex_ref, pairs)
    assert_output_and_grads_close(y, y_ref, [x, *ex, *(p for p, _ in router_leaves)],
                                  [x_ref, *ex_ref, *(q for _, q in router_leaves)])
    counts = torch.bincount(torch.tensor([e for _, e, _ in pairs], dtype=torch.long), minlength=E)
    assert torch.equal(layer.last_stats["tokens_per_expert"], counts)


@pytest.mark.parametrize("name", ROUTERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_forward_backward_fp32_bf16(name, dtype):
    torch.manual_seed(5)
    layer = MoELayer(D, 5, E, 2, router=make_router(name, 2)).to(dtype)
    for p in layer.router.parameters():
        assert p.dtype == torch.float32
    x = torch.randn(2, 9, D, dtype=dtype, requires_grad=True)
    with routing_context(layer, token_ids=torch.randint(0, V, (2, 9)), padding_mask=torch.arange(18).view(2, 9) > 15):
        y = layer(x)
    assert y.shape == x.shape and y.dtype == dtype
    y.float().square().sum().backward()
    assert torch.isfinite(x.grad.float()).all() and x.grad.abs().sum() > 0
    trainable = [p for p in layer.router.parameters() if p.requires_grad]
    assert len(trainable) == (0 if name == "hash" else 1)
    for p in trainable:
        assert p.grad is not None and p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["sinkhorn", "hyper"])
def test_bad_forced_experts_and_input(name):
    r = make_router(name, 2)
    with pytest.raises(ValueError, match=r"forced_experts\[0\] must be an integer tensor of shape \[3, 2\]"):
        r(torch.randn(3, D), RoutingContext(forced_experts={0: torch.zeros(3, 1, dtype=torch.long)}), 0)
    with pytest.raises(ValueError, match="outside"):
        r(torch.randn(3, D), RoutingContext(forced_experts={0: torch.full((3, 2), E)}), 0)
    with pytest.raises(ValueError, match=f"shape \\[T, {D}\\]"):
        r(torch.randn(3, D + 1))


@pytest.mark.parametrize("name", ROUTERS)
@pytest.mark.parametrize("n_e,k", [(1, 1), (4, 4)])
def test_one_expert_and_k_equals_e_with_strided_input(name, n_e, k):
    """E = 1 and k = E: every token reaches every expert, so the layer is the gate-weighted sum of all experts
    (for expert choice with cf = k too: C = T); a non-contiguous input matches its contiguous copy."""
    torch.manual_seed(n_e)
    router = {"sinkhorn": lambda: SinkhornRouter(D, n_e, k), "expert_choice": lambda: ExpertChoiceRouter(D, n_e, k),
              "hash": lambda: HashRouter(D, n_e, k, vocab_size=V), "hyper": lambda: HyperRouter(D, n_e, k)}[name]()
    layer = MoELayer(D, 3, n_e, k, router=router, losses=[]).double()
    x = torch.randn(D, 5, dtype=torch.float64).t()  # [5, D], strided
    ctx = RoutingContext(token_ids=torch.randint(0, V, (5,)))
    y = layer(x, ctx)
    torch.testing.assert_close(y, layer(x.contiguous(), ctx), rtol=1e-12, atol=1e-14)  # matmul ulps only
    d = layer.router(x, ctx)
    assert sorted(zip(d.token_N.tolist(), d.expert_N.tolist())) == [(t, e) for t in range(5) for e in range(n_e)]
    ex = layer.experts
    rows = []
    for t in range(5):
        w = {int(e): d.weight_N[i] for i, e in enumerate(d.expert_N.tolist()) if d.token_N[i] == t}
        rows.append(sum(w[e] * naive_ffn(x[t], ex.w_gate[e], ex.w_up[e], ex.w_down[e], "swiglu") for e in range(n_e)))
    torch.testing.assert_close(y, torch.stack(rows), rtol=1e-10, atol=1e-12)
