"""moe_routing/control.py: controllers run by `attach` (optimizer hook) and `step` with one stacked all-reduce
for every router of a model; the aux-loss scale is a tensor a compiled graph reads on every call and scales the
injected gradient; routing_context restores layer_idx and the outer context."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import moe_routing as mr
from moe_routing import RoutingContext, SwitchAuxLoss, ZLoss, set_aux_loss_scale

from helpers import loss_layer as make_layer, moe, run_on_gloo_ranks

D, F, E = 12, 8, 6


class Stack(nn.Module):
    """Three aux-free-bias TopK layers and two ReLU layers: two controller classes in one model."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList(
            [mr.MoELayer(D, F, E, 2, router_kwargs={"bias_update_rate": 1e-2}) for _ in range(3)]
            + [mr.MoELayer(D, F, E, 2, router="relu") for _ in range(2)])

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x


def _train_step(model, optimizer, x):
    optimizer.zero_grad()
    model(x).square().mean().backward()
    optimizer.step()


def test_attach_runs_the_controllers_after_each_optimizer_step():
    # a small input and step: at lr 1e-3 this residual stack under a squared loss diverged within three steps for
    # some draws (the controllers under test move by their own rates, not the learning rate)
    x = 0.5 * torch.randn(20, D, generator=torch.Generator().manual_seed(0))
    manual = Stack()
    hooked = copy.deepcopy(manual)
    opt_manual = torch.optim.SGD(manual.parameters(), lr=1e-4)
    opt_hooked = torch.optim.SGD(hooked.parameters(), lr=1e-4)
    handle = mr.attach(hooked, opt_hooked)
    for _ in range(3):
        _train_step(manual, opt_manual, x)
        mr.step(manual)
        _train_step(hooked, opt_hooked, x)
    for a, b in zip(manual.layers, hooked.layers):
        for name, buf in a.router.named_buffers():
            assert torch.equal(buf, dict(b.router.named_buffers())[name]), name
    assert hooked.layers[0].router.expert_bias.abs().sum() > 0           # the bias did move
    assert hooked.layers[3].router.l1_coeff.item() != pytest.approx(1e-8)  # and lambda
    handle.remove()
    before = hooked.layers[0].router.expert_bias.clone()
    _train_step(hooked, opt_hooked, x)
    assert torch.equal(hooked.layers[0].router.expert_bias, before)  # detached: nothing ran
    assert hooked.layers[0].router.load_accum.sum() > 0            # the loads wait for the next step


def test_attach_rejects_a_non_optimizer():
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        mr.attach(Stack(), object())


def test_router_without_controller_is_a_no_op():
    layer = mr.MoELayer(D, F, E, 2)
    assert layer.router.step_statistics() is None
    mr.step(layer)


def _controller_worker(rank: int, world: int, init_file: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        calls = []
        real = dist.all_reduce

        def counting(tensor, *args, **kwargs):
            calls.append(tensor.numel())
            return real(tensor, *args, **kwargs)

        dist.all_reduce = counting
        model = Stack(seed=0)  # same weights on every rank
        xs = [torch.randn(10 + 7 * r, D, generator=torch.Generator().manual_seed(50 + r)) for r in range(world)]
        # the loads every rank would see alone, to rebuild the summed update
        loads, active = [], []
        for x in xs:
            clone = copy.deepcopy(model)
            clone(x)
            loads.append([layer.router.load_accum.clone() for layer in clone.layers[:3]])
            active.append([(layer.router.active_accum.clone(), layer.router.count_accum.clone())
                           for layer in clone.layers[3:]])
        model(xs[rank])
        mr.step(model)
        dist.all_reduce = real
        assert calls == [3 * E + 2 * 2], calls  # ONE all-reduce: 3 bias layers x E loads + 2 ReLU x 2 counts
        for i, layer in enumerate(model.layers[:3]):
            load = sum(loads[r][i] for r in range(world)).double()
            want = 1e-2 * torch.sign(load.mean() - load)
            torch.testing.assert_close(layer.router.expert_bias.double(), want, rtol=0, atol=1e-7)
            assert layer.router.load_accum.sum() == 0
        nnz = sum(float(a) for r in range(world) for a, _ in active[r])
        count = sum(float(c) for r in range(world) for _, c in active[r])
        grow = 1.0 - nnz / count < model.layers[3].router.target_sparsity
        for layer in model.layers[3:]:
            assert layer.router.l1_coeff.item() == pytest.approx(1e-8 * (1.2 if grow else 1.0))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two gloo processes (~20 s); the expert-parallel tests keep one multi-process case by default
def test_one_stacked_all_reduce_for_all_routers_over_two_gloo_ranks():
    run_on_gloo_ranks(_controller_worker)


# ---- aux-loss scale -------------------------------------------------------------------------------------------
def test_set_aux_loss_scale_validates_and_writes_the_buffer_in_place():
    layer = mr.MoELayer(D, F, E, 2)
    buf = layer.aux_loss_scale
    mr.set_aux_loss_scale(layer, 0.25)
    assert layer.aux_loss_scale is buf and buf.item() == 0.25
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="scale must be a finite number >= 0"):
            mr.set_aux_loss_scale(layer, bad)
    with pytest.raises(TypeError, match="scale must be a number"):
        mr.set_aux_loss_scale(layer, True)
    layer.to(torch.bfloat16)
    assert layer.aux_loss_scale.dtype == torch.float32 and layer.aux_loss_scale.item() == 0.25
    assert "aux_loss_scale" not in layer.state_dict()  # a training-loop setting, not a weight


