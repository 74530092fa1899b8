"""`hxtrain tokenizer train` and `hxtrain prepare`: a tokenizer from local text, and token shards to train on.

    hxtrain tokenizer train --data corpus/ --vocab 8192 --out tok/      # writes tok/tokenizer.json
    hxtrain prepare --data corpus/ --tokenizer tok/ --out prepared/     # index.json, train-*.npy, eval-*.npy
    hxtrain train --data prepared/ ...                                  # trains from the shards

Errors are ValueErrors (DataError, TokenizerError) that `hxtrain.cli.main` prints as one line.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["register"]


def _positive(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def register(sub) -> None:
    """Add `tokenizer` (with its `train` subcommand) and `prepare` to the CLI's subparsers."""
    t = sub.add_parser("tokenizer", help="tokenizer tools: `tokenizer train` (a byte-level BPE from local text)")
    tsub = t.add_subparsers(dest="tokenizer_command", required=True)
    tt = tsub.add_parser("train", help="train a byte-level BPE (Hugging Face tokenizers) on local text files")
    tt.add_argument("--data", help="a text file or folder (default: this Python's standard library sources)")
    tt.add_argument("--vocab", type=_positive, required=True, help="vocabulary size, >= 257")
    tt.add_argument("--out", required=True, help="folder to write tokenizer.json into")
    tt.set_defaults(func=_cmd_tokenizer_train)

    p = sub.add_parser("prepare", help="tokenize a corpus once into token shards (and a held-out eval split)")
    p.add_argument("--data", help="a text file or folder (default: this Python's standard library sources)")
    p.add_argument("--tokenizer", default="byte",
                   help="a tokenizer.json, a SentencePiece .model, a folder holding one, or 'byte' (default)")
    p.add_argument("--out", required=True, help="folder for index.json, the shards and the tokenizer")
    p.add_argument("--eval-fraction", type=float, default=0.01,
                   help="fraction of documents held out for evaluation, chosen by a hash of each file's path "
                        "(default 0.01)")
    from hxtrain.data.shards import DEFAULT_SHARD_TOKENS

    p.add_argument("--shard-tokens", type=_positive, default=DEFAULT_SHARD_TOKENS,
                   help=f"tokens per shard file (default {DEFAULT_SHARD_TOKENS})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs, CI)")
    p.set_defaults(func=_cmd_prepare)


def _cmd_tokenizer_train(args) -> int:
    from hxtrain.data import corpus, tokenizer

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise tokenizer.TokenizerError(f"--out: expected a folder for tokenizer.json, got {str(out)!r}, which is "
                                       "a file")
    _, files, described = corpus.documents(args.data)
    path = tokenizer.train_bpe(files, args.vocab, out)
    tok = tokenizer.load(path)
    print(f"hxtrain tokenizer train: {len(files)} files of {described} -> {path} ({tok.vocab_size} tokens, "
          f"eos id {tok.eos_id})")
    return 0


def _cmd_prepare(args) -> int:
    from hxtrain.data import shards, tokenizer

    tok = tokenizer.load(args.tokenizer)
    index = shards.prepare(args.data, tok, args.out, shard_tokens=args.shard_tokens,
                           eval_fraction=args.eval_fraction, progress=not args.no_progress)
    split = index["splits"]
    print(f"hxtrain prepare: {args.data if args.data is not None else 'stdlib'} with tokenizer {tok.name} ({tok.vocab_size} tokens) -> "
          f"{args.out}: train {split['train']['documents']} documents, {split['train']['tokens']} tokens in "
          f"{len(split['train']['shards'])} shards; eval {split['eval']['documents']} documents, "
          f"{split['eval']['tokens']} tokens")
    return 0
