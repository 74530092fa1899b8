"""hxtrain.data: tokenizers (bytes, a trained BPE, a trained SentencePiece model), prepared shards, the held-out
split by document, the shard source across shard boundaries, exact resume, process sharding, and the CLI."""

import json
from pathlib import Path

import grain
import numpy as np
import pytest

from hxtrain.data import corpus, loader, shards, tokenizer

TEXT = "the quick brown fox jumps over the lazy dog; héllo wörld ☃ ünïcode\n"


def _docs(folder: Path, n: int = 24, seed: int = 0) -> Path:
    """n small text files of different lengths (some in a subfolder), with a few non-ASCII characters."""
    rng = np.random.default_rng(seed)
    (folder / "sub").mkdir(parents=True, exist_ok=True)
    words = TEXT.split() + ["alpha", "beta", "gamma", "delta", "def", "return", "(x)", "\n"]
    for i in range(n):
        body = " ".join(rng.choice(words, size=int(rng.integers(20, 200))))
        (folder / ("sub" if i % 3 == 0 else "") / f"doc{i:02d}.txt").write_text(f"doc {i}: {body}\n")
    return folder


@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> Path:
    return _docs(tmp_path_factory.mktemp("docs"))


@pytest.fixture(scope="module")
def bpe(tmp_path_factory, docs) -> tokenizer.HFTokenizer:
    path = tokenizer.train_bpe(corpus.documents(docs)[1], 300, tmp_path_factory.mktemp("bpe"))
    return tokenizer.load(path)


def _stream(tok, docs: Path, split: str, fraction: float) -> np.ndarray:
    """What a split's shards must hold: its documents in sorted order, each encoded and followed by EOS."""
    root, files, _ = corpus.documents(docs)
    ids = []
    for f in files:
        if corpus.split_of(root, f, fraction) == split:
            ids += tok.encode(f.read_text()) + [tok.eos_id]
    return np.array(ids)


def _read(folder: Path, split: str) -> np.ndarray:
    index = json.loads((folder / "index.json").read_text())
    arrays = [np.load(folder / s["file"]) for s in index["splits"][split]["shards"]]
    return np.concatenate(arrays) if arrays else np.zeros(0, np.int64)


# ---- tokenizers ---------------------------------------------------------------------------------------------


def test_byte_tokenizer_round_trips_and_uses_nul_as_eos(tmp_path):
    tok = tokenizer.load("byte")
    assert isinstance(tokenizer.load(None), tokenizer.ByteTokenizer)
    assert (tok.vocab_size, tok.eos_id) == (256, 0)
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert tok.encode_bytes(b"\xff\x00a").tolist() == [255, 0, 97]  # raw bytes, even when not UTF-8
    assert tok.decode([0xff]) == "\ufffd"
    tok.save(tmp_path)
    assert isinstance(tokenizer.for_run(tmp_path), tokenizer.ByteTokenizer)


def test_trained_bpe_round_trips_and_travels_with_a_folder(bpe, tmp_path):
    assert 257 <= bpe.vocab_size <= 300 and bpe.eos_id == bpe._tok.token_to_id("<|endoftext|>")
    ids = bpe.encode(TEXT)
    assert len(ids) < len(TEXT.encode()) and bpe.decode(ids) == TEXT
    assert bpe.decode(bpe.encode("unseen: ∑ 日本語 \t tabs")) == "unseen: ∑ 日本語 \t tabs"  # byte-level: anything
    assert bpe.save(tmp_path) == tmp_path / "tokenizer.json"
    again = tokenizer.for_run(tmp_path)
    assert (again.name, again.vocab_size, again.encode(TEXT)) == (bpe.name, bpe.vocab_size, ids)


def test_sentencepiece_model_trained_here_round_trips(tmp_path):
    import sentencepiece as spm  # a dependency of hxtrain: never skipped
    text = tmp_path / "t.txt"
    text.write_text("\n".join(f"the quick brown fox {i} jumps over the lazy dog {i * 7}" for i in range(300)))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "sp"), vocab_size=60,
                                   minloglevel=2)
    tok = tokenizer.load(tmp_path / "sp.model")
    assert tok.vocab_size == 60 and tok.eos_id == 2  # sentencepiece's default </s>
    assert tok.decode(tok.encode("the lazy fox 42")) == "the lazy fox 42"
    tok.save(tmp_path / "run")
    assert tokenizer.for_run(tmp_path / "run").name == tok.name
    assert tokenizer.load(tmp_path / "run").encode("dog") == tok.encode("dog")  # a folder holding tokenizer.model


