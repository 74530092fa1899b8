"""Documents and the in-memory byte corpus: this Python's own standard library sources (present on every machine),
or any text file / folder given with `--data`.

A document is one file. `documents` lists them (sorted by relative path, the order every split keeps), and
`held_out` is the one rule that puts a document in the evaluation split: a hash of its relative path, so adding or
removing a file never moves another one between splits.

`load_corpus` concatenates documents' bytes (uint8 [N]); `Windows` is the grain source over it: record i is the
window of `seq + 1` bytes starting at i * seq (inputs and their next-byte targets).
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from pathlib import Path

import numpy as np

TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst", ".toml", ".json", ".c", ".h", ".html", ".csv", ".ini", ".cfg")
SPLITS = ("train", "eval")


class DataError(ValueError):
    """Unusable `--data`: names the path, what was expected and what was found."""


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _files(root: Path, suffixes: tuple[str, ...]) -> list[Path]:
    skip = {"site-packages", "__pycache__", "dist-packages"}
    return sorted(p for p in root.rglob("*") if p.suffix in suffixes and p.is_file()
                  and not skip.intersection(p.relative_to(root).parts))


def documents(path: str | os.PathLike | None) -> tuple[Path, list[Path], str]:
    """(root, files, description) of `--data`: one file, every text file under a folder (sorted), or (None) the
    standard library's .py files. Relative paths against `root` name the documents for `held_out`."""
    if path is None:
        return stdlib_root(), _files(stdlib_root(), (".py",)), f"standard library at {stdlib_root()}"
    p = Path(path)
    if not p.exists():
        raise DataError(f"--data: {str(p)!r} does not exist; give a text file or a folder of text files")
    if p.is_file():
        return p.parent, [p], str(p)
    files = _files(p, TEXT_SUFFIXES)
    if not files:
        raise DataError(f"--data: folder {str(p)!r} holds no text files (looked for {', '.join(TEXT_SUFFIXES)})")
    return p, files, str(p)


def held_out(name: str, fraction: float) -> bool:
    """Whether the document with relative path `name` belongs to the evaluation split: the first 8 bytes of its
    SHA-256 read as a fraction of 2**64, below `fraction`. Depends on the name only, never on the other files."""
    h = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big")
    return h < fraction * 2.0 ** 64


def split_of(root: Path, file: Path, fraction: float) -> str:
    return "eval" if held_out(file.relative_to(root).as_posix(), fraction) else "train"


def load_corpus(path: str | os.PathLike | None = None, *, max_bytes: int | None = None, split: str | None = None,
                eval_fraction: float = 0.01) -> np.ndarray:
    """uint8 [N]: the bytes of a file, of every text file under a folder, or (None) of the stdlib's .py files,
    concatenated in `documents` order and cut at `max_bytes`.

    `split`: None takes every document (the default run's corpus, unchanged); "train" / "eval" take only the
    documents `held_out(.., eval_fraction)` leaves in / puts out, so an evaluation never sees training bytes."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"split: expected None, 'train' or 'eval', got {split!r}")
    root, files, source = documents(path)
    if split is not None:
        files = [f for f in files if split_of(root, f, eval_fraction) == split]
        source = f"the {split} split ({eval_fraction:g} of documents held out) of {source}"
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
