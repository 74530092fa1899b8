"""The data a run trains on, as grain batches: `load_data` picks the corpus, `batches` makes the iterator.

    corpus = loader.load_data(args.data, max_bytes=8_000_000, model_vocab=256)
    it = loader.batches(corpus, seq=256, batch_size=32, seed=0)   # int32 [32, 257] per next(it)
    state = it.get_state(); ...; it2 = loader.batches(corpus, ...); it2.set_state(state)  # resumes exactly

A folder with an index.json from `hxtrain prepare` is read through its token shards (`shards.ShardSource`);
anything else is the in-memory byte corpus (`corpus.load_corpus`), the zero-setup default whose batches are
the same as before shards existed.
"""

from __future__ import annotations

import os

import grain
import numpy as np

from hxtrain.data import corpus as _corpus
from hxtrain.data import shards as _shards
from hxtrain.data import tokenizer as _tok
from hxtrain.data.corpus import DataError

__all__ = ["Batches", "Corpus", "DataError", "batches", "eval_batches", "load_data", "load_split", "tokenizer_of"]

Corpus = np.ndarray | _shards.Shards  # what load_data returns and batches takes


def load_data(path: str | os.PathLike | None = None, *, max_bytes: int | None = None, split: str | None = None,
              model_vocab: int | None = None, eval_fraction: float = 0.01) -> Corpus:
    """`--data` as a corpus: a prepared folder's `Shards` (split None = "train"; `max_bytes` does not apply), or
    the in-memory byte corpus, uint8 [N] (split None = every document, as the default run has always trained on;
    "train" / "eval" = `corpus.held_out`'s split by document, `eval_fraction` of them held out). `model_vocab`:
    a one-line error naming --data when the data's tokens do not fit the model's vocabulary."""
    if _shards.is_prepared(path):
        data = _shards.Shards(path, split or "train")
        tokenizer = data.tokenizer
    else:
        data = _corpus.load_corpus(path, max_bytes=max_bytes, split=split, eval_fraction=eval_fraction)
        tokenizer = _tok.ByteTokenizer()
    if model_vocab is not None:
        _tok.check_vocab(tokenizer, model_vocab, where="--data")
    return data


def load_split(path: str | os.PathLike | None, *, hold_out: bool, max_bytes: int | None = None,
               model_vocab: int | None = None) -> tuple[Corpus, Corpus | None]:
    """(the corpus to train on, the held-out one or None): with `hold_out`, `load_data`'s "train" and "eval"
    splits; without, every document trains, as it always has."""
    train = load_data(path, max_bytes=max_bytes, model_vocab=model_vocab, split="train" if hold_out else None)
    return train, load_data(path, max_bytes=max_bytes, split="eval") if hold_out else None


def eval_batches(held_out: Corpus, *, seq: int, batch_size: int, count: int) -> list[np.ndarray]:
    """The `count` fixed int32 [batch_size, seq + 1] batches that every evaluation of a run takes (seed 0), so
    that successive eval losses compare, and every process of a run takes the same ones."""
    it = batches(held_out, seq=seq, batch_size=batch_size, seed=0)
    return [next(it) for _ in range(count)]


def tokenizer_of(corpus: Corpus) -> _tok.Tokenizer:
    """The tokenizer that made `corpus`'s tokens: a prepared folder's own, else bytes."""
    return corpus.tokenizer if isinstance(corpus, _shards.Shards) else _tok.ByteTokenizer()


def batches(corpus: Corpus, *, seq: int, batch_size: int, seed: int = 0, rows=None) -> "Batches":
    """The run's endless, seeded stream of int32 [batch_size, seq + 1] batches (`Batches`).

    `rows` (indices into each batch, e.g. a range): read only those rows of every batch, [len(rows), seq + 1]; the
    stream is the same, so readers of disjoint rows (the processes of one data-parallel site, DiLoCo replicas)
    together read each batch once, and a reader of no rows reads nothing while keeping its place."""
    source = _shards.ShardSource(corpus, seq) if isinstance(corpus, _shards.Shards) else _corpus.Windows(corpus, seq)
    rows = range(batch_size) if rows is None else rows
    if not all(isinstance(r, (int, np.integer)) and 0 <= r < batch_size for r in rows):
        raise ValueError(f"rows: expected indices into a batch of {batch_size}, got {rows!r}")
    return Batches(grain.MapDataset.source(source).seed(seed).shuffle().repeat(None), batch_size, tuple(rows),
                   seq + 1)


class Batches:
    """Batch t is records t*B .. t*B+B-1 of grain's seeded shuffle of the source, repeated endlessly (what
    `MapDataset.batch(B)` gives); only `rows` of each are read. `get_state()` / `set_state()` hold the position
    as grain's own batch iterator does ({"next_index": t}), so a run resumes exactly."""

    def __init__(self, records, batch_size: int, rows: tuple[int, ...], width: int):
        self.records, self.batch_size, self.rows, self.width = records, batch_size, rows, width
        self.next_index = 0

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        base = self.next_index * self.batch_size
        self.next_index += 1
        out = np.empty((len(self.rows), self.width), np.int32)
        for i, r in enumerate(self.rows):
            out[i] = self.records[base + r]
        return out

    def read_rows(self, rows) -> None:
        """Read `rows` of every batch from the next one on (a DiLoCo replica whose share was dealt again); the
        stream keeps its place."""
        rows = tuple(rows)
        if not all(isinstance(r, (int, np.integer)) and 0 <= r < self.batch_size for r in rows):
            raise ValueError(f"rows: expected indices into a batch of {self.batch_size}, got {rows!r}")
        self.rows = rows

    def get_state(self) -> dict:
        return {"next_index": self.next_index}

    def set_state(self, state: dict) -> None:
        self.next_index = int(state["next_index"])
