"""The CUDA extension's torch binding (csrc/torch_binding.cpp) run on the CPU emulator.

Built with -DMOE_ROUTING_EMULATE (csrc/emu/emu_build.py), the binding registers the same torch.ops.moe_routing_cuda
ops for CPU tensors over the emulated kernels. Checked here: the registered names and schemas, every op (directly,
through moe_routing.ops.cuda_ext, and through the ops and the layer with backend="cuda") against the torch
reference, gradients through the custom ops, the binding's TORCH_CHECK messages, and the fake implementations
(torch.library.opcheck). Not checked (no GPU): the CUDA device guard, streams, speed.
"""
from __future__ import annotations

import pytest
import torch

import moe_routing as mr
from moe_routing.ops import backend as backend_mod
from moe_routing.ops import combine, cuda_ext, invert_permutation, permute, sort_by_expert
from moe_routing.ops.combine import _combine_backward
from moe_routing.ops.topk_softmax import topk_softmax

from helpers import backend_results, gen, half_expert_routing

SCHEMAS = {
    "permute": "moe_routing_cuda::permute(Tensor x, Tensor src_token) -> Tensor",
    "combine": "moe_routing_cuda::combine(Tensor h, Tensor? weight, Tensor row_of_pair, Tensor token_offsets) "
               "-> Tensor",
    "combine_backward": "moe_routing_cuda::combine_backward(Tensor grad, Tensor h, Tensor weight, Tensor row_of_pair, "
                        "Tensor token) -> (Tensor, Tensor)",
    "sort_by_expert": "moe_routing_cuda::sort_by_expert(Tensor expert, int num_experts) -> (Tensor, Tensor, Tensor)",
    "topk_softmax": "moe_routing_cuda::topk_softmax(Tensor logits, int k, bool softmax_before_topk, bool normalize) "
                    "-> (Tensor, Tensor)",
}


@pytest.fixture(scope="module")
def ops(emu):
    """torch.ops.moe_routing_cuda backed by the emulator, with cuda_ext's wrappers accepting CPU tensors."""
    torch.ops.load_library(str(emu["torch_ext"]))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cuda_ext, "DEVICE_TYPE", "cpu")
        cuda_ext.load()  # the ops are defined now: load registers the fakes
        yield torch.ops.moe_routing_cuda


def routing(T: int, E: int, K: int, variable: bool, seed: int):
    """`helpers.half_expert_routing` from a seed: the experts >= max(E//2, K) get no pair."""
    return half_expert_routing(T, E, K, variable, gen(seed))


