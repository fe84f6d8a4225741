"""The CUDA extension ``moe_routing._C`` (csrc/, built by setup.py) from Python: loading, fake implementations for
torch.compile, and the checked wrappers the ops call for ``backend="cuda"``.

    permute(x_TD, src_token_N)                                        -> x_ND = x_TD[src_token_N]
    combine(h_ND, weight_N | None, row_of_pair_N, token_offsets_T1)   -> y_TD[t] = sum_p w[p] h_ND[row_of_pair_N[p]]
    combine_backward(grad_TD, h_ND, weight_N, row_of_pair_N, token_N) -> (d_h_ND, d_weight_N)
    sort_by_expert(expert_N, num_experts)                             -> (pair_of_row_N, counts_E, offsets_E1)
    topk_softmax(logits_TE, k, softmax_before_topk, normalize)        -> (weights_TK, experts_TK)

Each wrapper checks device, dtype, contiguity and shapes on the host before anything runs (ValueError/TypeError
naming the argument), converts int32 indices to int64 and weights to float32 (float64 for float64 data), then calls
``torch.ops.moe_routing_cuda.<op>``; its C++ side (csrc/torch_binding.cpp) checks again with TORCH_CHECK and
launches on the current CUDA stream of the inputs' device. With ``MOE_ROUTING_DEBUG=1`` index ranges are checked
too (a sync). Importing this module loads nothing; the first wrapper call, `load` or `is_available` loads the
extension (once: the one piece of module state here) and registers the fakes.
"""
from __future__ import annotations

import importlib.util
import threading
from typing import Optional

import torch

from .. import settings

NAMESPACE = "moe_routing_cuda"
OPS = ("permute", "combine", "combine_backward", "sort_by_expert", "topk_softmax")
EXTENSION = "moe_routing._C"
BUILD_HINT = ("build it with `MOE_ROUTING_BUILD_CUDA=1 pip install -e . --no-build-isolation` (needs nvcc and a "
              "CUDA build of torch; see csrc/README.md)")
DEVICE_TYPE = "cuda"  # the device the extension's kernels run on (tests substitute the CPU emulator's)

_DATA_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_INDEX_DTYPES = (torch.int32, torch.int64)

_lock = threading.Lock()
_loaded = False


class CudaExtensionUnavailable(RuntimeError):
    """The CUDA extension cannot be used here; the message says why and how to build it."""


def extension_path() -> Optional[str]:
    """Path of the built extension (``moe_routing/_C*.so``), or None when it is not built."""
    spec = importlib.util.find_spec(EXTENSION)
    return spec.origin if spec is not None else None


def ops_registered() -> bool:
    """Whether every ``torch.ops.moe_routing_cuda`` op is defined in this process."""
    try:
        for name in OPS:
            getattr(getattr(torch.ops, NAMESPACE), name)
    except (AttributeError, RuntimeError):
        return False
    return True


def load() -> None:
    """Load the extension (once) and register the fake implementations; raises CudaExtensionUnavailable."""
    global _loaded
    if _loaded:
        return
    with _lock:
        if _loaded:
            return
        if not ops_registered():
            path = extension_path()
            if path is None:
                raise CudaExtensionUnavailable(f"the CUDA extension {EXTENSION} is not built: {BUILD_HINT}")
            try:
                torch.ops.load_library(path)
            except OSError as e:
                raise CudaExtensionUnavailable(f"loading the CUDA extension {path} failed ({e}); rebuild it for "
                                               f"this torch: {BUILD_HINT}") from e
        register_fakes()
        _loaded = True


def is_available() -> tuple[bool, str]:
    """(True, "loaded ...") when ``backend="cuda"`` can run here, else (False, why and how to fix it)."""
    not_built = "" if extension_path() is not None or ops_registered() else \
        f"; and the CUDA extension {EXTENSION} is not built: {BUILD_HINT}"
    if torch.version.cuda is None:
        return False, f"it needs torch built with CUDA (this torch is CPU-only){not_built}"
    if not torch.cuda.is_available():
        return False, f"it needs a CUDA device (torch.cuda.is_available() is False){not_built}"
    try:
        load()
    except CudaExtensionUnavailable as e:
        return False, str(e)
    return True, f"loaded {extension_path() or 'the ' + NAMESPACE + ' ops'}"


def require() -> None:
    """Load the extension or raise CudaExtensionUnavailable saying why (and how to build it)."""
    ok, reason = is_available()
    if not ok:
        raise CudaExtensionUnavailable(f"cuda backend is unavailable: {reason}")


# ---- fake implementations: output shapes and dtypes for torch.compile / FakeTensor tracing ----------------------
def _fake_permute(x, src_token):
    return x.new_empty(src_token.shape[0], x.shape[1])


def _fake_combine(h, weight, row_of_pair, token_offsets):
    return h.new_empty(token_offsets.shape[0] - 1, h.shape[1])


def _fake_combine_backward(grad, h, weight, row_of_pair, token):
    return torch.empty_like(h), torch.empty_like(weight)


def _fake_sort_by_expert(expert, num_experts):
    return expert.new_empty(expert.shape[0]), expert.new_empty(num_experts), expert.new_empty(num_experts + 1)


def _fake_topk_softmax(logits, k, softmax_before_topk, normalize):
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return logits.new_empty(logits.shape[0], k, dtype=acc), logits.new_empty(logits.shape[0], k, dtype=torch.int64)


_FAKES = {"permute": _fake_permute, "combine": _fake_combine, "combine_backward": _fake_combine_backward,
          "sort_by_expert": _fake_sort_by_expert, "topk_softmax": _fake_topk_softmax}


