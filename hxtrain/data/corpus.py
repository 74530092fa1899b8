"""Byte-level text data through grain: the embedded corpus (this Python's own standard library sources, present
on every machine) or any text file / folder given with `--data`.

A record is a window of `seq + 1` bytes (inputs and their next-byte targets); windows start every `seq` bytes. The
grain pipeline shuffles windows with a seed, repeats forever and batches; its iterator state checkpoints and
resumes exactly.
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import grain
import numpy as np

TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst", ".toml", ".json", ".c", ".h", ".html", ".csv", ".ini", ".cfg")


class DataError(ValueError):
    """Unusable `--data`: names the path, what was expected and what was found."""


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _files(root: Path, suffixes: tuple[str, ...]) -> list[Path]:
    skip = {"site-packages", "__pycache__", "dist-packages"}
    return sorted(p for p in root.rglob("*") if p.suffix in suffixes and p.is_file()
                  and not skip.intersection(p.relative_to(root).parts))


def load_corpus(path: str | os.PathLike | None = None, *, max_bytes: int | None = None) -> np.ndarray:
    """uint8 [N]: the bytes of a file, of every text file under a folder, or (None) of the stdlib's .py files."""
    if path is None:
        files = _files(stdlib_root(), (".py",))
        source = f"standard library at {stdlib_root()}"
    else:
        p = Path(path)
        if not p.exists():
            raise DataError(f"--data: {str(p)!r} does not exist; give a text file or a folder of text files")
        files = [p] if p.is_file() else _files(p, TEXT_SUFFIXES)
        source = str(p)
        if not files:
            raise DataError(f"--data: folder {str(p)!r} holds no text files (looked for {', '.join(TEXT_SUFFIXES)})")
    chunks, total = [], 0
    for f in files:
        chunks.append(np.frombuffer(f.read_bytes(), np.uint8))
        total += chunks[-1].size
        if max_bytes is not None and total >= max_bytes:
            break
    corpus = np.concatenate(chunks)[:max_bytes] if chunks else np.zeros(0, np.uint8)
    if corpus.size < 2:
        raise DataError(f"--data: {source} holds {corpus.size} bytes; need at least a few sequences")
    return corpus


class Windows:
    """grain random-access source: record i = corpus[i*seq : i*seq + seq + 1] as int32."""

    def __init__(self, corpus: np.ndarray, seq: int):
        if corpus.size < seq + 1:
            raise DataError(f"data: {corpus.size} bytes is shorter than one sequence of {seq + 1} bytes")
        self.corpus, self.seq = corpus, seq

    def __len__(self) -> int:
        return (self.corpus.size - 1) // self.seq

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(i) * self.seq
        return self.corpus[start:start + self.seq + 1].astype(np.int32)


def batches(corpus: np.ndarray, *, seq: int, batch_size: int, seed: int = 0):
    """An endless, seeded grain iterator of int32 [batch_size, seq + 1] batches (`get_state`/`set_state`)."""
    ds = (grain.MapDataset.source(Windows(corpus, seq)).seed(seed).shuffle().repeat(None)
          .batch(batch_size, drop_remainder=True))
    return iter(ds.to_iter_dataset())
