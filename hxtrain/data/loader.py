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

__all__ = ["Corpus", "DataError", "batches", "load_data", "tokenizer_of"]

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


def tokenizer_of(corpus: Corpus) -> _tok.Tokenizer:
    """The tokenizer that made `corpus`'s tokens: a prepared folder's own, else bytes."""
    return corpus.tokenizer if isinstance(corpus, _shards.Shards) else _tok.ByteTokenizer()


def batches(corpus: Corpus, *, seq: int, batch_size: int, seed: int = 0, shard: tuple[int, int] = (0, 1)):
    """An endless, seeded grain iterator of int32 [batch_size, seq + 1] batches (`get_state`/`set_state`).

    `shard=(index, count)`: this data-parallel process's records, `index::count` of the source taken before the
    shuffle, so the processes' records are disjoint and together cover the source (less its last len % count).
    Each process draws its own batch_size rows per step."""
    index, count = shard
    if not (isinstance(count, int) and count >= 1 and isinstance(index, int) and 0 <= index < count):
        raise ValueError(f"shard: expected (index, count) with 0 <= index < count, got {shard!r}")
    source = _shards.ShardSource(corpus, seq) if isinstance(corpus, _shards.Shards) else _corpus.Windows(corpus, seq)
    ds = grain.MapDataset.source(source)
    if count > 1:
        if len(source) < count:
            raise DataError(f"data: {len(source)} sequences cannot be shared by {count} processes")
        ds = ds[index::count]
    ds = ds.seed(seed).shuffle().repeat(None).batch(batch_size, drop_remainder=True)
    return iter(ds.to_iter_dataset())
