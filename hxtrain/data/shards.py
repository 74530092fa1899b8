"""Prepared token shards: documents tokenized once, packed into one stream per split, streamed to `.npy` files.

    index = shards.prepare("corpus/", tokenizer.load("tokenizer.json"), "prepared/")
    source = shards.ShardSource(shards.Shards("prepared/"), seq=256)   # grain random-access source
    source[i]                                                        # int32 [seq + 1]

Layout of a prepared folder:

    index.json              format, version, source, tokenizer (name, vocab_size, eos_id, file), dtype,
                            eval_fraction, and per split its documents, tokens and shards (file, tokens, sha256)
    tokenizer.json | .model the tokenizer that made the tokens (none for bytes)
    train-00000.npy ...     1-D uint16 (vocab <= 65535) or uint32 arrays of at most shard_tokens tokens
    eval-00000.npy ...      the held-out documents (`corpus.held_out`), the same way

A split's stream is its documents in `corpus.documents` order (sorted relative paths), each document's tokens
followed by the tokenizer's eos_id; the stream is cut into shards at every shard_tokens tokens, so a document may
span two shards. sha256 is the digest of a shard's token data as stored (the array's bytes, without the .npy
header). index.json is written last: a folder holding one was prepared completely.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from hxtrain.data import corpus as _corpus
from hxtrain.data import tokenizer as _tok

INDEX, FORMAT, VERSION = "index.json", "hxtrain-tokens", 1
DEFAULT_SHARD_TOKENS = 1 << 26  # 64 Mi tokens: 128 MiB of uint16 per shard, few files for large corpora
_OURS = (INDEX, _tok.HF_FILE, _tok.SP_FILE)  # with {split}-NNNNN.npy(.tmp): what a prepare may overwrite


def _dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


class _Writer:
    """One split's token stream, written to shards of at most `shard_tokens` tokens without holding more than the
    tokens of the document being appended."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.folder, self.split, self.dtype, self.cap = folder, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self.tokens = self.documents = 0
        self._mm = None
        self._filled = 0
        self._hash = None

    def _path(self, k: int) -> Path:
        return self.folder / f"{self.split}-{k:05d}.npy"

    def append(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens).astype(self.dtype, copy=False)
        while tokens.size:
            if self._mm is None:  # sized to the cap up front: the file stays sparse until written
                self._mm = np.lib.format.open_memmap(self._path(len(self.shards)), mode="w+", dtype=self.dtype,
                                                     shape=(self.cap,))
                self._filled, self._hash = 0, hashlib.sha256()
            take = min(self.cap - self._filled, tokens.size)
            self._mm[self._filled:self._filled + take] = tokens[:take]
            self._hash.update(tokens[:take].tobytes())
            self._filled += take
            self.tokens += take
            tokens = tokens[take:]
            if self._filled == self.cap:
                self._finish()

    def _finish(self) -> None:
        path, n = self._path(len(self.shards)), self._filled
        self._mm.flush()
        if n < self.cap:  # the last shard: copy its n tokens into a file of exactly n, in bounded chunks
            tmp = path.with_suffix(".npy.tmp")
            exact = np.lib.format.open_memmap(tmp, mode="w+", dtype=self.dtype, shape=(n,))
            for lo in range(0, n, 1 << 24):
                hi = min(n, lo + (1 << 24))
                exact[lo:hi] = self._mm[lo:hi]
            exact.flush()
            del exact
            self._mm = None  # the oversized map goes before its file is replaced
            os.replace(tmp, path)
        self._mm = None
        self.shards.append({"file": path.name, "tokens": n, "sha256": self._hash.hexdigest()})

    def close(self) -> dict:
        if self._mm is not None:
            self._finish()
        return {"documents": self.documents, "tokens": self.tokens, "shards": self.shards}


def _check_out(out: Path, source: str, tokenizer_name: str) -> None:
    """Refuse a file, a folder with files that are not a prepared corpus's, or another corpus's prepared folder."""
    if out.exists() and not out.is_dir():
        raise _corpus.DataError(f"--out: expected a folder for the prepared data, got {str(out)!r}, which is a file")
    if not out.is_dir():
        return
    index = out / INDEX
    if index.is_file():
        try:
            old = json.loads(index.read_text())
            same = (old.get("source"), old.get("tokenizer", {}).get("name")) == (source, tokenizer_name)
        except (ValueError, AttributeError):
            same = False
        if not same:
            raise _corpus.DataError(f"--out: {str(out)!r} holds a different prepared corpus (see its {INDEX}); "
                                    "give an empty or new folder, or delete that one")
    others = sorted(p.name for p in out.iterdir() if not (_ours(p.name) and p.is_file()))
    if others:
        raise _corpus.DataError(f"--out: {str(out)!r} holds files that are not prepared data ({others[0]!r}, ...); "
                                "give an empty or new folder")


