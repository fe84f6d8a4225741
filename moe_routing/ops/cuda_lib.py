"""The CUDA C++ dispatch kernels (``csrc/``) from Python: lazy nvcc build, ctypes load, checked wrappers.

Importing this module builds nothing and needs no CUDA. The first call that needs the library (a wrapper, or
`is_available`) builds ``libmoe_ops.so`` for the current device's arch into the cache (see
``moe_routing.build_cuda``) and loads it with ctypes. Wrappers check device, dtype, contiguity and shapes
(ValueError/TypeError naming the argument) before anything else, pass ``data_ptr()``s and the current CUDA
stream, and have the semantics of the Triton kernels (``kernels/``):

    permute(x_TD, src_token_N)                                   -> x_ND = x_TD[src_token_N]
    combine(h_ND, weight_N | None, row_of_pair_N, token_offsets_T1) -> y_TD[t] = sum_p w[p] * h_ND[row_of_pair_N[p]]
    combine_backward(grad_TD, h_ND, weight_N, row_of_pair_N, token_N) -> (d_h_ND, d_weight_N)
    expert_counts(expert_N, num_experts)                    -> (pair_of_row_N, counts_E, offsets_E1 exclusive)
    sort_by_expert(expert_N, num_experts)                   -> (pair_of_row_N, counts_E, offsets_E1 CSR [E+1])
    topk_softmax(logits_TE, k, softmax_before_topk, normalize) -> (weights_TK, experts_TK)

Data: float32/float16/bfloat16/float64. Weights are passed as float32 (float64 for float64 data) and d_weight
comes back in ``weight_N``'s dtype. Indices: int32 or int64 (converted to int64). With ``MOE_ROUTING_DEBUG=1``
index ranges are checked on the host (a sync) before each launch; otherwise they must be valid.
"""
from __future__ import annotations

import ctypes
import threading
from typing import Optional

import torch

from .. import settings

_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
_INDEX_DTYPES = (torch.int32, torch.int64)

_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_unavailable: Optional[str] = None  # cached reason once a load attempt failed


class CudaLibUnavailable(RuntimeError):
    """The CUDA library cannot be used here; the message says why."""


def _torch_reason() -> Optional[str]:
    if torch.version.cuda is None:
        return "cuda backend needs torch built with CUDA (this torch is CPU-only: torch.version.cuda is None)"
    if not torch.cuda.is_available():
        return "cuda backend needs a CUDA device (torch.cuda.is_available() is False)"
    return None


def _load() -> ctypes.CDLL:
    """Build (if needed) and load the library; raises CudaLibUnavailable with the reason."""
    global _lib, _unavailable
    if _lib is not None:
        return _lib
    with _lock:
        if _lib is not None:
            return _lib
        if _unavailable is not None:
            raise CudaLibUnavailable(_unavailable)
        reason = _torch_reason()
        if reason is not None:  # not cached: CUDA may become visible later in the process
            raise CudaLibUnavailable(reason)
        from .. import build_cuda

        try:
            path = build_cuda.build(build_cuda.device_arch())
            lib = ctypes.CDLL(str(path))
        except build_cuda.BuildError as e:
            _unavailable = f"cuda backend: building the CUDA library failed: {e}"
            raise CudaLibUnavailable(_unavailable) from e
        except OSError as e:
            _unavailable = f"cuda backend: loading the CUDA library failed: {e}"
            raise CudaLibUnavailable(_unavailable) from e
        _lib = declare_abi(lib)
        return lib


