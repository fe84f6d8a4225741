"""SMEARLayer against the naive per-example weighted average of expert weights, in float64."""
import pytest
import torch
import torch.nn.functional as F

import moe_routing as mr


def naive_smear(layer, x_BSD, valid_BS=None):
    """Loop over examples and experts: p = softmax(W_r mean(x)), W = sum_e p_e W_e, one FFN per example."""
    ex = layer.experts
    out = []
    for b in range(x_BSD.shape[0]):
        x = x_BSD[b]
        keep = x if valid_BS is None else x[valid_BS[b]]
        pooled = keep.mean(0) if keep.shape[0] else torch.zeros_like(x[0])
        p = torch.softmax(layer.router_weight @ pooled, -1)
        merged = {}
        for name in ("w_gate", "w_up", "w_down"):
            w = getattr(ex, name)
            if w is not None:
                merged[name] = sum(p[e] * w[e] for e in range(layer.num_experts))
        up = x @ merged["w_up"]
        if ex.activation == "swiglu":
            h = F.silu(x @ merged["w_gate"]) * up
        else:
            h = F.gelu(up) if ex.activation == "gelu" else F.relu(up)
        y = h @ merged["w_down"]
        if layer.shared_experts is not None:
            y = y + layer.shared_experts(x)
        out.append(y)
    return torch.stack(out)


def make(D=5, Fh=7, E=3, **kw):
    torch.manual_seed(0)
    layer = mr.SMEARLayer(D, Fh, E, dtype=torch.float64, router_kwargs={"init_std": 0.5}, **kw)
    return layer


@pytest.mark.parametrize("activation,shared", [("swiglu", 0), ("gelu", 1), ("relu", 2)])
def test_matches_naive_weighted_average(activation, shared):
    layer = make(activation=activation, num_shared_experts=shared)
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    torch.testing.assert_close(layer(x), naive_smear(layer, x))
    assert layer.last_stats["smear_probs_mean"].shape == (3,)


def test_packed_sequences_match_separate_examples():
    layer = make()
    lens = [3, 1, 5]
    x_TD = torch.randn(sum(lens), 5, dtype=torch.float64)
    y = layer(x_TD, mr.RoutingContext(seq_lens=torch.tensor(lens)))
    parts = [naive_smear(layer, s[None])[0] for s in x_TD.split(lens)]
    torch.testing.assert_close(y, torch.cat(parts))
    # a [T, D] input without seq_lens is one example
    torch.testing.assert_close(layer(x_TD), naive_smear(layer, x_TD[None])[0])


def test_padding_is_left_out_of_the_router_mean():
    layer = make()
    x = torch.randn(2, 4, 5, dtype=torch.float64)
    pad = torch.tensor([[False, False, True, True], [False, True, False, False]])
    y = layer(x, mr.RoutingContext(padding_mask=pad))
    torch.testing.assert_close(y, naive_smear(layer, x, ~pad))
    x2 = x.clone()
    x2[pad] = 100.0  # padding values do not move the routing of the real tokens
    torch.testing.assert_close(layer(x2, mr.RoutingContext(padding_mask=pad))[~pad], y[~pad])


def test_exact_gradients_gradcheck_and_naive():
    layer = make(D=3, Fh=4, E=2)
    x = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    names = ["router_weight", "experts.w_gate", "experts.w_up", "experts.w_down"]
    params = dict(layer.named_parameters())

    def f(x, *ws):
        return torch.func.functional_call(layer, dict(zip(names, ws)), (x,))

    assert torch.autograd.gradcheck(f, (x, *[params[n].detach().clone().requires_grad_() for n in names]))
    # the same gradients as autograd through the naive loop
    y = layer(x)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, params["router_weight"]], g)
    want = torch.autograd.grad(naive_smear(layer, x), [x, params["router_weight"]], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert got[1].abs().sum() > 0


def test_moe_layer_checkpoint_experts_load():
    moe = mr.MoELayer(6, 8, 4, top_k=2, num_shared_experts=1)
    smear = mr.SMEARLayer(6, 8, 4, num_shared_experts=1)
    sd = {k: v for k, v in moe.state_dict().items() if k.startswith(("experts.", "shared_experts."))}
    missing, unexpected = smear.load_state_dict(sd, strict=False)
    assert missing == ["router_weight"] and not unexpected
    torch.testing.assert_close(smear.experts.w_up, moe.experts.w_up)


def test_bf16_cast_keeps_router_float32_and_runs():
    layer = mr.SMEARLayer(4, 6, 3).to(torch.bfloat16)
    assert layer.router_weight.dtype == torch.float32 and layer.experts.w_up.dtype == torch.bfloat16
    y = layer(torch.randn(2, 3, 4, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()


def test_bad_input_and_empty_batch():
    with pytest.raises(ValueError, match="router_kwargs"):
        mr.SMEARLayer(4, 6, 3, router_kwargs={"top_k": 2})
    with pytest.raises(TypeError, match="num_experts"):
        mr.SMEARLayer(4, 6, True)
    layer = mr.SMEARLayer(4, 6, 3)
    with pytest.raises(ValueError, match="hidden_size"):
        layer(torch.randn(2, 5))
    with pytest.raises(ValueError, match="seq_lens"):
        layer(torch.randn(5, 4), mr.RoutingContext(seq_lens=torch.tensor([2, 2])))
    assert layer(torch.randn(0, 4)).shape == (0, 4)
