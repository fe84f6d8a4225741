"""torch.compile of moe_routing/layer.py's MoELayer on CPU (each compile costs ~10-30 s): dynamic shapes match
eager and do not recompile across token counts, padding compiles without graph breaks, non-finite tokens are
counted instead of raised, and the expert loop (a host read inside a custom op) keeps one graph with an aux loss."""
from __future__ import annotations

import copy

import pytest
import torch

from moe_routing import MoELayer, RoutingContext
from moe_routing.losses import SequenceAuxLoss, SwitchAuxLoss

from conftest import needs_grouped_mm

D, F, E, K = 16, 32, 4, 2


# Without torch._grouped_mm the expert loop reads counts on the host: a graph break inside the layer, which a
# layer with an aux loss does not compile through correctly (test_compiled_aux_gradient_across_a_graph_break).
@needs_grouped_mm
def test_compile_dynamic_matches_eager():
    torch.manual_seed(0)
    eager = MoELayer(D, F, E, K, num_shared_experts=1)
    compiled_layer = copy.deepcopy(eager)
    compiled = torch.compile(compiled_layer, dynamic=True)
    for shape in [(2, 10, D), (3, 7, D)]:  # a second token count must reuse the dynamic graph (no error)
        x = torch.randn(*shape)
        x_e = x.clone().requires_grad_()
        x_c = x.clone().requires_grad_()
        y_e = eager(x_e)
        y_c = compiled(x_c)
        assert y_c.shape == x.shape and y_c.dtype == x.dtype
        torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-6)
        g = torch.randn_like(y_e)
        (y_e * g).sum().backward()
        (y_c * g).sum().backward()
        torch.testing.assert_close(x_c.grad, x_e.grad, rtol=1e-5, atol=1e-6)
        for (name, p_e), (_, p_c) in zip(eager.named_parameters(), compiled_layer.named_parameters()):
            torch.testing.assert_close(p_c.grad, p_e.grad, rtol=1e-4, atol=1e-6, msg=name)
        # the aux loss gradient was injected in the compiled layer too (router grad equals eager, which has it)
        assert compiled_layer.router.weight.grad.abs().max() > 0
        torch.testing.assert_close(compiled_layer.last_stats["tokens_per_expert"],
                                   eager.last_stats["tokens_per_expert"], rtol=0, atol=0)
        eager.zero_grad()
        compiled_layer.zero_grad()


def test_compiled_layer_with_the_expert_loop_and_an_aux_loss():
    """expert_impl="loop" (float64, unaligned sizes, GPUs without grouped_mm) reads the counts on the host inside
    its custom op: the graph does not break there, and inductor's backward carries the aux gradient."""
    torch.manual_seed(0)
    eager = MoELayer(D, F, E, K, expert_impl="loop")
    compiled_layer = copy.deepcopy(eager)
    x, g = torch.randn(2, 10, D), torch.randn(2, 10, D)
    (eager(x) * g).sum().backward()
    (torch.compile(compiled_layer, dynamic=True)(x) * g).sum().backward()
    torch.testing.assert_close(compiled_layer.router.weight.grad, eager.router.weight.grad, rtol=1e-4, atol=1e-6)
    for (name, p_e), (_, p_c) in zip(eager.named_parameters(), compiled_layer.named_parameters()):
        torch.testing.assert_close(p_c.grad, p_e.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
@needs_grouped_mm
def test_dropless_layer_with_padding_compiles_without_graph_breaks():
    """fullgraph=True fails on any graph break: a bincount or boolean index (data-dependent sizes) would be one."""
    torch.manual_seed(0)
    layer = MoELayer(D, F, E, K, expert_impl="grouped_mm", losses=[SwitchAuxLoss(), SequenceAuxLoss()])
    x = torch.randn(2, 5, D)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, 3:] = True
    compiled = torch.compile(lambda x, p: layer(x, RoutingContext(padding_mask=p)), fullgraph=True)
    y = compiled(x, pad)
    stats = dict(layer.last_stats)
    torch.testing.assert_close(y, layer(x, RoutingContext(padding_mask=pad)), rtol=1e-5, atol=1e-6)
    assert stats["tokens_per_expert"].tolist() == layer.last_stats["tokens_per_expert"].tolist()


def test_compile_dynamic_runs_ten_token_counts_without_recompiling():
    """Stats on: nothing in the layer may pin T (e.g. a tensor built from it) in the dynamic graph."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.manual_seed(0)
    layer = MoELayer(D, F, E, K)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(layer, backend=counter, dynamic=True)
    frames = None
    for T in range(5, 15):
        x = torch.randn(T, D, requires_grad=True)
        compiled(x).sum().backward()
        assert layer.last_stats["experts_per_token"].item() == pytest.approx(K)
        if frames is None:
            frames = counter.frame_count
    assert counter.frame_count == frames, f"recompiled: {frames} -> {counter.frame_count} frames"


def test_compiled_layer_counts_non_finite_tokens_instead_of_raising():
    """A data-dependent raise cannot be traced: compiled (on CPU too) the layer behaves as on accelerators."""
    layer = MoELayer(D, F, E, K)
    compiled = torch.compile(layer, backend="aot_eager")
    x = torch.randn(9, D)
    x[3, 2], x[5, 0] = float("nan"), float("inf")
    y = compiled(x)
    assert int(layer.last_stats["nonfinite_tokens"]) == 2
    assert torch.isfinite(y[[0, 1, 2, 4, 6, 7, 8]]).all()
    with pytest.raises(ValueError, match="NaN/inf"):  # eager on CPU still raises
        layer(x)
