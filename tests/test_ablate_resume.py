"""moe-ablate checkpoints: a run interrupted (in-process, or by kill -9) and resumed logs bitwise the same
losses as an uninterrupted run; finished runs are skipped; a changed configuration is refused; damaged
checkpoints and result files are refused with an error that names them and the way out; one process per
output folder."""
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from moe_routing.ablate.checkpoint import CHECKSUM_KEY, JSON_CHECKSUM_KEY, DamagedFileError
from moe_routing.ablate import cli
from moe_routing.ablate.config import get_preset
from moe_routing.ablate.data import val_batches
import moe_routing.ablate.train as train_module
from moe_routing.ablate.lock import LOCK_NAME, FolderInUseError, folder_lock
from moe_routing.ablate.train import CKPT_NAME, Data, train_run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (20_000,), generator=g)
    return Data(tokens[:16_000], tokens[16_000:], val_batches(tokens[16_000:], 2, 4, 32), 256, "byte")


@pytest.mark.parametrize("router", ["relu", "topk", "rmoe", "topk+erc"])
def test_resume_is_bitwise_equal(tmp_path, data, router):
    p = get_preset("smoke", steps=12, ckpt_interval=100, eval_interval=4)
    straight = train_run(p, router, 3, data, tmp_path / "straight", progress=False)
    assert train_run(p, router, 3, data, tmp_path / "split", progress=False, stop_at=6) is None
    assert not (tmp_path / "split" / "result.json").exists()
    with _recorded_steps() as steps:
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


@contextlib.contextmanager
def _recorded_steps(crash_at=None):
    """Record the step of every training batch drawn; raise (a crash without a final save) at ``crash_at``."""
    steps = []
    real = train_module.get_batch

    def spy(tokens_N, batch, seq_len, seed, step):
        if step == crash_at:
            raise KeyboardInterrupt("simulated crash")
        steps.append(step)
        return real(tokens_N, batch, seq_len, seed, step)

    train_module.get_batch = spy
    try:
        yield steps
    finally:
        train_module.get_batch = real


def test_crash_resumes_from_the_last_periodic_checkpoint(tmp_path, data):
    """A crash at step 7 with checkpoints every 4 steps: the rerun restarts at step 4 (state rolled back to the
    checkpoint, including RNG and optimizer) and still logs the uninterrupted run's losses bitwise."""
    p = get_preset("smoke", steps=10, ckpt_interval=4, eval_interval=5)
    straight = train_run(p, "relu", 1, data, tmp_path / "straight", progress=False)
    with pytest.raises(KeyboardInterrupt), _recorded_steps(crash_at=7) as steps:
        train_run(p, "relu", 1, data, tmp_path / "crashed", progress=False)
    assert steps == list(range(7))
    with _recorded_steps() as steps:
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


def _flip_tensor_bytes(path):
    """Invert bytes across the tensor data (after the 8-byte header length and the JSON header)."""
    raw = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little")
    for i in range(start + 64, len(raw), 997):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


