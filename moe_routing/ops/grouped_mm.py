"""Grouped expert matmul: ``out[rows of e] = x[rows of e] @ w[e]`` for contiguous per-expert row blocks.

Two implementations: `torch._grouped_mm` wrapped in our own custom op (its own fake demands bf16, and its
backward needs a contiguous incoming gradient), and a loop over experts on contiguous slices using ``unbind``
(indexing ``w[e]`` in a loop makes the backward O(E^2)). The loop covers what ``_grouped_mm`` cannot: float64,
sizes whose strides are not 16-byte aligned, devices without support, and torch releases without
``torch._grouped_mm`` (a private op of recent releases; "auto" then always loops). The loop reads ``counts_E``
on the host (``tolist``, a sync on accelerators) inside its custom op, so a compiled graph does not break
there; the ``_grouped_mm`` path reads nothing.

N = 0 rows (every pair dropped, or a ReLU router that selects nothing) works in both: zero-row outputs that
stay connected to ``w`` so its gradient is a zero tensor rather than None.
"""
# No `from __future__ import annotations` here: torch < 2.5 builds custom-op schemas from evaluated annotations.
import torch
from torch import Tensor

IMPLS = ("auto", "grouped_mm", "loop")


# The private ops take `torch._grouped_mm`'s int32 end offsets ``ends_E`` (= ``offsets_E1[1:]``).
@torch.library.custom_op("moe_routing::grouped_mm", mutates_args=())
def _grouped_mm_op(x_ND: Tensor, w_EDF: Tensor, ends_E: Tensor) -> Tensor:
    if x_ND.shape[0] == 0:  # _grouped_mm rejects some zero-row operands (its backward's dy [0, F] with w^T)
        return x_ND.new_zeros(0, w_EDF.shape[2])
    return torch._grouped_mm(x_ND, w_EDF, offs=ends_E)


@_grouped_mm_op.register_fake
def _(x_ND, w_EDF, ends_E):
    return x_ND.new_empty(x_ND.shape[0], w_EDF.shape[2])


@torch.library.custom_op("moe_routing::grouped_mm_weight_grad", mutates_args=())
def _weight_grad_op(x_ND: Tensor, dy_NF: Tensor, ends_E: Tensor) -> Tensor:
    if x_ND.shape[0] == 0:  # no rows: every expert's weight gradient is zero ("Invalid strides" otherwise)
        return x_ND.new_zeros(ends_E.shape[0], x_ND.shape[1], dy_NF.shape[1])
    return torch._grouped_mm(x_ND.t(), dy_NF, offs=ends_E)


@_weight_grad_op.register_fake
def _(x_ND, dy_NF, ends_E):
    return x_ND.new_empty(ends_E.shape[0], x_ND.shape[1], dy_NF.shape[1])


def _setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, dy_NF: Tensor):
    x_ND, w_EDF, ends_E = ctx.saved_tensors
    dy_NF = dy_NF.contiguous()
    dx = _grouped_mm_op(dy_NF, w_EDF.transpose(1, 2), ends_E) if ctx.needs_input_grad[0] else None
    dw = _weight_grad_op(x_ND, dy_NF, ends_E) if ctx.needs_input_grad[1] else None
    return dx, dw, None


_grouped_mm_op.register_autograd(_backward, setup_context=_setup)


def grouped_mm_available(device: torch.device) -> bool:
    """Whether this torch has `torch._grouped_mm` with a kernel for ``device``'s type."""
    return hasattr(torch, "_grouped_mm") and _has_kernel(device.type)


# A constant for the compiler: the dispatcher query below would otherwise break the graph every forward.
@torch.compiler.assume_constant_result
def _has_kernel(device_type: str) -> bool:
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    query = getattr(torch._C, "_dispatch_has_computed_kernel_for_dispatch_key", None)
    if key is None or query is None:
        return key is not None
    return bool(query("aten::_grouped_mm", key))


def grouped_mm_supported(x_ND: Tensor, w_EDF: Tensor) -> bool:
    """Whether `torch._grouped_mm` exists here and accepts these operands (dtype, device, 16-byte aligned
    strides)."""
    if not grouped_mm_available(x_ND.device):
        return False
    if x_ND.dtype != w_EDF.dtype or x_ND.dtype not in (torch.float32, torch.bfloat16):
        return False
    if x_ND.device.type == "cuda":
        if x_ND.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x_ND.device)[0] < 9:
            return False
    elif x_ND.device.type != "cpu":
        return False
    item = x_ND.element_size()
    return (w_EDF.shape[1] * item) % 16 == 0 and (w_EDF.shape[2] * item) % 16 == 0


