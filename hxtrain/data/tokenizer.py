"""Tokenizers as users bring them: bytes (the zero-setup default), a Hugging Face `tokenizer.json`, or a
SentencePiece `.model`; and a byte-level BPE trained here from local files.

    tok = tokenizer.load("tokenizer.json")        # or a .model file, a folder holding one, "byte" / None
    ids = tok.encode("hello")                     # list[int], each in [0, tok.vocab_size)
    text = tok.decode(ids)
    tok.save(run_folder)                          # the file travels with the run; tokenizer.for_run(run_folder)

Nothing here writes a tokenizer by hand: BPE and unigram models come from the `tokenizers` and `sentencepiece`
libraries, which read the files other tools write.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable, Protocol, Sequence

import numpy as np

__all__ = ["ByteTokenizer", "HFTokenizer", "SentencePieceTokenizer", "Tokenizer", "TokenizerError", "check_vocab",
           "for_run", "load", "train_bpe"]

HF_FILE, SP_FILE = "tokenizer.json", "tokenizer.model"  # the names a tokenizer is saved under in a run / export
EOS_TOKENS = ("</s>", "<|endoftext|>", "<eos>")  # the end-of-document tokens looked for, in this order
BPE_EOS = "<|endoftext|>"


class TokenizerError(ValueError):
    """An unusable tokenizer: names the flag or file, what was expected and the fix, in one line."""


class Tokenizer(Protocol):
    """What training, data preparation and sampling need of a tokenizer."""

    name: str  # "byte", or the kind and a digest of the file ("hf:1a2b3c4d5e6f"): names the vocabulary
    vocab_size: int  # ids lie in [0, vocab_size)
    eos_id: int  # appended after every document when documents are packed into one stream

    def encode(self, text: str) -> list[int]: ...

    def encode_bytes(self, data: bytes) -> np.ndarray:
        """int64 [n]: the tokens of a document as read from disk."""

    def decode(self, ids: Iterable[int]) -> str: ...

    def save(self, folder: str | os.PathLike) -> Path:
        """Write the tokenizer's file into `folder` (created if missing); returns what `for_run` will read."""


class ByteTokenizer:
    """Bytes are tokens: vocab 256, no file, works on anything.

    A byte-level vocabulary has no spare id for an end-of-document token, so `eos_id` is 0 (the NUL byte), which
    text files practically never contain: it is the separator that packing puts between documents. A NUL inside a
    document reads as a document end; that is the price of keeping the vocabulary at 256.
    """

    name, vocab_size, eos_id = "byte", 256, 0

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_bytes(self, data: bytes) -> np.ndarray:
        # raw bytes, not decoded and re-encoded: the same tokens the in-memory byte corpus trains on
        return np.frombuffer(data, np.uint8).astype(np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def save(self, folder: str | os.PathLike) -> Path:
        # Bytes need no file: a folder without tokenizer.json / tokenizer.model means bytes (`for_run`).
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        return folder


def _eos(ids: dict[str, int | None], source: str) -> int:
    for token in EOS_TOKENS:
        if ids.get(token) is not None:
            return int(ids[token])
    raise TokenizerError(f"--tokenizer: {source!r} has no end-of-document token (looked for "
                         f"{', '.join(EOS_TOKENS)}); add one of them as a special token")


class HFTokenizer:
    """A Hugging Face `tokenizer.json` (BPE, WordPiece, Unigram: whatever the `tokenizers` library reads)."""

    def __init__(self, text: str, source: str = HF_FILE):
        from tokenizers import Tokenizer as _HF

        try:
            self._tok = _HF.from_str(text)
        except Exception as e:  # the Rust side raises a bare Exception for any malformed file
            raise TokenizerError(f"--tokenizer: {source!r} is not a readable tokenizer.json ({e})") from None
        self._text = text  # saved as given, so `name` (a digest of the file) survives a save
        self.name = "hf:" + hashlib.sha256(text.encode()).hexdigest()[:12]
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        self.eos_id = _eos({t: self._tok.token_to_id(t) for t in EOS_TOKENS}, source)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> HFTokenizer:
        data = Path(path).read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise TokenizerError(f"--tokenizer: {str(path)!r} is not a readable tokenizer.json (not UTF-8 text)") \
                from None
        return cls(text, str(path))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_bytes(self, data: bytes) -> np.ndarray:
        return np.asarray(self.encode(data.decode("utf-8", errors="replace")), np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, folder: str | os.PathLike) -> Path:
        path = Path(folder) / HF_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self._text, encoding="utf-8")
        return path


