"""moe_routing/ablate/parallel.py and distributed_train.py: the ablation model on 2 gloo processes (CPU) - FSDP2
for the non-expert parameters, expert parallelism for the experts on a (dp, ep) mesh - against single-process
training on the same global batch.

Tolerance: float32 sums reassociated (the two ranks' gradients averaged by reduce-scatter instead of accumulated
in one process, the all-to-all's expert rows in another order) differ by a few float32 ulps (~1e-7 relative)
per step; AdamW divides by sqrt(v), which keeps that relative error, so after 5 steps at lr <= 3e-3 parameters
agree to ~1e-6 absolute. We allow 2e-5 absolute / 1e-4 relative on parameters and 1e-5 relative on losses:
far below any real error (a missing 1/W on expert gradients changes parameters by ~1e-3).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moe_routing.ablate.checkpoint import read_checkpoint
from moe_routing.ablate.config import get_preset
from moe_routing.ablate.train import CKPT_NAME, train_run

from helpers import ablate_data, run_gloo_workers

STEPS = 5


def _preset(world: int):
    # micro_batch = global / world: the single process accumulates exactly the micro-batches the ranks run
    return get_preset("smoke", steps=STEPS).replace(micro_batch=4 // world, eval_interval=STEPS)


def _worker(rank, world, router, ep, out, resume):
    from moe_routing.ablate.parallel import init_parallel

    par = init_parallel(ep, torch.device("cpu"))
    p = _preset(world)
    if resume:  # interrupted after 3 steps (checkpoint written), then resumed to the end
        assert train_run(p, router, 0, ablate_data(), Path(out) / "resumed", progress=False, stop_at=3,
                         parallel=par) is None
        train_run(p, router, 0, ablate_data(), Path(out) / "resumed", progress=False, parallel=par)
    result = train_run(p, router, 0, ablate_data(), Path(out) / "run", progress=False, parallel=par)
    assert result["world_size"] == world and result["expert_parallel"] == ep


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in read_checkpoint(run_dir / CKPT_NAME).tensors.items() if not k.startswith("rng/")}


def _check_against_single_process(tmp_path, router, ep, resume=False):
    run_gloo_workers(_worker, 2, router, ep, str(tmp_path / "par"), resume)
    single = train_run(_preset(2), router, 0, ablate_data(), tmp_path / "single", progress=False)
    par = train_run(_preset(2), router, 0, ablate_data(), tmp_path / "par" / "run", progress=False)  # read back
    assert len(par["train_losses"]) == STEPS
    assert par["train_losses"] == pytest.approx(single["train_losses"], rel=1e-5)
    assert par["final_val_loss"] == pytest.approx(single["final_val_loss"], rel=1e-5)
    want, got = _weights(tmp_path / "single"), _weights(tmp_path / "par" / "run")
    assert sorted(got) == sorted(want)  # the single-process checkpoint layout: full tensors, plain expert keys
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=2e-5, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}")
    if resume:  # resumed at the same world size: bitwise the uninterrupted multi-process run
        resumed = _weights(tmp_path / "par" / "resumed")
        for k in want:
            assert torch.equal(resumed[k], got[k]), k


def test_fsdp2_with_expert_parallel_matches_single_process(tmp_path):
    """dp=1 x ep=2: attention, norms, embeddings and routers FSDP2-sharded over both ranks, experts 2 per rank."""
    _check_against_single_process(tmp_path, "topk", ep=2)


@pytest.mark.slow
@pytest.mark.parametrize("router,ep", [("topk", 1), ("relu", 2), ("relu", 1), ("rmoe", 2)])
def test_fsdp2_matches_single_process(tmp_path, router, ep):
    """ep=1: pure FSDP2 data parallel, experts replicated (gradients all-reduced over dp); relu: ReMoE's lambda
    controller with statistics summed over both ranks; rmoe: the GRU shared by all layers (root FSDP unit)."""
    _check_against_single_process(tmp_path, router, ep)


@pytest.mark.slow
def test_multi_process_resume_is_bitwise_the_uninterrupted_run(tmp_path):
    _check_against_single_process(tmp_path, "topk", ep=2, resume=True)


_CRASH_WRAPPER = '''
import os, sys
import moe_routing.ablate.distributed_train as dt
real = dt.get_batch
def get_batch(tokens_N, batch, seq_len, seed, step):
    if step == int(os.environ["CRASH_AT_STEP"]) and os.environ["RANK"] == "1":
        raise RuntimeError("simulated failure on rank 1")
    return real(tokens_N, batch, seq_len, seed, step)
dt.get_batch = get_batch
from moe_routing.ablate.cli import main
sys.exit(main())
'''


def _torchrun(tmp_path: Path, args: list[str], crash_at: int = -1):
    import os
    import subprocess
    import sys

    wrapper = tmp_path / "crash_wrapper.py"
    wrapper.write_text(_CRASH_WRAPPER)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "CRASH_AT_STEP": str(crash_at), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--max-restarts", "0",
           str(wrapper), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_torchrun_cli_crash_then_resume(tmp_path):
    """``torchrun --nproc-per-node 2 -m moe_routing.ablate --ep 2``: a rank that raises at step 3 ends the whole
    run with its error (no hang, no result); rerunning resumes from the step-2 checkpoint on both ranks and
    finishes like a single process with micro-batches of the ranks' rows."""
    import json

    from moe_routing.ablate.cli import main

    text = tmp_path / "corpus.txt"
    g = torch.Generator().manual_seed(0)
    text.write_text("".join(chr(32 + int(c)) for c in torch.randint(0, 90, (40_000,), generator=g)))
    args = ["--preset", "smoke", "--steps", "4", "--routers", "topk", "--seeds", "0", "--ckpt-interval", "2",
            "--data", str(text), "--no-plots", "--no-progress"]
    out = tmp_path / "par"
    crashed = _torchrun(tmp_path, [*args, "--ep", "2", "--out", str(out)], crash_at=3)
    assert crashed.returncode != 0
    assert "simulated failure on rank 1" in crashed.stderr
    run_dir = out / "topk" / "seed0"
    assert read_checkpoint(run_dir / CKPT_NAME).run_state["step"] == 2 and not (run_dir / "result.json").exists()
    resumed = _torchrun(tmp_path, [*args, "--ep", "2", "--out", str(out)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("results:") == 1  # rank 0 alone reports
    assert main([*args, "--micro-batch", "2", "--out", str(tmp_path / "single")]) == 0
    got = json.loads((run_dir / "result.json").read_text())
    want = json.loads((tmp_path / "single" / "topk" / "seed0" / "result.json").read_text())
    assert got["train_losses"] == pytest.approx(want["train_losses"], rel=1e-5)
    assert got["final_val_loss"] == pytest.approx(want["final_val_loss"], rel=1e-5)