def _ours(name: str) -> bool:
    if name in _OURS or name == INDEX + ".tmp":
        return True
    stem = name.removesuffix(".tmp").removesuffix(".npy")
    split, _, k = stem.partition("-")
    return split in _corpus.SPLITS and k.isdigit() and name.removesuffix(".tmp").endswith(".npy")


def prepare(data_path: str | os.PathLike | None, tokenizer: _tok.Tokenizer, out_dir: str | os.PathLike, *,
            shard_tokens: int = DEFAULT_SHARD_TOKENS, eval_fraction: float = 0.01, progress: bool = True) -> dict:
    """Tokenize every document of `data_path` (a file, a folder of text files, or None: the standard library's .py
    files) into `out_dir` as described in the module docstring; returns the index written to out_dir/index.json.
    Holds one document's tokens at a time. A folder prepared before from the same data and tokenizer is replaced."""
    if not (isinstance(shard_tokens, int) and shard_tokens >= 1):
        raise _corpus.DataError(f"--shard-tokens: expected a whole number >= 1, got {shard_tokens!r}")
    if not 0.0 <= eval_fraction < 1.0:
        raise _corpus.DataError(f"--eval-fraction: expected a fraction in [0, 1), got {eval_fraction!r}")
    root, files, described = _corpus.documents(data_path)
    source = "stdlib" if data_path is None else str(Path(data_path).resolve())
    out = Path(out_dir)
    inside = out.resolve()
    files = [f for f in files if inside not in f.resolve().parents]  # --out under --data: not a document
    if not files:
        raise _corpus.DataError(f"--data: {described} holds no documents outside --out {str(out)!r}")
    _check_out(out, source, tokenizer.name)
    out.mkdir(parents=True, exist_ok=True)
    for p in out.iterdir():  # a re-preparation of the same corpus: nothing of the old one may linger
        p.unlink()
    dtype = _dtype(tokenizer.vocab_size)
    writers = {s: _Writer(out, s, dtype, shard_tokens) for s in _corpus.SPLITS}
    from tqdm.auto import tqdm

    bar = tqdm(total=sum(f.stat().st_size for f in files), unit="B", unit_scale=True, disable=not progress,
               desc=f"prepare {out.name}")
    eos = np.array([tokenizer.eos_id])
    for f in files:
        data = f.read_bytes()
        ids = tokenizer.encode_bytes(data)
        if ids.size and (ids.min() < 0 or ids.max() >= tokenizer.vocab_size):
            raise _corpus.DataError(f"--tokenizer: {tokenizer.name} gave id {int(ids.max())} for {str(f)!r}, "
                                    f"outside its vocab_size {tokenizer.vocab_size}")
        w = writers[_corpus.split_of(root, f, eval_fraction)]
        w.append(ids)
        w.append(eos)
        w.documents += 1
        bar.update(len(data))
    bar.close()
    splits = {s: w.close() for s, w in writers.items()}
    if splits["train"]["tokens"] == 0:
        raise _corpus.DataError(f"--data: every document of {described} went to the eval split; lower "
                                f"--eval-fraction (got {eval_fraction:g})")
    saved = tokenizer.save(out)
    index = {"format": FORMAT, "version": VERSION, "source": source,
             "tokenizer": {"name": tokenizer.name, "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
                           "file": saved.name if saved.is_file() else None},
             "dtype": dtype.name, "eval_fraction": eval_fraction, "shard_tokens": shard_tokens, "splits": splits}
    tmp = out / (INDEX + ".tmp")
    tmp.write_text(json.dumps(index, indent=1) + "\n")
    os.replace(tmp, out / INDEX)  # last: a folder with an index.json is complete
    return index


def is_prepared(path: str | os.PathLike | None) -> bool:
    return path is not None and (Path(path) / INDEX).is_file()