def test_tokenizer_errors_are_one_line_and_name_the_fix(tmp_path):
    with pytest.raises(tokenizer.TokenizerError, match=r"^--tokenizer: 'x' does not exist; give a tokenizer\.json, "
                                                        r"a SentencePiece \.model, or 'byte'$"):
        tokenizer.load("x")
    (tmp_path / "bad.json").write_bytes(b"\x00\xffgarbage{")
    (tmp_path / "bad2.json").write_text('{"version": "1.0", "model": 3}')
    (tmp_path / "bad.model").write_bytes(np.random.default_rng(0).bytes(200))
    (tmp_path / "vocab.txt").write_text("a\nb\n")
    for name, what in [("bad.json", "tokenizer.json"), ("bad2.json", "tokenizer.json"),
                       ("bad.model", "SentencePiece model")]:
        with pytest.raises(tokenizer.TokenizerError, match=rf"^--tokenizer: '.*{name}' is not a readable {what}"):
            tokenizer.load(tmp_path / name)
    with pytest.raises(tokenizer.TokenizerError, match=r"has suffix '\.txt'; give a tokenizer\.json"):
        tokenizer.load(tmp_path / "vocab.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(tokenizer.TokenizerError, match="holds neither tokenizer.json nor tokenizer.model"):
        tokenizer.load(tmp_path / "empty")
    with pytest.raises(tokenizer.TokenizerError, match=r"^--vocab: a byte-level BPE needs at least 257 tokens"):
        tokenizer.train_bpe([tmp_path / "vocab.txt"], 100, tmp_path / "t")


def test_a_tokenizer_without_an_end_of_document_token_is_refused(tmp_path):
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]")).save(str(tmp_path / "t.json"))
    with pytest.raises(tokenizer.TokenizerError, match=r"has no end-of-document token \(looked for </s>, "
                                                        r"<\|endoftext\|>, <eos>\)"):
        tokenizer.load(tmp_path / "t.json")


def test_check_vocab_names_the_flag_and_the_fix(bpe):
    tokenizer.check_vocab(bpe, 300)
    with pytest.raises(tokenizer.TokenizerError, match=rf"^--tokenizer: the tokenizer has {bpe.vocab_size} tokens "
                                                        rf"but the model's vocab_size is 256; choose a model preset "
                                                        rf"with vocab_size >= {bpe.vocab_size} or a --tokenizer of "
                                                        r"at most 256 tokens$"):
        tokenizer.check_vocab(bpe, 256)


# ---- prepared shards ----------------------------------------------------------------------------------------


def test_prepared_shards_hold_each_split_as_documents_then_eos(docs, bpe, tmp_path):
    index = shards.prepare(docs, bpe, tmp_path / "p", shard_tokens=97, eval_fraction=0.3, progress=False)
    assert (tmp_path / "p" / "tokenizer.json").is_file() and index["dtype"] == "uint16"
    for split in ("train", "eval"):
        want = _stream(bpe, docs, split, 0.3)
        got = _read(tmp_path / "p", split)
        assert got.dtype == np.uint16 and np.array_equal(got, want), split
        entries = index["splits"][split]["shards"]
        assert [e["tokens"] for e in entries[:-1]] == [97] * (len(entries) - 1) and entries[-1]["tokens"] <= 97
        assert sum(e["tokens"] for e in entries) == index["splits"][split]["tokens"] == want.size
    assert index["splits"]["train"]["documents"] + index["splits"]["eval"]["documents"] == 24
    assert 0 < index["splits"]["eval"]["documents"] < 24
    import hashlib

    first = index["splits"]["train"]["shards"][0]
    assert first["sha256"] == hashlib.sha256(np.load(tmp_path / "p" / first["file"]).tobytes()).hexdigest()
    # the same corpus prepared again (other shard size) replaces the folder; the data are the same
    again = shards.prepare(docs, bpe, tmp_path / "p", shard_tokens=1000, eval_fraction=0.3, progress=False)
    assert len(again["splits"]["train"]["shards"]) < len(index["splits"]["train"]["shards"])
    assert np.array_equal(_read(tmp_path / "p", "train"), _stream(bpe, docs, "train", 0.3))
    assert sorted(p.name for p in (tmp_path / "p").iterdir() if p.name.startswith("train")) == \
        [e["file"] for e in again["splits"]["train"]["shards"]]


