"""moe_routing/ablate/train.py: micro-batches accumulate to the global batch (aux scale, controller statistics),
and a run interrupted (in-process, or by kill -9) and resumed logs bitwise the same losses as an uninterrupted
run; finished runs are skipped; a changed corpus or configuration is refused. Damaged checkpoint and result
files: test_ablate_checkpoint.py; one process per output folder: test_ablate_lock.py."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import moe_routing as mr
from moe_routing.ablate import data as data_mod
from moe_routing.ablate.config import get_preset
from moe_routing.ablate.registry import build_model
from moe_routing.ablate.train import CKPT_NAME, Data, train_run

from helpers import ablate_data, recorded_steps

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data():
    return ablate_data()


def test_micro_batches_accumulate_to_the_global_batch(tmp_path):
    """Dense model: 2 micro-batches of 2 give the same update as one batch of 4 (same windows)."""
    from moe_routing.ablate.train import Data, train_run

    tokens = torch.randint(0, 256, (5000,), generator=torch.Generator().manual_seed(0))
    data = Data(tokens, tokens, data_mod.val_batches(tokens, 1, 4, 32), 256, "byte")
    p = get_preset("smoke", steps=3)
    one = train_run(p, "dense", 0, data, tmp_path / "one", progress=False)
    two = train_run(p.replace(micro_batch=2), "dense", 0, data, tmp_path / "two", progress=False)
    assert one["train_losses"] == pytest.approx(two["train_losses"], rel=1e-5)
    assert one["final_val_loss"] == pytest.approx(two["final_val_loss"], rel=1e-5)


@pytest.mark.parametrize("router", ["topk", "relu"])
def test_micro_batch_aux_scale_and_controller_statistics(router):
    """Two micro-batches with the trainer's scaling (main loss / 2, aux scale 1/2) accumulate the gradient of
    mean_i (CE_i + aux_i); the ReLU controller's counts cover both micro-batches before the step."""
    import torch.nn.functional as F

    p = get_preset("smoke")
    x = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1))
    y = torch.roll(x, -1, 1)

    def grads(model, parts, scale):
        mr.set_aux_loss_scale(model, scale)
        model.zero_grad()
        for rows in parts:
            with mr.routing_context(model):
                logits = model(x[rows])
            (F.cross_entropy(logits.flatten(0, 1), y[rows].flatten()) * scale).backward()
        return {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}

    model = build_model(p, router, 0, 256).double()
    accumulated = grads(model, [slice(0, 2), slice(2, 4)], 0.5)
    if router == "relu":
        routers = [m.router for _, m in mr.moe_layers(model)]
        assert all(r.count_accum.item() == 4 * 16 * p.num_experts for r in routers)  # both micro-batches
    separate = [grads(build_model(p, router, 0, 256).double(), [rows], 1.0) for rows in (slice(0, 2), slice(2, 4))]
    assert set(accumulated) == set(separate[0])
    for name, g in accumulated.items():
        torch.testing.assert_close(g, (separate[0][name] + separate[1][name]) / 2, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("router", ["relu", "topk", "rmoe", "topk+erc"])
def test_resume_is_bitwise_equal(tmp_path, data, router):
    p = get_preset("smoke", steps=12, ckpt_interval=100, eval_interval=4)
    straight = train_run(p, router, 3, data, tmp_path / "straight", progress=False)
    assert train_run(p, router, 3, data, tmp_path / "split", progress=False, stop_at=6) is None
    assert not (tmp_path / "split" / "result.json").exists()
    with recorded_steps() as steps:
        resumed = train_run(p, router, 3, data, tmp_path / "split", progress=False)
    assert steps == list(range(6, 12))  # really resumed: a retrain from scratch would give equal losses too
    assert len(straight["train_losses"]) == 12
    assert resumed["train_losses"] == straight["train_losses"]  # exact float equality, every step
    assert resumed["val_curve"] == straight["val_curve"]
    assert resumed["final_val_loss"] == straight["final_val_loss"]
    assert resumed["history"] == straight["history"]  # incl. ReMoE's lambda and sparsity
    assert resumed["experts_per_token_train_avg"] == straight["experts_per_token_train_avg"]
    # a finished run is read back, not retrained
    again = train_run(p, router, 3, data, tmp_path / "split", progress=False)
    assert again["train_losses"] == straight["train_losses"]


def test_crash_resumes_from_the_last_periodic_checkpoint(tmp_path, data):
    """A crash at step 7 with checkpoints every 4 steps: the rerun restarts at step 4 (state rolled back to the
    checkpoint, including RNG and optimizer) and still logs the uninterrupted run's losses bitwise."""
    p = get_preset("smoke", steps=10, ckpt_interval=4, eval_interval=5)
    straight = train_run(p, "relu", 1, data, tmp_path / "straight", progress=False)
    with pytest.raises(KeyboardInterrupt), recorded_steps(crash_at=7) as steps:
        train_run(p, "relu", 1, data, tmp_path / "crashed", progress=False)
    assert steps == list(range(7))
    with recorded_steps() as steps:
        resumed = train_run(p, "relu", 1, data, tmp_path / "crashed", progress=False)
    assert steps == list(range(4, 10))
    assert resumed["train_losses"] == straight["train_losses"]
    assert resumed["history"] == straight["history"]
    assert resumed["final_val_loss"] == straight["final_val_loss"]


def test_other_corpus_is_refused(tmp_path, data):
    p = get_preset("smoke", steps=6)
    train_run(p, "topk", 0, data, tmp_path, progress=False, stop_at=3)
    other = Data(data.train_N.flip(0), data.val_N, data.val_batches, data.vocab_size, data.tokenizer)
    with pytest.raises(ValueError, match=r"different settings \(data_digest\)"):
        train_run(p, "topk", 0, other, tmp_path, progress=False)


def test_changed_settings_are_refused(tmp_path, data):
    p = get_preset("smoke", steps=6)
    train_run(p, "topk", 0, data, tmp_path, progress=False, stop_at=3)
    with pytest.raises(ValueError, match=r"different settings \(lr\)"):
        train_run(p.replace(lr=1e-2), "topk", 0, data, tmp_path, progress=False)
    train_run(p, "topk", 0, data, tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"different settings \(steps\)"):
        train_run(p.replace(steps=7), "topk", 0, data, tmp_path, progress=False)


@pytest.mark.slow  # ~12 s: three interpreter start-ups
def test_kill_9_then_rerun_resumes(tmp_path):
    """SIGKILL mid-run, rerun the same command: the run resumes from its checkpoint and the logged losses equal
    an uninterrupted run's; no temporary or torn result files are left."""
    def cmd(out):
        return [sys.executable, "-m", "moe_routing.ablate", "--preset", "smoke", "--steps", "60", "--routers",
                "relu", "--seeds", "0", "--ckpt-interval", "5", "--out", str(out), "--no-progress", "--no-plots"]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd(tmp_path / "killed"), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "killed" / "relu" / "seed0" / CKPT_NAME
    deadline = time.time() + 90
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    if not ckpt.exists():
        pytest.skip("the run finished or never checkpointed before the kill (machine too slow or too fast)")
    assert not (tmp_path / "killed" / "results.json").exists()
    subprocess.run(cmd(tmp_path / "killed"), cwd=ROOT, env=env, check=True, capture_output=True, timeout=120)
    subprocess.run(cmd(tmp_path / "straight"), cwd=ROOT, env=env, check=True, capture_output=True, timeout=120)
    killed = json.loads((tmp_path / "killed" / "relu" / "seed0" / "result.json").read_text())
    straight = json.loads((tmp_path / "straight" / "relu" / "seed0" / "result.json").read_text())
    assert killed["train_losses"] == straight["train_losses"]
    assert killed["final_val_loss"] == straight["final_val_loss"]
    results = json.loads((tmp_path / "killed" / "results.json").read_text())
    assert results["routers"][0]["router"] == "relu"
    assert not list((tmp_path / "killed").rglob(".*tmp*"))