def _loop_mm(x_ND: Tensor, w_EDF: Tensor, counts_E: Tensor) -> Tensor:
    sizes = counts_E.tolist()
    outs = [x_n @ w_e for x_n, w_e, n in zip(x_ND.split(sizes), w_EDF.unbind(0), sizes) if n > 0]
    if not outs:  # N = 0
        return x_ND.new_zeros(0, w_EDF.shape[2])
    return torch.cat(outs) if len(outs) > 1 else outs[0]


# The loop as custom ops too: its host read of the counts then happens inside an op the compiler does not
# trace, so a compiled layer keeps one graph instead of breaking at the read (a graph break between the
# router's losses and the experts made inductor's backward fail).
@torch.library.custom_op("moe_routing::loop_mm", mutates_args=())
def _loop_mm_op(x_ND: Tensor, w_EDF: Tensor, counts_E: Tensor) -> Tensor:
    return _loop_mm(x_ND, w_EDF, counts_E)


@_loop_mm_op.register_fake
def _(x_ND, w_EDF, counts_E):
    return x_ND.new_empty(x_ND.shape[0], w_EDF.shape[2])


@torch.library.custom_op("moe_routing::loop_mm_weight_grad", mutates_args=())
def _loop_weight_grad_op(x_ND: Tensor, dy_NF: Tensor, counts_E: Tensor) -> Tensor:
    sizes = counts_E.tolist()  # an expert without rows gets x[0 rows]^T @ dy[0 rows] = zeros
    return torch.stack([x_n.t() @ dy_n for x_n, dy_n in zip(x_ND.split(sizes), dy_NF.split(sizes))])


@_loop_weight_grad_op.register_fake
def _(x_ND, dy_NF, counts_E):
    return x_ND.new_empty(counts_E.shape[0], x_ND.shape[1], dy_NF.shape[1])


def _loop_backward(ctx, dy_NF: Tensor):
    x_ND, w_EDF, counts_E = ctx.saved_tensors
    dx = _loop_mm_op(dy_NF, w_EDF.transpose(1, 2), counts_E) if ctx.needs_input_grad[0] else None
    dw = _loop_weight_grad_op(x_ND, dy_NF, counts_E) if ctx.needs_input_grad[1] else None
    return dx, dw, None


_loop_mm_op.register_autograd(_loop_backward, setup_context=_setup)


def check_impl(impl: str) -> str:
    """``impl`` if it names an implementation this torch can run, else ValueError saying why."""
    if impl not in IMPLS:
        raise ValueError(f"expert_impl must be one of {IMPLS}, got {impl!r}")
    if impl == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
        raise ValueError(f"expert_impl='grouped_mm' needs torch._grouped_mm, which torch {torch.__version__} does "
                         "not have; use expert_impl='auto' (falls back to the loop) or 'loop'")
    return impl


def grouped_mm(x_ND: Tensor, w_EDF: Tensor, counts_E: Tensor, offsets_E1: Tensor, impl: str = "auto") -> Tensor:
    """``x_ND`` [N, D] rows grouped by expert times ``w_EDF`` [E, D, F] -> [N, F].

    Expert e's rows are ``offsets_E1[e]:offsets_E1[e+1]`` (CSR offsets [E+1], as `sort_by_expert` returns;
    ``counts_E`` [E] their sizes). ``impl``: "auto" (`torch._grouped_mm` where `grouped_mm_supported`, else the
    loop), "grouped_mm" or "loop".
    """
    check_impl(impl)
    use_grouped = grouped_mm_supported(x_ND, w_EDF) if impl == "auto" else impl == "grouped_mm"
    if use_grouped:
        if not grouped_mm_available(x_ND.device):
            raise ValueError(f"expert_impl='grouped_mm' needs torch._grouped_mm for {x_ND.device.type} tensors, "
                             f"which torch {torch.__version__} does not have; use expert_impl='auto' (falls back "
                             "to the loop) or 'loop'")
        if not grouped_mm_supported(x_ND, w_EDF):
            raise ValueError("expert_impl='grouped_mm' needs float32/bfloat16 operands of one dtype whose "
                             "hidden sizes are multiples of 16 bytes (CPU, or bf16 on sm90+); use 'auto' or 'loop'")
        return _grouped_mm_op(x_ND.contiguous(), w_EDF, offsets_E1[1:].to(torch.int32))
    return _loop_mm_op(x_ND, w_EDF, counts_E)