def test_held_out_split_is_by_document_deterministic_and_stable_when_files_are_added(tmp_path):
    folder = _docs(tmp_path / "c", n=40)
    root, files, _ = corpus.documents(folder)
    before = {f.name: corpus.split_of(root, f, 0.25) for f in files}
    assert 0 < list(before.values()).count("eval") < 40
    (folder / "doc_new.txt").write_text("a new document\n")
    root, files, _ = corpus.documents(folder)
    after = {f.name: corpus.split_of(root, f, 0.25) for f in files}
    assert {k: after[k] for k in before} == before  # adding a file moves no other file
    # the in-memory byte corpus: train and eval are disjoint documents and together every byte
    train, held = (corpus.load_corpus(folder, split=s, eval_fraction=0.25) for s in ("train", "eval"))
    want_eval = b"".join(f.read_bytes() for f in files if after[f.name] == "eval")
    assert held.tobytes() == want_eval
    assert train.size + held.size == corpus.load_corpus(folder).size
    with pytest.raises(ValueError, match="split: expected None, 'train' or 'eval'"):
        corpus.load_corpus(folder, split="test")


def test_shard_source_windows_cross_shard_boundaries_and_drop_the_partial_tail(docs, tmp_path):
    byte = tokenizer.ByteTokenizer()
    shards.prepare(docs, byte, tmp_path / "p", shard_tokens=100, eval_fraction=0.0, progress=False)
    stream = _stream(byte, docs, "train", 0.0)
    src = shards.ShardSource(shards.Shards(tmp_path / "p"), seq=250)  # windows of 251 span 3-4 shards of 100
    assert len(src) == (stream.size - 1) // 250 and (stream.size - 1) % 250  # a partial tail exists, dropped
    for i in [0, 1, 5, len(src) // 2, len(src) - 1]:
        got = src[i]
        assert got.dtype == np.int32 and np.array_equal(got, stream[i * 250:i * 250 + 251]), i
    assert src._open and len(src._open) < len(src.shards.entries)  # only the shards touched are mapped


def test_resume_mid_shard_is_exact(docs, bpe, tmp_path):
    shards.prepare(docs, bpe, tmp_path / "p", shard_tokens=50, eval_fraction=0.0, progress=False)
    data = loader.load_data(tmp_path / "p", model_vocab=300)
    it = loader.batches(data, seq=8, batch_size=4, seed=3)
    [next(it) for _ in range(5)]
    state = it.get_state()
    want = [next(it) for _ in range(3)]
    fresh = loader.batches(loader.load_data(tmp_path / "p"), seq=8, batch_size=4, seed=3)
    fresh.set_state(state)
    got = [next(fresh) for _ in range(3)]
    assert all(np.array_equal(a, b) for a, b in zip(got, want))
    assert got[0].shape == (4, 9) and got[0].dtype == np.int32


def test_readers_of_disjoint_rows_read_each_batch_once_and_resume_exactly(docs, bpe, tmp_path):
    # The processes of one data-parallel site read only their own rows of the one seeded stream
    shards.prepare(docs, bpe, tmp_path / "p", shard_tokens=100, progress=False)
    data = loader.load_data(tmp_path / "p")
    whole = loader.batches(data, seq=8, batch_size=4, seed=3)
    readers = [loader.batches(data, seq=8, batch_size=4, seed=3, rows=r) for r in ((0, 2), range(1, 4, 2), ())]
    for _ in range(4):
        full = next(whole)
        even, odd, none = (next(r) for r in readers)
        assert np.array_equal(even, full[[0, 2]]) and np.array_equal(odd, full[[1, 3]])
        assert none.shape == (0, 9) and even.dtype == np.int32
    assert readers[2].get_state() == whole.get_state() == {"next_index": 4}  # a reader of no rows keeps its place
    again = loader.batches(data, seq=8, batch_size=4, seed=3, rows=(1, 3))
    again.set_state(readers[1].get_state())
    assert np.array_equal(next(again), next(whole)[[1, 3]])
    with pytest.raises(ValueError, match=r"^rows: expected indices into a batch of 4, got \(0, 4\)$"):
        loader.batches(data, seq=8, batch_size=4, rows=(0, 4))


def test_the_default_byte_corpus_gives_the_batches_it_always_gave():
    """No --data: the stdlib bytes through the same grain pipeline as before shards existed (losses are pinned)."""
    data = loader.load_data(None, max_bytes=100_000, model_vocab=256)
    assert isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.size == 100_000
    old = iter(grain.MapDataset.source(corpus.Windows(data, 32)).seed(5).shuffle().repeat(None)
               .batch(4, drop_remainder=True).to_iter_dataset())
    new = loader.batches(data, seq=32, batch_size=4, seed=5)
    assert all(np.array_equal(next(old), next(new)) for _ in range(4))


def test_prepare_refuses_a_file_another_corpus_and_foreign_files(docs, bpe, tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(corpus.DataError, match=r"^--out: expected a folder for the prepared data, got '.*afile', "
                                               r"which is a file$"):
        shards.prepare(docs, bpe, tmp_path / "afile", progress=False)
    shards.prepare(docs, bpe, tmp_path / "p", progress=False)
    with pytest.raises(corpus.DataError, match=r"^--out: '.*p' holds a different prepared corpus \(see its "
                                               r"index\.json\); give an empty or new folder"):
        shards.prepare(docs, tokenizer.ByteTokenizer(), tmp_path / "p", progress=False)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.md").write_text("keep")
    with pytest.raises(corpus.DataError, match=r"holds files that are not prepared data \('notes\.md', \.\.\.\)"):
        shards.prepare(docs, bpe, tmp_path / "mine", progress=False)
    assert (tmp_path / "mine" / "notes.md").read_text() == "keep"
    inner = _docs(tmp_path / "c", n=5)  # --out inside --data: its own files are not documents, also when redone
    first = shards.prepare(inner, bpe, inner / "prepared", eval_fraction=0.0, progress=False)
    assert shards.prepare(inner, bpe, inner / "prepared", eval_fraction=0.0, progress=False) == first
    assert first["splits"]["train"]["documents"] == 5
    one = tmp_path / "one.txt"
    one.write_text("just one document")
    with pytest.raises(corpus.DataError, match="went to the eval split; lower --eval-fraction"):
        shards.prepare(one, bpe, tmp_path / "q", eval_fraction=0.999999, progress=False)


def test_prepared_data_larger_than_the_model_vocab_is_one_line_naming_data(docs, bpe, tmp_path):
    shards.prepare(docs, bpe, tmp_path / "p", progress=False)
    with pytest.raises(tokenizer.TokenizerError, match=rf"^--data: the tokenizer has {bpe.vocab_size} tokens but "
                                                        r"the model's vocab_size is 256"):
        loader.load_data(tmp_path / "p", model_vocab=256)
    assert loader.tokenizer_of(loader.load_data(tmp_path / "p")).name == bpe.name


# ---- command line -------------------------------------------------------------------------------------------


def test_cli_tokenizer_train_then_prepare(docs, tmp_path, capsys):
    from hxtrain import cli

    assert cli.main(["tokenizer", "train", "--data", str(docs), "--vocab", "300", "--out", str(tmp_path / "tok")]) == 0
    assert "-> " in capsys.readouterr().out and (tmp_path / "tok" / "tokenizer.json").is_file()
    assert cli.main(["prepare", "--data", str(docs), "--tokenizer", str(tmp_path / "tok"), "--out",
                     str(tmp_path / "p"), "--eval-fraction", "0.2", "--shard-tokens", "500", "--no-progress"]) == 0
    out = capsys.readouterr().out
    index = json.loads((tmp_path / "p" / "index.json").read_text())
    tok = tokenizer.load(tmp_path / "tok")
    assert index["tokenizer"]["name"] == tok.name and f"train {index['splits']['train']['documents']} documents" in out
    assert np.array_equal(_read(tmp_path / "p", "train"), _stream(tok, docs, "train", 0.2))
    assert cli.main(["prepare", "--data", str(docs), "--tokenizer", "x", "--out", str(tmp_path / "q")]) == 2
    assert capsys.readouterr().err == ("hxtrain prepare: error: --tokenizer: 'x' does not exist; give a "
                                       "tokenizer.json, a SentencePiece .model, or 'byte'\n")


def test_a_trainer_reads_a_prepared_folder_keeps_its_tokenizer_and_refuses_one_it_cannot_embed(docs, bpe,
                                                                                                tmp_path):
    import types

    from hxtrain.config.topology import uniform
    from hxtrain.core import model_registry
    from hxtrain.training.trainer import Trainer

    shards.prepare(docs, bpe, tmp_path / "p", progress=False)
    byte_model = types.SimpleNamespace(cfg=types.SimpleNamespace(vocab_size=256, seq_len=16))
    with pytest.raises(tokenizer.TokenizerError, match=rf"^--data: the tokenizer has {bpe.vocab_size} tokens"):
        Trainer(byte_model, uniform(1), data=tmp_path / "p")  # refused before the model is placed anywhere
    model = model_registry.build("tiny", vocab_size=300)
    trainer = Trainer(model, uniform(1), microbatches=1, batch_size=2, data=tmp_path / "p", out=tmp_path / "run")
    batch = next(trainer.batches)  # what `fit` trains on
    stream = _read(tmp_path / "p", "train")
    assert batch.shape == (2, 17) and batch.max() < bpe.vocab_size
    assert any(np.array_equal(stream[k:k + 17], batch[0]) for k in range(0, stream.size - 16, 16))
    assert tokenizer.for_run(tmp_path / "run").name == bpe.name  # the run folder carries the tokenizer