def register_fakes() -> None:
    """Register the fakes for the ops (defined by the loaded extension); `load` calls this once."""
    for name in OPS:
        torch.library.register_fake(f"{NAMESPACE}::{name}", _FAKES[name])


def _op(name: str):
    load()
    return getattr(getattr(torch.ops, NAMESPACE), name)


# ---- host-side argument checks ----------------------------------------------------------------------------------
def _tensor(name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _on_device(name: str, t: torch.Tensor, device: Optional[torch.device]) -> torch.device:
    if t.device.type != DEVICE_TYPE:
        raise ValueError(f"{name} must be a CUDA tensor for the cuda backend, got device {t.device} "
                         "(use backend='torch' for CPU tensors)")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other inputs are on {device}")
    return t.device


def _data(name: str, t, ndim: int, device: Optional[torch.device] = None) -> torch.Tensor:
    t = _tensor(name, t)
    if t.dtype not in _DATA_DTYPES:
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
    return t.to(torch.float64 if data_dtype == torch.float64 else torch.float32).contiguous()


# ---- wrappers ---------------------------------------------------------------------------------------------------
def permute(x_TD: torch.Tensor, src_token_N: torch.Tensor) -> torch.Tensor:
    """``x_ND[n] = x_TD[src_token_N[n]]`` for contiguous CUDA ``x_TD`` [T, D]."""
    x_TD = _data("x_TD", x_TD, 2)
    src_token_N = _tensor("src_token_N", src_token_N)
    if src_token_N.dim() != 1:
        raise ValueError(f"src_token_N must be 1-D, got shape {tuple(src_token_N.shape)}")
    src_token_N = _index("src_token_N", src_token_N, src_token_N.shape[0], x_TD.shape[0], x_TD.device)
    return _op("permute")(x_TD, src_token_N)


def combine(h_ND: torch.Tensor, weight_N: Optional[torch.Tensor], row_of_pair_N: torch.Tensor,
            token_offsets_T1: torch.Tensor, max_pairs: Optional[int] = None) -> torch.Tensor:
    """``y[t] = sum_{p in token_offsets_T1[t]:token_offsets_T1[t+1]} w[p] * h_ND[row_of_pair_N[p]]`` (w = 1 when
    ``weight_N`` is None). Token-major and atomic-free (deterministic); accumulates in float32 (float64 for
    float64 data); ``y`` has ``h_ND``'s dtype. ``max_pairs`` (the Triton kernel's loop bound) is not needed."""
    del max_pairs
    h_ND = _data("h_ND", h_ND, 2)
    dev = h_ND.device
    N = h_ND.shape[0]
    offs = _tensor("token_offsets_T1", token_offsets_T1)
    if offs.dim() != 1 or offs.shape[0] < 1:
        raise ValueError(f"token_offsets_T1 must be 1-D [T+1] (T >= 0), got shape {tuple(offs.shape)}")
    offs = _index("token_offsets_T1", offs, offs.shape[0], N + 1, dev)
    row_of_pair_N = _index("row_of_pair_N", row_of_pair_N, N, N, dev)
    w = None if weight_N is None else _weight("weight_N", weight_N, N, h_ND.dtype, dev)
    return _op("combine")(h_ND, w, row_of_pair_N, offs)


def combine_backward(grad_TD: torch.Tensor, h_ND: torch.Tensor, weight_N: torch.Tensor, row_of_pair_N: torch.Tensor,
                     token_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of `combine`: ``d_h[row_of_pair_N[p]] = w[p] * dy[token_N[p]]``,
    ``d_w[p] = <dy[token_N[p]], h[row_of_pair_N[p]]>``. ``grad_TD`` must have ``h_ND``'s dtype; ``d_h`` has
    ``h_ND``'s dtype and ``d_w`` ``weight_N``'s."""
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
    d_h, d_w = _op("combine_backward")(grad_TD, h_ND, w, row_of_pair_N, token_N)
    return d_h, d_w.to(weight_N.dtype)


def sort_by_expert(expert_N: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`moe_routing.ops.sort_by_expert`'s contract for int32/int64 CUDA ``expert_N`` [N]: (pair_of_row_N,
    counts_E, offsets_E1), all int64; atomic-free and deterministic."""
    if isinstance(num_experts, bool) or not isinstance(num_experts, int):
        raise TypeError(f"num_experts must be an int, got {type(num_experts).__name__}")
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    expert_N = _tensor("expert_N", expert_N)
    if expert_N.dtype not in _INDEX_DTYPES:
        raise TypeError(f"expert_N must be an int32/int64 tensor, got {expert_N.dtype}")
    if expert_N.dim() != 1:
        raise ValueError(f"expert_N must be 1-D [N], got shape {tuple(expert_N.shape)}")
    dev = _on_device("expert_N", expert_N, None)
    expert_N = _index("expert_N", expert_N, expert_N.shape[0], num_experts, dev)
    return tuple(_op("sort_by_expert")(expert_N, num_experts))


def topk_softmax(logits_TE: torch.Tensor, k: int, softmax_before_topk: bool = False,
                 normalize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights_TK float32 (float64 for float64 logits), experts_TK int64) for contiguous CUDA ``logits_TE``
    [T, E]: the semantics of `moe_routing.ops.topk_softmax` (ties to the lowest id, NaN first, ids in [0, E))."""
    logits_TE = _data("logits_TE", logits_TE, 2)
    E = logits_TE.shape[1]
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= E:
        raise ValueError(f"k must be in [1, E={E}], got {k}")
    return tuple(_op("topk_softmax")(logits_TE, k, bool(softmax_before_topk), bool(normalize)))