class Shards:
    """A prepared folder's split: its index (`entries`: the split's shards; `tokens`; `dtype`) and its tokenizer,
    checked against the index. The shard files are opened by `ShardSource`, never here."""

    def __init__(self, folder: str | os.PathLike, split: str = "train"):
        self.folder, self.split = Path(folder), split
        if split not in _corpus.SPLITS:
            raise ValueError(f"split: expected 'train' or 'eval', got {split!r}")
        try:
            self.index = json.loads((self.folder / INDEX).read_text())
        except (OSError, ValueError) as e:
            raise _corpus.DataError(f"--data: cannot read {str(self.folder / INDEX)!r} ({e}); prepare the data "
                                    "again with `hxtrain prepare`") from None
        if (self.index.get("format"), self.index.get("version")) != (FORMAT, VERSION):
            raise _corpus.DataError(f"--data: {str(self.folder)!r} is prepared data of format "
                                    f"{self.index.get('format')!r} v{self.index.get('version')}, this hxtrain reads "
                                    f"{FORMAT!r} v{VERSION}; prepare it again")
        self.tokenizer = _tok.for_run(self.folder)
        if self.tokenizer.name != self.index["tokenizer"]["name"]:
            raise _corpus.DataError(f"--data: {str(self.folder)!r} was prepared with tokenizer "
                                    f"{self.index['tokenizer']['name']} but holds {self.tokenizer.name}; prepare "
                                    "it again")
        self.entries = self.index["splits"][split]["shards"]
        self.tokens = int(self.index["splits"][split]["tokens"])
        self.dtype = np.dtype(self.index["dtype"])

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size


class ShardSource:
    """grain random-access source over a split's shards, read as one stream of `tokens` tokens: record i =
    stream[i*seq : i*seq + seq + 1] as int32 [seq + 1], across shard boundaries; the last, partial window is
    dropped. A shard file is opened the first time a record touches it and read by position; nothing is read whole.

    Positional reads (os.pread) rather than a memory map: a map counts every page the kernel maps around a random
    read (64 KiB of fault-around) in the process's resident memory, which grows towards the shard files' size over a
    run (nanoGPT re-creates its np.memmap every batch for this reason); a read copies exactly the window."""

    def __init__(self, shards: Shards, seq: int):
        if shards.tokens < seq + 1:
            raise _corpus.DataError(f"--data: the {shards.split} split of {str(shards.folder)!r} holds "
                                    f"{shards.tokens} tokens, shorter than one sequence of {seq + 1}")
        self.shards, self.seq = shards, seq
        self._starts = np.cumsum([0] + [e["tokens"] for e in shards.entries]).tolist()  # [n_shards + 1]
        self._open: dict[int, tuple] = {}  # shard -> (file, byte offset of its data)

    def __len__(self) -> int:
        return (self.shards.tokens - 1) // self.seq

    def _shard(self, k: int) -> tuple:
        if k not in self._open:
            entry = self.shards.entries[k]
            f = open(self.shards.folder / entry["file"], "rb", buffering=0)  # kept open: one per shard touched
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(f)
            if shape != (entry["tokens"],) or dtype != self.shards.dtype or fortran:
                f.close()
                raise _corpus.DataError(f"--data: shard {entry['file']!r} holds {shape} {dtype}, {INDEX} says "
                                        f"({entry['tokens']},) {self.shards.dtype}; prepare it again")
            self._open[k] = (f, f.tell())
        return self._open[k]

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(i) * self.seq
        stop = start + self.seq + 1
        k = bisect.bisect_right(self._starts, start) - 1
        size = self.shards.dtype.itemsize
        out = np.empty(self.seq + 1, self.shards.dtype)
        filled = 0
        while start < stop:  # at most two pieces unless shards are shorter than a window
            lo, hi = start - self._starts[k], min(stop, self._starts[k + 1]) - self._starts[k]
            f, offset = self._shard(k)
            data = os.pread(f.fileno(), (hi - lo) * size, offset + lo * size)
            if len(data) != (hi - lo) * size:
                raise _corpus.DataError(f"--data: shard {self.shards.entries[k]['file']!r} is shorter than its "
                                        "header says (truncated?); prepare the data again")
            out[filled:filled + hi - lo] = np.frombuffer(data, self.shards.dtype)
            filled += hi - lo
            start, k = self._starts[k] + hi, k + 1
        return out.astype(np.int32)

    def __getstate__(self):  # grain worker processes get paths, and open their own files
        return {**self.__dict__, "_open": {}}
