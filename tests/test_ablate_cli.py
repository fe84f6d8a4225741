"""moe_routing/ablate/cli.py (`moe-ablate`): smoke runs in process and as `python -m moe_routing.ablate` with
their result files, checkpoints and plots, finished runs skipped on a rerun, and bad arguments as clear errors
before anything is written."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from moe_routing.ablate import cli
from moe_routing.ablate.checkpoint import atomic_write_checked_json, read_checked_json
from moe_routing.ablate.config import get_preset
from moe_routing.ablate.registry import ROUTER_BUILDERS, check_router_names

ROOT = Path(__file__).resolve().parents[1]


def _check_outputs(out: Path, routers: list[str], seeds: list[int]) -> dict:
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["router"] for r in rows] == routers
    for r in rows:
        assert int(r["seeds"]) == len(seeds)
        assert 2.0 < float(r["val_loss_mean"]) < 6.0  # byte LM after 20 steps: below ln(256) = 5.55
        assert float(r["tokens_per_s"]) > 0 and int(r["active_params"]) <= int(r["total_params"])
    results = json.loads((out / "results.json").read_text())
    assert [r["router"] for r in results["routers"]] == routers
    md = (out / "results.md").read_text()  # the docs' tables, written by the same run
    assert all(f"| {r} |" in md for r in routers) and results["meta"]["library_digest"] in md
    for png in ("val_loss.png", "val_loss_vs_compute.png", "expert_load.png", "remoe_controller.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for router in routers:
        for seed in seeds:
            with safe_open(str(out / router / f"seed{seed}" / "ckpt.safetensors"), "pt") as f:
                assert json.loads(f.metadata()["run_state"])["step"] == 20
                assert "rng/torch" in f.keys() and any(k.startswith("optim/") for k in f.keys())
    assert not list(out.rglob(".*tmp*"))  # atomic writes leave no temporaries
    for run in results["runs"]:  # expert compute before each evaluation: grows, one value per evaluation
        flops = run["val_compute_curve"]
        assert len(flops) == len(run["val_curve"]) and all(b > a > 0 for a, b in zip(flops, flops[1:]))
    return results


def test_cli_smoke_in_process(tmp_path, capsys):
    out = tmp_path / "run"
    routers = ["dense", "relu"]
    argv = ["--preset", "smoke", "--steps", "20", "--routers", ",".join(routers), "--seeds", "0,1",
            "--out", str(out), "--no-progress"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "val loss" in printed and "relu" in printed
    results = _check_outputs(out, routers, [0, 1])
    relu = [r for r in results["runs"] if r["router"] == "relu"]
    assert all(0.0 <= r["final_sparsity"] <= 1.0 and r["history"][-1]["relu_lambda"] > 0 for r in relu)
    assert len(relu[0]["final_load_LE"]) == 2 and sum(relu[0]["final_load_LE"][0]) == pytest.approx(1.0)
    dense = [r for r in results["runs"] if r["router"] == "dense"][0]
    assert dense["experts_per_token_train_avg"] == 1.0 and dense["final_max_vio"] is None
    # rerunning skips finished runs and reproduces the table
    before = (out / "relu" / "seed0" / "result.json").stat().st_mtime_ns
    assert cli.main(argv) == 0
    assert (out / "relu" / "seed0" / "result.json").stat().st_mtime_ns == before
    assert json.loads((out / "results.json").read_text())["routers"] == results["routers"]


def test_cli_subprocess_module(tmp_path):
    out = tmp_path / "sub"
    proc = subprocess.run([sys.executable, "-m", "moe_routing.ablate", "--preset", "smoke", "--steps", "20",
                           "--routers", "topk", "--seeds", "0", "--out", str(out), "--no-progress"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    results = _check_outputs(out, ["topk"], [0])
    last = results["runs"][0]["history"][-1]
    assert last["step"] == 20 and last["aux/switch_aux"] == pytest.approx(last["aux"], rel=1e-6)
    assert 0.9 * 2e-2 < last["aux"] < 2e-2 * 4  # coeff 1e-2 per layer, 2 layers: 2e-2 when balanced


@pytest.mark.parametrize("argv, message", [
    (["--routers", "topk,nope"], "unknown router(s) ['nope']"),
    (["--experts", "4", "--top-k", "5"], "top_k must be <= num_experts=4, got top_k=5"),
    (["--data", "/no/such/path.txt"], "--data path does not exist: '/no/such/path.txt'"),
    (["--preset", "huge"], "preset must be one of"),
    (["--micro-batch", "3"], "global_batch=4 must be a multiple of micro_batch=3"),
    (["--tokenizer", "/no/tok.json"], "--tokenizer must be 'byte', 'bpe' or a tokenizer.json file"),
    (["--routers", "topk,topk"], "--routers names a router twice"),
    (["--device", "gpu0"], "--device must be a torch device"),
    (["--device", "meta"], "--device must be cpu or cuda[:N], got 'meta'"),
    # an empty value is a mistake, never "the default" (--data "" was every .txt below the current folder)
    (["--data", ""], "--data must not be empty"),
    (["--data", "  "], "--data must not be empty"),
    (["--routers", ""], "--routers must not be empty"),
    (["--routers", " , ,"], "--routers must name at least one of"),
    (["--out", ""], "--out must not be empty"),
    (["--tokenizer", ""], "--tokenizer must not be empty"),
    (["--preset", " "], "--preset must not be empty"),
    (["--device", ""], "--device must not be empty"),
])
def test_bad_arguments_give_clear_errors(tmp_path, capsys, monkeypatch, argv, message):
    (tmp_path / "cwd").mkdir()
    (tmp_path / "cwd" / "notes.txt").write_text("text that must not be trained on\n" * 50)
    monkeypatch.chdir(tmp_path / "cwd")  # what a relative default (runs/..., ".") would reach
    base = ["--preset", "smoke", "--out", str(tmp_path / "x"), "--no-progress"]
    assert cli.main(base + argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert not (tmp_path / "x" / "results.csv").exists() and not (tmp_path / "cwd" / "runs").exists()


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "argument --steps: expected an integer >= 1, got '0'"),
    (["--steps", "True"], "argument --steps: expected an integer >= 1, got 'True'"),
    (["--micro-batch", "-2"], "argument --micro-batch: expected an integer >= 1, got '-2'"),
    (["--experts", "0"], "argument --experts: expected an integer >= 1"),
    (["--top-k", "0"], "argument --top-k: expected an integer >= 1"),
    (["--ckpt-interval", "0"], "argument --ckpt-interval: expected an integer >= 1"),
    (["--eval-interval", "-1"], "argument --eval-interval: expected an integer >= 1"),
    (["--threads", "-1"], "argument --threads: expected an integer >= 0, got '-1'"),
    (["--jobs", "0"], "argument --jobs: expected an integer >= 1, got '0'"),
    (["--jobs", "True"], "argument --jobs: expected an integer >= 1, got 'True'"),
    (["--seeds", ""], "argument --seeds: expected comma-separated integers >= 0"),
    (["--seeds", ","], "argument --seeds: expected comma-separated integers >= 0"),
    (["--seeds", "true"], "argument --seeds: expected comma-separated integers"),
])
def test_bad_counts_are_argument_errors(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--preset", "smoke", "--out", str(tmp_path / "x"), "--no-progress", *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["--preset", "smoke", "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "--device cuda was asked for but torch.cuda.is_available() is False" in capsys.readouterr().err


def test_bad_argument_types(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--seeds", "a,b"])
    assert "comma-separated integers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--seeds", "0,0"])
    assert "distinct" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown router"):
        check_router_names(["topk", "switch"])
    with pytest.raises(ValueError, match="top_k must be <= num_experts"):
        get_preset("smoke", top_k=9)
    assert set(ROUTER_BUILDERS) == {"dense", "topk", "topk_scaled", "relu", "rmoe", "topk+erc", "topk+dpsl",
                                    "blockffn", "mor", "compete", "bilevel"}


def test_describe_prints_settings_and_parameter_counts_without_data(tmp_path, capsys, monkeypatch):
    def no_corpus(*args, **kwargs):
        raise AssertionError("--describe must not read data")

    monkeypatch.setattr(cli, "load_corpus", no_corpus)
    assert cli.main(["--preset", "remoe-182m", "--routers", "dense,topk", "--describe",
                     "--out", str(tmp_path / "x")]) == 0
    out = capsys.readouterr().out
    assert "n_kv_heads: 4" in out and "rope_base: 1000000.0" in out and "padded to 51200" in out
    assert "dense: parameters: total 182.47M, active 182.47M" in out
    assert "topk: parameters: total 777.09M, active 182.55M" in out
    assert not (tmp_path / "x").exists()


def test_big_preset_refuses_the_small_default_corpus(tmp_path, capsys):
    assert cli.main(["--preset", "remoe-182m", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "preset remoe-182m is a recipe for a real corpus" in err and "--data PATH" in err
    assert "--allow-small-data" in err and not (tmp_path / "x").exists()
    # with the corpus allowed, the next thing it asks for is GPT-2's tokenizer
    assert cli.main(["--preset", "remoe-182m", "--allow-small-data", "--out", str(tmp_path / "x")]) == 2
    assert "this preset uses GPT-2's BPE: pass --tokenizer PATH" in capsys.readouterr().err


def test_verify_reruns_a_finished_run_bitwise_and_names_the_first_divergent_step(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert cli.main(["--preset", "smoke", "--routers", "topk", "--seeds", "0", "--steps", "6", "--out", str(out),
                     "--no-progress", "--no-plots"]) == 0
    run_dir = out / "topk" / "seed0"
    capsys.readouterr()
    assert cli.main(["--verify", str(run_dir), "--no-progress"]) == 0
    assert "bitwise identical" in capsys.readouterr().out
    # a recorded loss from step 4 on that the code cannot reproduce: reported as the first divergent step
    result = read_checked_json(run_dir / "result.json", ["train_losses"], "")
    result["train_losses"][3] += 1e-3
    result["final_val_loss"] += 1e-3
    atomic_write_checked_json(run_dir / "result.json", result)
    assert cli.main(["--verify", str(run_dir), "--no-progress"]) == 1
    text = capsys.readouterr().out
    assert "DIFFERS" in text and "first training loss that differs: step 4" in text and "final_val_loss" in text
    assert cli.main(["--verify", str(tmp_path / "nothing")]) == 2
    assert "result.json not found" in capsys.readouterr().err


_TIMING_KEYS = ("tokens_per_s", "train_time_s", "train_cpu_s", "train_cpu_s_mean", "content_sha256")


@pytest.mark.slow  # spawns two worker processes that import torch (~10-20 s)
def test_jobs_train_runs_in_worker_processes_with_the_same_results(tmp_path, capsys):
    argv = ["--preset", "smoke", "--steps", "20", "--routers", "topk,relu", "--seeds", "0,1", "--no-progress",
            "--no-plots"]
    assert cli.main(argv + ["--out", str(tmp_path / "one"), "--jobs", "1"]) == 0
    assert cli.main(argv + ["--out", str(tmp_path / "two"), "--jobs", "2"]) == 0
    assert "4 runs, 2 at a time" in capsys.readouterr().out
    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert [(r["router"], r["seed"]) for r in two["runs"]] == [("topk", 0), ("relu", 0), ("topk", 1), ("relu", 1)]
    strip = lambda r: {k: v for k, v in r.items() if k not in _TIMING_KEYS}  # noqa: E731
    for a, b in zip(one["runs"] + one["routers"], two["runs"] + two["routers"]):
        assert strip(a) == strip(b)  # bitwise: a run's numbers do not depend on where it trained
    assert two["meta"]["jobs"] == 2