def _rewrite_metadata(path, change):
    with safe_open(str(path), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
    path.write_bytes(st_save(tensors, metadata=change(meta)))


DAMAGES = {
    "flipped tensor bytes": _flip_tensor_bytes,
    "truncated": lambda f: f.write_bytes(f.read_bytes()[:f.stat().st_size // 2]),
    "empty": lambda f: f.write_bytes(b""),
    "a folder": lambda f: (f.unlink(), f.mkdir()),
    "another safetensors file": lambda f: f.write_bytes(st_save({"w": torch.ones(3)})),
    "garbled metadata": lambda f: _rewrite_metadata(f, lambda m: {**m, "run_state": m["run_state"][:-9]}),
    "an edited loss in the run state": lambda f: _rewrite_metadata(f, lambda m: {
        **m, "run_state": re.sub(r'"train_losses": \[[0-9]', '"train_losses": [9', m["run_state"])}),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_checkpoint_is_refused_with_the_way_out(tmp_path, data, damage):
    """Never resumed from, never a bare traceback: the error names the file and says to delete it; doing so
    retrains the run from step 0."""
    p = get_preset("smoke", steps=6)
    train_run(p, "topk", 0, data, tmp_path, progress=False, stop_at=3)
    ckpt = tmp_path / CKPT_NAME
    DAMAGES[damage](ckpt)
    with pytest.raises(DamagedFileError) as info:
        train_run(p, "topk", 0, data, tmp_path, progress=False)
    assert str(ckpt) in str(info.value) and ("delete it" in str(info.value) or "remove it" in str(info.value))
    ckpt.rmdir() if ckpt.is_dir() else ckpt.unlink()
    with _recorded_steps() as steps:
        train_run(p, "topk", 0, data, tmp_path, progress=False)
    assert steps == list(range(6))


def test_checkpoint_without_checksum_resumes_with_a_warning(tmp_path, data, capsys):
    """Checkpoints written before checksums existed still resume (bitwise), with a warning that they are
    unverified."""
    p = get_preset("smoke", steps=8, eval_interval=4)
    straight = train_run(p, "relu", 0, data, tmp_path / "straight", progress=False)
    train_run(p, "relu", 0, data, tmp_path / "old", progress=False, stop_at=4)
    _rewrite_metadata(tmp_path / "old" / CKPT_NAME, lambda m: {k: v for k, v in m.items() if k != CHECKSUM_KEY})
    capsys.readouterr()
    with _recorded_steps() as steps:
        resumed = train_run(p, "relu", 0, data, tmp_path / "old", progress=False)
    assert steps == list(range(4, 8))
    assert "has no checksum" in capsys.readouterr().err
    assert resumed["train_losses"] == straight["train_losses"]
    assert resumed["final_val_loss"] == straight["final_val_loss"]


def test_checkpoint_of_another_run_is_refused(tmp_path, data):
    p = get_preset("smoke", steps=6)
    train_run(p, "topk", 1, data, tmp_path / "seed1", progress=False, stop_at=3)
    (tmp_path / "seed0").mkdir()
    shutil.copy(tmp_path / "seed1" / CKPT_NAME, tmp_path / "seed0" / CKPT_NAME)
    with pytest.raises(ValueError, match=r"ckpt\.safetensors belongs to a run with different settings \(seed\)"):
        train_run(p, "topk", 0, data, tmp_path / "seed0", progress=False)


RESULT_DAMAGES = {
    "empty": lambda f: f.write_bytes(b""),
    "truncated": lambda f: f.write_bytes(f.read_bytes()[:f.stat().st_size // 2]),
    "binary": lambda f: f.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe" * 10),
    "another JSON object": lambda f: f.write_text('{"meta": {"preset": "quick"}, "routers": []}'),
    "a JSON list": lambda f: f.write_text("[1, 2, 3]"),
    "an edited number": lambda f: f.write_text(re.sub(r'"final_val_loss": [0-9.]+', '"final_val_loss": 1.5',
                                                      f.read_text())),
}


@pytest.mark.parametrize("damage", list(RESULT_DAMAGES))
def test_damaged_result_is_refused_and_rebuilt_from_the_checkpoint(tmp_path, data, damage):
    p = get_preset("smoke", steps=6)
    first = train_run(p, "topk", 0, data, tmp_path, progress=False)
    result = tmp_path / "result.json"
    RESULT_DAMAGES[damage](result)
    with pytest.raises(DamagedFileError) as info:
        train_run(p, "topk", 0, data, tmp_path, progress=False)
    assert str(result) in str(info.value) and "delete it" in str(info.value)
    result.unlink()
    with _recorded_steps() as steps:
        again = train_run(p, "topk", 0, data, tmp_path, progress=False)
    assert steps == [] and again == first  # rebuilt from the final checkpoint, nothing retrained


def test_result_of_another_run_is_refused(tmp_path, data):
    p = get_preset("smoke", steps=6)
    train_run(p, "topk", 1, data, tmp_path / "seed1", progress=False)
    (tmp_path / "seed0").mkdir()
    shutil.copy(tmp_path / "seed1" / "result.json", tmp_path / "seed0" / "result.json")
    with pytest.raises(ValueError, match=r"result\.json belongs to a run with different settings \(seed\)"):
        train_run(p, "topk", 0, data, tmp_path / "seed0", progress=False)


def test_result_without_checksum_is_read_with_a_warning(tmp_path, data, capsys):
    p = get_preset("smoke", steps=6)
    first = train_run(p, "topk", 0, data, tmp_path, progress=False)
    result = tmp_path / "result.json"
    content = json.loads(result.read_text())
    del content[JSON_CHECKSUM_KEY]
    result.write_text(json.dumps(content))
    capsys.readouterr()
    assert train_run(p, "topk", 0, data, tmp_path, progress=False) == first
    assert "has no checksum" in capsys.readouterr().err


def test_folder_lock_refuses_a_second_holder(tmp_path, data):
    """flock conflicts between two opens of the lock file even in one process, so this needs no subprocess."""
    with folder_lock(tmp_path / "run") as lock_file:
        assert lock_file.read_text() == str(os.getpid())
        with pytest.raises(FolderInUseError, match=rf"{re.escape(str(tmp_path / 'run'))} is in use by another "
                                                   rf"moe-ablate process \(pid {os.getpid()}"):
            with folder_lock(tmp_path / "run"):
                pass
        with pytest.raises(FolderInUseError, match="run folder"):
            train_run(get_preset("smoke", steps=2), "topk", 0, data, tmp_path / "run", progress=False)
    with folder_lock(tmp_path / "run"):  # released on exit
        pass
    assert train_run(get_preset("smoke", steps=2), "topk", 0, data, tmp_path / "run", progress=False)


def test_second_process_on_the_same_out_fails_at_once_and_a_killed_holder_leaves_no_stale_lock(tmp_path, capsys):
    """A second moe-ablate on a busy --out stops before touching it (the first one's in-flight temporaries
    survive) and names the folder and the holder's pid; after the holder is killed with SIGKILL the lock file is
    left behind but the next run goes ahead."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(f"word{i % 97} line{i % 13}" for i in range(4000)))
    out = tmp_path / "out"

    def argv(router, steps):
        return ["--preset", "smoke", "--data", str(corpus), "--routers", router, "--seeds", "0", "--steps",
                str(steps), "--ckpt-interval", "5", "--out", str(out), "--no-progress", "--no-plots"]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "holder.err", "wb") as err:
        holder = subprocess.Popen([sys.executable, "-m", "moe_routing.ablate", *argv("relu", 10**9)], cwd=ROOT,
                                  env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        lock_file, deadline = out / LOCK_NAME, time.time() + 1800  # generous: the machine may be loaded
        while holder.poll() is None and time.time() < deadline and not (out / "relu" / "seed0" / CKPT_NAME).exists():
            time.sleep(0.1)  # the holder is training
        assert holder.poll() is None, (tmp_path / "holder.err").read_text()
        in_flight = out / ".results.json.tmp12345"  # what a writer's temporary looks like
        in_flight.write_text("being written")
        assert cli.main(argv("topk", 20)) == 2
        err = capsys.readouterr().err
        assert f"--out folder {out} is in use by another moe-ablate process (pid {holder.pid}" in err
        assert lock_file.read_text() == str(holder.pid)
        assert in_flight.exists() and not (out / "topk").exists()
    finally:
        holder.kill()
        holder.wait(timeout=1800)
    assert lock_file.exists()
    assert cli.main(argv("topk", 20)) == 0
    assert (out / "results.csv").exists() and not in_flight.exists()  # no live writer: a stale temporary now
