"""moe_routing.integrations.megatron_cpu: megatron-core's CUDA assumptions pointed at the CPU, and undone on exit."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("megatron.core", reason="megatron-core is not installed (optional extra 'megatron')")

from megatron.core.transformer.moe import moe_utils, token_dispatcher  # noqa: E402

from moe_routing.integrations.megatron_cpu import cpu_device, cpu_process_group, cpu_streams  # noqa: E402


def test_patches_apply_inside_and_are_undone_on_exit():
    cuda_before = {name: getattr(torch.cuda, name) for name in ("current_device", "Stream", "current_stream", "stream")}
    move_before = token_dispatcher.maybe_move_tensor_to_cpu
    had_gemm = hasattr(moe_utils, "te_general_gemm")
    with cpu_device(), cpu_streams():
        assert torch.cuda.current_device() == torch.device("cpu")
        assert moe_utils.te_general_gemm is None
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        stream.record_event().synchronize()
        with torch.cuda.stream(stream):
            splits = token_dispatcher.maybe_move_tensor_to_cpu(torch.tensor([2, 3]), as_numpy=True)
        assert splits.tolist() == [2, 3] and not torch.is_tensor(splits)
        kept = torch.ones(2)
        assert token_dispatcher.maybe_move_tensor_to_cpu(kept) is kept
    assert {name: getattr(torch.cuda, name) for name in cuda_before} == cuda_before
    assert token_dispatcher.maybe_move_tensor_to_cpu is move_before
    assert hasattr(moe_utils, "te_general_gemm") == had_gemm


def test_process_group_is_torn_down_and_checks_its_arguments():
    if dist.is_initialized():
        pytest.skip("a torch.distributed process group is already initialised in this process")
    from megatron.core import parallel_state

    with cpu_process_group() as pg:
        assert dist.get_world_size() == 1 and pg.ep.size() == 1
        assert parallel_state.model_parallel_is_initialized()
        with pytest.raises(RuntimeError, match="already initialised"):
            with cpu_process_group():
                pass
    assert not dist.is_initialized() and not parallel_state.model_parallel_is_initialized()
    with pytest.raises(ValueError, match="init_file"):
        with cpu_process_group(rank=0, world_size=2):
            pass
