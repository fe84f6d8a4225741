"""`examples/rl_replay.py` in its smoke configuration: R2/R3 replay removes the routing mismatch it measures."""
import importlib.util
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_demo(monkeypatch):
    spec = importlib.util.spec_from_file_location("rl_replay", ROOT / "examples" / "rl_replay.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "rl_replay", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_rl_replay_smoke_replays_exactly_and_prints_finite_numbers(tmp_path, capsys, monkeypatch):
    demo = load_demo(monkeypatch)
    out = tmp_path / "results.md"
    results = demo.main(["--smoke", "--out", str(out)])
    rows = [(phase, r) for phase in ("r3", "r2") for r in results[phase]]
    assert [p for p, _ in rows].count("r3") == demo.SMOKE["rl_batches"]
    assert any(p == "r2" for p, _ in rows)  # at least one update after an optimizer step
    for phase, row in rows:
        for arm in ("native", "replay"):
            m = row[arm]
            values = [*m["per_layer"], m["any_layer"], m["k3"], m["grad_norm"]]
            assert all(math.isfinite(v) for v in values), (phase, arm, m)
            assert all(0.0 <= v <= 1.0 for v in [*m["per_layer"], m["any_layer"]]) and m["k3"] >= 0.0
        # replay reproduces the reference routing exactly: zero mismatch in every layer
        assert row["replay"]["per_layer"] == [0.0] * len(row["replay"]["per_layer"]) and \
            row["replay"]["any_layer"] == 0.0, (phase, row["replay"])
    printed = capsys.readouterr().out
    assert "R3" in printed and "R2" in printed and "k3" in printed and "|grad|" in printed
    assert "| R3 |" in out.read_text() and "| R2 |" in out.read_text()
