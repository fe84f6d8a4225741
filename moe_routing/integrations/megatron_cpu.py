"""Megatron-Core's MoE layer on a CPU-only machine over gloo: for tests and CPU benchmarks, not for training.

megatron-core assumes CUDA in a few places its MoE layer reaches (read in megatron/core/transformer/moe/ of
megatron-core 0.16.1 and 0.19.2, where they are the same); `cpu_device` and `cpu_streams` point them at the CPU,
and undo it on exit:

- `cpu_device`: ``torch.cuda.current_device`` returns the CPU device (mcore places router weights and buffers
  with it), and ``moe_utils.te_general_gemm`` is None, so ``router_gating_linear`` takes its ``torch.mm`` path
  (0.16.1 names the symbol only when Transformer Engine imports).
- `cpu_streams`, for the all-to-all dispatcher only: its device-to-host side stream (``torch.cuda.Stream``,
  ``current_stream``, ``stream``) becomes a no-op, and ``maybe_move_tensor_to_cpu(as_numpy=True)``, which
  converts only CUDA tensors, converts the CPU split sizes as it would CUDA ones (gloo's ``all_to_all_single``
  takes lists, not tensors, as split sizes).

`cpu_process_group` starts a gloo group (``file://`` rendezvous) with mcore's model-parallel state on top.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist


class _NoStream:
    """Stands for ``torch.cuda.Stream``: waits and events do nothing (CPU work is synchronous)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None: ...

    def wait_stream(self, other: Any) -> None: ...

    def record_event(self) -> Any:
        return type("Event", (), {"synchronize": lambda self: None})()


def _move_to_cpu(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
    """``maybe_move_tensor_to_cpu`` for tensors already on the CPU: the numpy conversion only."""
    return tensor.numpy() if as_numpy and torch.is_tensor(tensor) else tensor


@contextlib.contextmanager
def _patched(*patches: tuple[Any, str, Any]) -> Iterator[None]:
    """Set ``obj.name = value`` for each ``(obj, name, value)``; restore (or delete) on exit."""
    missing = object()
    saved = [(obj, name, getattr(obj, name, missing)) for obj, name, _ in patches]
    try:
        for obj, name, value in patches:
            setattr(obj, name, value)
        yield
    finally:
        for obj, name, old in reversed(saved):
            if old is missing:
                delattr(obj, name)
            else:
                setattr(obj, name, old)


@contextlib.contextmanager
def cpu_device() -> Iterator[None]:
    """mcore's router and buffers on the CPU (see the module docstring)."""
    import megatron.core.transformer.moe.moe_utils as moe_utils

    with _patched((torch.cuda, "current_device", lambda: torch.device("cpu")),
                  (moe_utils, "te_general_gemm", None)):
        yield


@contextlib.contextmanager
def cpu_streams() -> Iterator[None]:
    """The all-to-all dispatcher's CUDA side stream as no-ops, its split sizes as numpy (see the module docstring)."""
    import megatron.core.transformer.moe.token_dispatcher as td

    with _patched((torch.cuda, "Stream", _NoStream), (torch.cuda, "current_stream", lambda *a, **k: _NoStream()),
                  (torch.cuda, "stream", lambda stream: contextlib.nullcontext()),
                  (td.MoEAlltoAllTokenDispatcher, "cuda_dtoh_stream", None),
                  (td, "maybe_move_tensor_to_cpu", _move_to_cpu)):
        yield


@contextlib.contextmanager
def cpu_process_group(rank: int = 0, world_size: int = 1, init_file: Optional[str] = None,
                      **model_parallel: Any) -> Iterator[Any]:
    """A gloo process group (``file://`` rendezvous at ``init_file``; a temporary file when None, world size 1
    only) with mcore's model-parallel state (``model_parallel``: keyword arguments of
    ``parallel_state.initialize_model_parallel``, e.g. ``expert_model_parallel_size=2``). Yields mcore's
    ``ProcessGroupCollection``; destroys both on exit."""
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection

    if dist.is_initialized():
        raise RuntimeError("a torch.distributed process group is already initialised in this process")
    if init_file is None and world_size != 1:
        raise ValueError(f"init_file is needed for world_size={world_size} (every rank must name the same file)")
    with contextlib.ExitStack() as stack:
        if init_file is None:
            init_file = os.path.join(stack.enter_context(tempfile.TemporaryDirectory()), "rdzv")
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
        try:
            parallel_state.initialize_model_parallel(**model_parallel)
            try:
                yield ProcessGroupCollection.use_mpu_process_groups()
            finally:
                parallel_state.destroy_model_parallel()
        finally:
            dist.destroy_process_group()


__all__ = ["cpu_device", "cpu_streams", "cpu_process_group"]