def declare_abi(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Set the ctypes signatures of the ``csrc/moe_ops.h`` functions on ``lib`` (also used for the CPU
    emulator's build of the same sources in tests)."""
    i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    signatures = {
        "moe_permute_fwd": [ptr, ptr, ptr, i64, i64, i32, ptr],
        "moe_combine_fwd": [ptr, ptr, ptr, ptr, ptr, i64, i64, i32, ptr],
        "moe_combine_bwd": [ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i32, ptr],
        "moe_expert_counts": [ptr, i64, i64, ptr, ptr, ptr, ptr, ptr],
        "moe_topk_softmax_fwd": [ptr, ptr, ptr, i64, i64, i64, i32, i32, i32, ptr],
    }
    for name, argtypes in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, ctypes.c_int
    lib.moe_expert_counts_workspace.argtypes = [i64, i64]
    lib.moe_expert_counts_workspace.restype = i64
    return lib


def is_available() -> tuple[bool, str]:
    """(True, "loaded <path>") when the library is built and loaded, else (False, why). Builds lazily
    (nvcc, once per source/arch) on a CUDA machine; never raises."""
    try:
        lib = _load()
    except CudaLibUnavailable as e:
        return False, str(e)
    return True, f"loaded {lib._name}"


def require() -> ctypes.CDLL:
    """The loaded library, or CudaLibUnavailable saying why not."""
    return _load()


# ---- argument checks ----------------------------------------------------------------------------------------
def _tensor(name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _on_device(name: str, t: torch.Tensor, device: Optional[torch.device]) -> torch.device:
    if t.device.type != "cuda":
        raise ValueError(f"{name} must be a CUDA tensor for the cuda backend, got device {t.device} "
                         "(use backend='torch' for CPU tensors)")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other inputs are on {device}")
    return t.device


def _data(name: str, t, ndim: int, device: Optional[torch.device] = None) -> torch.Tensor:
    t = _tensor(name, t)
    if t.dtype not in _DTYPE_CODE:
        raise TypeError(f"{name} must be float32/float16/bfloat16/float64, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    _on_device(name, t, device)
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous())")
    return t


def _index(name: str, t, n: int, upper: int, device: torch.device) -> torch.Tensor:
    t = _tensor(name, t)
    if t.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{name} must be an int32/int64 tensor, got {t.dtype}")
    if t.shape != (n,):
        raise ValueError(f"{name} must have shape [{n}], got {tuple(t.shape)}")
    _on_device(name, t, device)
    t = t.to(torch.int64).contiguous()
    if settings.debug_checks() and n > 0:
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= upper:
            raise ValueError(f"{name} has values in [{lo}, {hi}], outside [0, {upper})")
    return t


def _weight(name: str, t, n: int, data_dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    t = _tensor(name, t)
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    if t.shape != (n,):
        raise ValueError(f"{name} must have shape [{n}], got {tuple(t.shape)}")
    _on_device(name, t, device)
    want = torch.float64 if data_dtype == torch.float64 else torch.float32
    return t.to(want).contiguous()


def _check(fn: str, status: int) -> None:
    if status != 0:
        raise RuntimeError(f"{fn} failed with cudaError {status}")


def _stream(device: torch.device) -> ctypes.c_void_p:
    return ctypes.c_void_p(torch.cuda.current_stream(device).cuda_stream)


# ---- wrappers -----------------------------------------------------------------------------------------------
def permute(x_TD: torch.Tensor, src_token_N: torch.Tensor) -> torch.Tensor:
    """``x_ND[n] = x_TD[src_token_N[n]]`` for contiguous CUDA ``x_TD`` [T, D]."""
    x_TD = _data("x_TD", x_TD, 2)
    dev = x_TD.device
    src_token_N = _tensor("src_token_N", src_token_N)
    if src_token_N.dim() != 1:
        raise ValueError(f"src_token_N must be 1-D, got shape {tuple(src_token_N.shape)}")
    src_token_N = _index("src_token_N", src_token_N, src_token_N.shape[0], x_TD.shape[0], dev)
    N, D = src_token_N.shape[0], x_TD.shape[1]
    out = x_TD.new_empty(N, D)
    if N == 0 or D == 0:
        return out
    lib = require()
    with torch.cuda.device(dev):
        _check("moe_permute_fwd", lib.moe_permute_fwd(x_TD.data_ptr(), src_token_N.data_ptr(), out.data_ptr(), N, D,
                                                      _DTYPE_CODE[x_TD.dtype], _stream(dev)))
    return out


def combine(h_ND: torch.Tensor, weight_N: Optional[torch.Tensor], row_of_pair_N: torch.Tensor,
            token_offsets_T1: torch.Tensor, max_pairs: Optional[int] = None) -> torch.Tensor:
    """``y[t] = sum_{p in offsets[t]:offsets[t+1]} w[p] * h_ND[row_of_pair_N[p]]`` (w = 1 when ``weight_N`` is None).

    Token-major and atomic-free (deterministic); accumulates in float32 (float64 for float64 data); ``y`` has
    ``h_ND``'s dtype. ``max_pairs`` is accepted for signature parity with the Triton kernel and unused.
    """
    del max_pairs
    h_ND = _data("h_ND", h_ND, 2)
    dev = h_ND.device
    N, D = h_ND.shape
    offs = _tensor("token_offsets_T1", token_offsets_T1)
    if offs.dim() != 1 or offs.shape[0] < 1:
        raise ValueError(f"token_offsets_T1 must be 1-D [T+1] (T >= 0), got shape {tuple(offs.shape)}")
    T = offs.shape[0] - 1
    offs = _index("token_offsets_T1", offs, T + 1, N + 1, dev)
    row_of_pair_N = _index("row_of_pair_N", row_of_pair_N, N, N, dev)
    w = None if weight_N is None else _weight("weight_N", weight_N, N, h_ND.dtype, dev)
    y = h_ND.new_empty(T, D)
    if T == 0 or D == 0:
        return y
    lib = require()
    with torch.cuda.device(dev):
        _check("moe_combine_fwd", lib.moe_combine_fwd(
            h_ND.data_ptr(), None if w is None else w.data_ptr(), row_of_pair_N.data_ptr(), offs.data_ptr(),
            y.data_ptr(), T, D, _DTYPE_CODE[h_ND.dtype], _stream(dev)))
    return y


def combine_backward(grad_TD: torch.Tensor, h_ND: torch.Tensor, weight_N: torch.Tensor, row_of_pair_N: torch.Tensor,
                     token_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of `combine`: ``d_h[row[p]] = w[p] * dy[token[p]]``, ``d_w[p] = <dy[token[p]], h[row[p]]>``.

    ``grad_TD`` must have ``h_ND``'s dtype; ``d_h`` has ``h_ND``'s dtype and ``d_w`` ``weight_N``'s.
    """
    h_ND = _data("h_ND", h_ND, 2)
    dev = h_ND.device
    grad_TD = _data("grad_TD", grad_TD, 2, dev)
    N, D = h_ND.shape
    if grad_TD.dtype != h_ND.dtype:
        raise TypeError(f"grad_TD must have h_ND's dtype {h_ND.dtype}, got {grad_TD.dtype}")
    if grad_TD.shape[1] != D:
        raise ValueError(f"grad_TD must be [T, {D}] (h_ND's width), got {tuple(grad_TD.shape)}")
    w = _weight("weight_N", weight_N, N, h_ND.dtype, dev)
    row_of_pair_N = _index("row_of_pair_N", row_of_pair_N, N, N, dev)
    token_N = _index("token_N", token_N, N, grad_TD.shape[0], dev)
    d_h = torch.empty_like(h_ND)
    d_w = torch.empty_like(w)
    if N > 0:
        lib = require()
        with torch.cuda.device(dev):
            _check("moe_combine_bwd", lib.moe_combine_bwd(
                grad_TD.data_ptr(), h_ND.data_ptr(), w.data_ptr(), row_of_pair_N.data_ptr(), token_N.data_ptr(),
                d_h.data_ptr(), d_w.data_ptr(), N, D, _DTYPE_CODE[h_ND.dtype], _stream(dev)))
    return d_h, d_w.to(weight_N.dtype)


def _num_experts(num_experts) -> int:
    if isinstance(num_experts, bool) or not isinstance(num_experts, int):
        raise TypeError(f"num_experts must be an int, got {type(num_experts).__name__}")
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    return num_experts


def expert_counts(expert_N: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pair_of_row_N int64, counts_E int64, offsets_E1 int64) for int32/int64 CUDA ``expert_N`` [N]: pairs per
    expert, exclusive offsets (``offsets_E1[0] = 0``, ``offsets_E1[E] = N``) and the stable expert-sorted order
    (``pair_of_row_N[offsets_E1[e] + r]`` is the r-th pair of expert e). Atomic-free and deterministic."""
    E = _num_experts(num_experts)
    expert_N = _tensor("expert_N", expert_N)
    if expert_N.dtype not in _INDEX_DTYPES:
        raise TypeError(f"expert_N must be an int32/int64 tensor, got {expert_N.dtype}")
    if expert_N.dim() != 1:
        raise ValueError(f"expert_N must be 1-D [N], got shape {tuple(expert_N.shape)}")
    dev = _on_device("expert_N", expert_N, None)
    N = expert_N.shape[0]
    expert_N = _index("expert_N", expert_N, N, E, dev)
    counts = torch.empty(E, dtype=torch.int64, device=dev)
    offsets = torch.empty(E + 1, dtype=torch.int64, device=dev)
    order = torch.empty(N, dtype=torch.int64, device=dev)
    lib = require()
    work = torch.empty(max(int(lib.moe_expert_counts_workspace(N, E)), 0), dtype=torch.uint8, device=dev)
    with torch.cuda.device(dev):
        _check("moe_expert_counts", lib.moe_expert_counts(
            expert_N.data_ptr() if N else None, N, E, counts.data_ptr(), offsets.data_ptr(),
            order.data_ptr() if N else None, work.data_ptr() if work.numel() else None, _stream(dev)))
    return order, counts, offsets


def sort_by_expert(expert_N: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`moe_routing.ops.counts.sort_by_expert`'s contract: (pair_of_row_N, counts_E, offsets_E1 CSR [E+1])."""
    return expert_counts(expert_N, num_experts)


def topk_softmax(logits_TE: torch.Tensor, k: int, softmax_before_topk: bool = False,
                 normalize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights_TK float32 (float64 for float64 logits), experts_TK int64) for contiguous CUDA ``logits_TE``
    [T, E]: the semantics of `moe_routing.ops.topk_softmax` (ties to the lowest id, NaN first, ids always in
    [0, E))."""
    logits_TE = _data("logits_TE", logits_TE, 2)
    dev = logits_TE.device
    T, E = logits_TE.shape
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= E:
        raise ValueError(f"k must be in [1, E={E}], got {k}")
    acc = torch.float64 if logits_TE.dtype == torch.float64 else torch.float32
    weights = torch.empty(T, k, dtype=acc, device=dev)
    experts = torch.empty(T, k, dtype=torch.int64, device=dev)
    if T == 0:
        return weights, experts
    lib = require()
    with torch.cuda.device(dev):
        _check("moe_topk_softmax_fwd", lib.moe_topk_softmax_fwd(
            logits_TE.data_ptr(), weights.data_ptr(), experts.data_ptr(), T, E, k, int(bool(softmax_before_topk)),
            int(bool(normalize)), _DTYPE_CODE[logits_TE.dtype], _stream(dev)))
    return weights, experts