def test_registered_names_and_schemas(ops):
    for name, schema in SCHEMAS.items():
        op = getattr(ops, name).default
        assert str(op._schema) == schema
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CPU")  # the emulated registration
    assert set(SCHEMAS) == set(cuda_ext.OPS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
@pytest.mark.parametrize("variable", [False, True], ids=["fixed_k", "variable_k"])
def test_wrappers_match_torch_reference(ops, dtype, variable):
    T, E, K, D = 13, 8, 2, 33
    token_N, expert_N = routing(T, E, K, variable, seed=T + D)
    N = token_N.numel()
    pair_of_row, counts, offsets = cuda_ext.sort_by_expert(expert_N.int(), E)  # int32 ids: converted
    for got, ref in zip((pair_of_row, counts, offsets), sort_by_expert(expert_N, E, "torch")):
        assert torch.equal(got, ref)
    x = torch.randn(T, D, generator=gen(1)).to(dtype)
    src_token = token_N[pair_of_row]
    assert torch.equal(cuda_ext.permute(x, src_token.int()), x[src_token])
    row_of_pair = invert_permutation(pair_of_row)
    token_offsets = torch.nn.functional.pad(torch.bincount(token_N, minlength=T).cumsum(0), (1, 0))
    h = torch.randn(N, D, generator=gen(2)).to(dtype)
    w = torch.rand(N, generator=gen(3), dtype=torch.float64)  # weights converted to the accumulate type
    tol = {} if dtype != torch.bfloat16 else {"rtol": 1.6e-2, "atol": 1e-2}
    ref_y = combine(h, w.to(torch.float64 if dtype == torch.float64 else torch.float32), row_of_pair, token_N, T,
                    None, "torch")
    torch.testing.assert_close(cuda_ext.combine(h, w, row_of_pair, token_offsets), ref_y, **tol)
    dy = torch.randn(T, D, generator=gen(4)).to(dtype)
    w32 = w.float() if dtype != torch.float64 else w
    ref_dh, ref_dw = _combine_backward(dy, h, w32, row_of_pair, token_N, "torch")
    d_h, d_w = cuda_ext.combine_backward(dy, h, w32, row_of_pair, token_N)
    torch.testing.assert_close(d_h, ref_dh, **tol)
    torch.testing.assert_close(d_w, ref_dw, rtol=1e-5, atol=1e-5 * D if dtype != torch.bfloat16 else 0.1)
    logits = torch.randn(T, E, generator=gen(5)).to(dtype)
    for sbt, norm in ((False, False), (True, False), (True, True)):
        ref = topk_softmax(logits, K, "torch", softmax_before_topk=sbt, normalize=norm)
        got = cuda_ext.topk_softmax(logits, K, sbt, norm)
        assert torch.equal(got[1], ref[1])
        torch.testing.assert_close(got[0], ref[0], rtol=2e-6, atol=1e-7)


def test_custom_ops_with_cuda_backend_gradcheck(ops):
    """ops.permute / combine / topk_softmax with backend="cuda" (forward and backward on the extension)."""
    T, E, K, D = 5, 4, 2, 3
    token_N, expert_N = routing(T, E, K, False, seed=3)
    row_of_pair = invert_permutation(sort_by_expert(expert_N, E, "cuda")[0])
    h = torch.randn(T * K, D, generator=gen(6), dtype=torch.float64, requires_grad=True)
    w = torch.rand(T * K, generator=gen(7), dtype=torch.float64, requires_grad=True)
    for top_k in (K, None):
        assert torch.autograd.gradcheck(lambda a, b: combine(a, b, row_of_pair, token_N, T, top_k, "cuda"), (h, w))
    x = torch.randn(T, D, generator=gen(8), dtype=torch.float64, requires_grad=True)
    src_token = torch.tensor([4, 0, 0, 2, 4, 4, 1])
    assert torch.autograd.gradcheck(lambda a: permute(a, src_token, "cuda", max_pairs=3), (x,))
    logits = torch.randn(T, E, generator=gen(9), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: topk_softmax(a, K, "cuda", softmax_before_topk=True)[0], (logits,))


@pytest.mark.parametrize("capacity_factor", [None, 0.75])
def test_layer_with_cuda_backend_matches_torch(ops, monkeypatch, capacity_factor):
    monkeypatch.setattr(backend_mod, "cuda_unavailable_reason", lambda device: None)  # CPU tensors on the emulator
    torch.manual_seed(0)
    layer = mr.MoELayer(12, 8, 6, 2, capacity_factor=capacity_factor, num_shared_experts=1)
    x = torch.randn(2, 7, 12, requires_grad=True)
    for ref, got in zip(*backend_results(layer, x, ("torch", "cuda"))):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_binding_checks_name_the_argument(ops):
    x, idx = torch.randn(4, 3), torch.tensor([0, 3])
    cases = [
        (lambda: ops.permute(x, idx.int()), "src_token must be int64"),
        (lambda: ops.permute(x.int(), idx), "x must be float32, float16, bfloat16 or float64"),
        (lambda: ops.permute(x.t(), idx), "x must be contiguous"),
        (lambda: ops.permute(x[0], idx), "x must be 2-D"),
        (lambda: ops.combine(x, torch.ones(4, dtype=torch.float64), torch.arange(4), torch.tensor([0, 4])),
         "weight must be Float for Float data"),
        (lambda: ops.combine(x, None, torch.arange(3), torch.tensor([0, 4])), r"row_of_pair must have shape \[4\]"),
        (lambda: ops.combine(x, None, torch.arange(4), torch.zeros(0, dtype=torch.long)),
         r"token_offsets must be 1-D \[T\+1\]"),
        (lambda: ops.combine_backward(x.double(), x, torch.ones(4), torch.arange(4), torch.arange(4)),
         "grad must have h's dtype"),
        (lambda: ops.sort_by_expert(idx, 0), "num_experts must be >= 1"),
        (lambda: ops.topk_softmax(x, 4, False, False), r"k must be in \[1, E=3\]"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call()


def test_fakes_agree_with_the_kernels(ops):
    """torch.library.opcheck: schema, fake tensors (shapes, dtypes, strides) and AOT tracing, per op."""
    T, E, K, D = 6, 4, 2, 5
    token_N, expert_N = routing(T, E, K, False, seed=11)
    row_of_pair = invert_permutation(sort_by_expert(expert_N, E, "torch")[0])
    h, w = torch.randn(T * K, D), torch.rand(T * K)
    samples = {
        "permute": (torch.randn(T, D), token_N),
        "combine": (h, w, row_of_pair, torch.arange(T + 1) * K),
        "combine_backward": (torch.randn(T, D), h, w, row_of_pair, token_N),
        "sort_by_expert": (expert_N, E),
        "topk_softmax": (torch.randn(T, E, dtype=torch.float64), K, True, False),
    }
    for name, args in samples.items():
        torch.library.opcheck(getattr(ops, name).default, args)
