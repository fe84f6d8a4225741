"""moe_routing/ablate/checkpoint.py (through train_run): damaged checkpoints and result files are refused with
an error that names them and the way out, and deleting them retrains or rebuilds the run; files written before
checksums existed are read with a warning; a checkpoint or result of another run is refused."""
import json
import re
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from moe_routing.ablate.checkpoint import (CHECKSUM_KEY, JSON_CHECKSUM_KEY, DamagedFileError, read_checkpoint,
                                          restore_checkpoint, save_checkpoint)
from moe_routing.ablate.config import get_preset
from moe_routing.ablate.registry import ROUTER_BUILDERS, build_model
from moe_routing.ablate.train import CKPT_NAME, train_run

from helpers import ablate_data, recorded_steps


@pytest.fixture(scope="module")
def data():
    return ablate_data()


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
    with recorded_steps() as steps:
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
    with recorded_steps() as steps:
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
    with recorded_steps() as steps:
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


@pytest.mark.parametrize("router", sorted(ROUTER_BUILDERS))
def test_every_ablation_router_checkpoints_and_restores(tmp_path, router):
    """Every row of moe-ablate saves its whole state (router step counters and controllers included) as tensors
    and restores it into a fresh model: a router whose extra state is not a tensor would fail the first save."""
    p = get_preset("smoke")
    model = build_model(p, router, 0, 256)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.add_(0.5)  # differ from a fresh model's initial state
    for m in model.modules():
        if hasattr(m, "steps") and isinstance(m.steps, int):
            m.steps = 7
    optimizer = torch.optim.AdamW(model.parameters())
    save_checkpoint(tmp_path / CKPT_NAME, model, optimizer, 3, {"step": 3})
    fresh = build_model(p, router, 0, 256)
    restore_checkpoint(read_checkpoint(tmp_path / CKPT_NAME), fresh, torch.optim.AdamW(fresh.parameters()))
    saved, restored = model.state_dict(), fresh.state_dict()
    assert saved.keys() == restored.keys()
    for k in saved:
        assert torch.equal(torch.as_tensor(saved[k]), torch.as_tensor(restored[k])), k
