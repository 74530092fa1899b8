"""Data: documents, tokenizers, prepared token shards and the grain batches a run trains on. numpy, grain and the
tokenizer libraries; no JAX.

- `corpus`: documents of `--data`, the held-out rule (by document), the in-memory byte corpus and its windows.
- `tokenizer`: the `Tokenizer` protocol; bytes, Hugging Face tokenizer.json, SentencePiece .model; `train_bpe`.
- `shards`: `prepare` (documents -> token shards + index.json), `Shards`, `ShardSource` (grain source).
- `loader`: `load_data` (prepared shards or bytes) and `batches` (the grain iterator training reads).
- `cli`: `hxtrain prepare`, `hxtrain tokenizer train`.
"""