def test_compiled_layer_reads_the_current_aux_loss_scale():
    """Only the aux loss reaches the router when the main loss is 0 * y: its gradient must follow the scale set
    after compilation, without a recompile (a Python float would have been baked into the graph)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.manual_seed(0)
    layer = mr.MoELayer(D, F, E, 2)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(layer, backend=counter)
    x = torch.randn(16, D)
    grads = []
    for scale in (1.0, 3.0, 0.0):
        mr.set_aux_loss_scale(layer, scale)
        layer.zero_grad()
        (compiled(x) * 0).sum().backward()
        grads.append(layer.router.weight.grad.clone())
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], 3.0 * grads[0], rtol=1e-5, atol=1e-8)
    assert grads[2].abs().max() == 0
    assert counter.frame_count == 1, counter.frame_count


@pytest.mark.parametrize("scale", [0.25, 3.0, 0.0])
def test_set_aux_loss_scale_scales_injected_gradient(scale):
    model = nn.Sequential(make_layer([SwitchAuxLoss(1.0), ZLoss(0.1)]), make_layer([SwitchAuxLoss(1.0)], seed=1))
    torch.manual_seed(13)
    x = torch.randn(12, D, dtype=torch.float64)
    (model(x) * 0).sum().backward()
    base = [model[i].router.weight.grad.clone() for i in range(2)]
    assert all(g.abs().max() > 1e-4 for g in base)
    model.zero_grad()
    set_aux_loss_scale(model, scale)
    assert all(m.aux_loss_scale == scale for m in model)
    (model(x) * 0).sum().backward()
    for i in range(2):
        torch.testing.assert_close(model[i].router.weight.grad, scale * base[i], rtol=1e-12, atol=0)


def test_set_aux_loss_scale_rejects_non_number():
    with pytest.raises(TypeError, match="scale"):
        set_aux_loss_scale(make_layer([]), "0.5")


# ---- routing_context -----------------------------------------------------------------------------------------------
def test_routing_context_restores_layer_idx_and_outer_context():
    model = torch.nn.Sequential(moe(), moe(layer_idx=7), moe())
    outer = RoutingContext()
    with mr.routing_context(model, outer):
        assert [m.layer_idx for m in model] == [0, 7, 2]
        with mr.routing_context(model, padding_mask=torch.zeros(3, dtype=torch.bool)) as inner:
            assert all(m._ctx is inner for m in model)
        assert all(m._ctx is outer for m in model) and [m.layer_idx for m in model] == [0, 7, 2]
    assert [m.layer_idx for m in model] == [None, 7, None] and all(m._ctx is None for m in model)
    with pytest.raises(RuntimeError), mr.routing_context(model):
        raise RuntimeError("inside")
    assert [m.layer_idx for m in model] == [None, 7, None]