class SentencePieceTokenizer:
    """A SentencePiece `.model` (unigram or BPE), read by the `sentencepiece` library."""

    def __init__(self, proto: bytes, source: str = SP_FILE):
        import sentencepiece as spm

        try:
            self._sp = spm.SentencePieceProcessor(model_proto=proto)
        except (RuntimeError, OSError) as e:
            why = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
            raise TokenizerError(f"--tokenizer: {source!r} is not a readable SentencePiece model ({why})") from None
        self._proto = proto
        self.name = "sp:" + hashlib.sha256(proto).hexdigest()[:12]
        self.vocab_size = int(self._sp.get_piece_size())
        eos = int(self._sp.eos_id())
        if eos < 0:  # -1: trained with --eos_id=-1; fall back on a piece spelled like an EOS token
            pieces = {t: self._sp.piece_to_id(t) for t in EOS_TOKENS}
            eos = _eos({t: i for t, i in pieces.items() if i != self._sp.unk_id()}, source)
        self.eos_id = eos

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> SentencePieceTokenizer:
        return cls(Path(path).read_bytes(), str(path))

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text, out_type=int))

    def encode_bytes(self, data: bytes) -> np.ndarray:
        return np.asarray(self.encode(data.decode("utf-8", errors="replace")), np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def save(self, folder: str | os.PathLike) -> Path:
        path = Path(folder) / SP_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self._proto)
        return path


def load(path: str | os.PathLike | None, *, where: str = "--tokenizer") -> Tokenizer:
    """The tokenizer at `path`: a tokenizer.json, a SentencePiece .model, a folder holding tokenizer.json or
    tokenizer.model, or "byte" / None for `ByteTokenizer`. TokenizerError (one line, naming `where`) otherwise."""
    if path is None or str(path) == "byte":
        return ByteTokenizer()
    p = Path(path)
    if not p.exists():
        raise TokenizerError(f"{where}: {str(p)!r} does not exist; give a tokenizer.json, a SentencePiece .model, "
                             "or 'byte'")
    try:
        if p.is_dir():
            found = [p / f for f in (HF_FILE, SP_FILE) if (p / f).is_file()]
            if not found:
                raise TokenizerError(f"{where}: folder {str(p)!r} holds neither {HF_FILE} nor {SP_FILE}; give a "
                                     "tokenizer.json, a SentencePiece .model, or 'byte'")
            p = found[0]
        if p.suffix == ".json":
            return HFTokenizer.from_file(p)
        if p.suffix == ".model":
            return SentencePieceTokenizer.from_file(p)
    except TokenizerError as e:  # name the flag the user typed, whatever file it led to
        raise TokenizerError(str(e).replace("--tokenizer:", f"{where}:", 1)) from None
    raise TokenizerError(f"{where}: {str(p)!r} has suffix {p.suffix!r}; give a tokenizer.json (Hugging Face), a "
                         "SentencePiece .model, or 'byte'")


def for_run(folder: str | os.PathLike) -> Tokenizer:
    """The tokenizer saved in a run, export or prepared-data folder (tokenizer.json / tokenizer.model), else bytes."""
    folder = Path(folder)
    if any((folder / f).is_file() for f in (HF_FILE, SP_FILE)):
        return load(folder, where=str(folder))
    return ByteTokenizer()


def check_vocab(tokenizer: Tokenizer, model_vocab: int, where: str = "--tokenizer") -> None:
    """TokenizerError when the tokenizer's ids do not all fit the model's embedding table."""
    if tokenizer.vocab_size > model_vocab:
        raise TokenizerError(f"{where}: the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size "
                             f"is {model_vocab}; choose a model preset with vocab_size >= {tokenizer.vocab_size} "
                             f"or a --tokenizer of at most {model_vocab} tokens")


def train_bpe(files: Sequence[str | os.PathLike], vocab_size: int, out: str | os.PathLike, *,
              progress: bool = False) -> Path:
    """Train a byte-level BPE (GPT-2 style: any text round-trips) on `files`, locally, with the end-of-document
    token `<|endoftext|>`; writes and returns out/tokenizer.json."""
    from tokenizers import Tokenizer as _HF, decoders, models, pre_tokenizers, trainers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise TokenizerError(f"--vocab: a byte-level BPE needs at least {len(alphabet) + 1} tokens (256 bytes and "
                             f"{BPE_EOS}), got {vocab_size}")
    if not files:
        raise TokenizerError("--data: no text files to train the tokenizer on")
    tok = _HF(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BPE_EOS], initial_alphabet=alphabet,
                                  show_progress=progress)
    # read as bytes and decoded leniently: a stray non-UTF-8 byte must not stop a training run
    tok.train_from_iterator((Path(f).read_bytes().decode("utf-8", errors="replace") for f in files), trainer=trainer,
                            length=len(files))
    path = Path(out) / HF_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path
