"""Does reading prepared token shards cost memory that grows with the corpus? A synthetic text corpus of --gb GiB
and one of --small-mb MiB (files of ~1 MiB, in a temporary folder deleted afterwards) are prepared with
`hxtrain.data.shards.prepare` (byte tokenizer: fast, and the question is the loader, not the tokenizer); then, for
each, a fresh process runs --batches batches through `hxtrain.data.loader.batches` (the loader training uses) and
reports its peak resident memory (VmHWM; RssAnon and RssFile at the end: mapped shard pages count as RssFile);
for comparison, a reader through np.load(mmap_mode="r") maps runs the same batches. Last, a fresh process trains
--train-steps steps of the `tiny` GPT on one CPU device from each prepared folder (`hxtrain.Trainer(data=folder)`,
the path `hxtrain train --data DIR` takes) and reports its peak: training memory against corpus size.
Each prepare also runs in its own process, so its peak says whether preparing streams.

    python benchmarks/data_memory.py                    # 1 GiB vs 10 MiB, 200 batches of 32 x 257
    python benchmarks/data_memory.py --gb 0.25 --batches 100
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MiB = 1 << 20


def _status() -> dict:
    """kB fields of /proc/self/status that describe this process's memory."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0])
    return out


def _write_corpus(folder: Path, total: int, seed: int = 0) -> int:
    """Files of ~1 MiB of word-like text (slices of one random 4 MiB block, each file a different offset)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz      \n", np.uint8)
    block = letters[rng.integers(0, letters.size, 4 * MiB + MiB)].tobytes()
    folder.mkdir(parents=True)
    written, k = 0, 0
    while written < total:
        size = min(MiB, total - written)
        off = int(rng.integers(0, 4 * MiB))
        (folder / f"doc{k:06d}.txt").write_bytes(f"document {k}\n".encode() + block[off:off + size])
        written, k = written + size, k + 1
    return k


def _child_prepare(data: str, out: str) -> None:
    from hxtrain.data import shards, tokenizer

    t = time.perf_counter()
    index = shards.prepare(data, tokenizer.ByteTokenizer(), out, progress=False)
    print(json.dumps({"seconds": time.perf_counter() - t, "tokens": index["splits"]["train"]["tokens"],
                      "shards": len(index["splits"]["train"]["shards"]), **_status()}))


class _MemmapSource:
    """For comparison only: `ShardSource`'s windows read through np.load(mmap_mode="r") maps, which ShardSource
    does not use (see its docstring)."""

    def __init__(self, shards, seq: int):
        import numpy as np

        self.arrays = [np.load(shards.folder / e["file"], mmap_mode="r") for e in shards.entries]
        self.starts = np.cumsum([0] + [a.size for a in self.arrays]).tolist()
        self.seq = seq

    def __len__(self) -> int:
        return (self.starts[-1] - 1) // self.seq

    def __getitem__(self, i: int):
        import bisect

        import numpy as np

        start = int(i) * self.seq
        stop, k, pieces = start + self.seq + 1, bisect.bisect_right(self.starts, start) - 1, []
        while start < stop:
            hi = min(stop, self.starts[k + 1])
            pieces.append(self.arrays[k][start - self.starts[k]:hi - self.starts[k]])
            start, k = hi, k + 1
        return np.concatenate(pieces).astype(np.int32)


def _child_load(folder: str, reader: str, batches: int, seq: int, batch: int) -> None:
    import grain

    from hxtrain.data import loader, shards

    base = _status()["VmRSS"]  # after imports: python, numpy, grain
    t = time.perf_counter()
    data = loader.load_data(folder)
    if reader == "memmap":
        ds = grain.MapDataset.source(_MemmapSource(data, seq)).seed(0).shuffle().repeat(None)
        it = iter(ds.batch(batch, drop_remainder=True).to_iter_dataset())
    else:
        assert isinstance(data, shards.Shards)
        it = loader.batches(data, seq=seq, batch_size=batch, seed=0)
    checksum = 0
    for _ in range(batches):
        checksum += int(next(it)[:, 0].sum())
    print(json.dumps({"seconds": time.perf_counter() - t, "base": base, "checksum": checksum, **_status()}))


def _child_train(folder: str, steps: int) -> None:
    import hxtrain
    from models import gpt

    base = _status()["VmRSS"]  # after importing jax, flax and hxtrain
    t = time.perf_counter()
    trainer = hxtrain.Trainer(gpt.build(gpt.TINY), hxtrain.uniform(1), microbatches=2, batch_size=8, data=folder)
    history = trainer.fit(steps, progress=False)
    print(json.dumps({"seconds": time.perf_counter() - t, "base": base, "loss": history[-1]["loss"], **_status()}))


def _run(args: list[str]) -> dict:
    r = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False)
    if r.returncode:
        raise SystemExit(f"child {args[0]} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=1.0, help="size of the large corpus in GiB (default 1.0)")
    p.add_argument("--small-mb", type=float, default=10.0, help="size of the small corpus in MiB (default 10)")
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--tmp", help="where the temporary corpora go (default: the system's temp folder)")
    p.add_argument("--child-prepare", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--train-steps", type=int, default=20, help="steps of the training run per corpus (default 20)")
    p.add_argument("--child-load", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--child-train", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_prepare:
        return _child_prepare(*args.child_prepare)
    if args.child_train:
        return _child_train(args.child_train, args.train_steps)
    if args.child_load:
        return _child_load(*args.child_load, args.batches, args.seq, args.batch)

    root = Path(tempfile.mkdtemp(prefix="hxtrain-data-memory-", dir=args.tmp))
    rows = {}
    try:
        for name, size in (("small", int(args.small_mb * MiB)), ("large", int(args.gb * (1 << 30)))):
            t = time.perf_counter()
            files = _write_corpus(root / f"{name}-text", size)
            wrote = time.perf_counter() - t
            prep = _run(["--child-prepare", str(root / f"{name}-text"), str(root / f"{name}-prepared")])
            shutil.rmtree(root / f"{name}-text")  # only the shards are needed from here on
            load, mapped = (_run(["--child-load", str(root / f"{name}-prepared"), reader, "--batches",
                                  str(args.batches), "--seq", str(args.seq), "--batch", str(args.batch)])
                            for reader in ("loader", "memmap"))
            train = _run(["--child-train", str(root / f"{name}-prepared"), "--train-steps", str(args.train_steps)])
            rows[name] = dict(size=size, files=files, wrote=wrote, prep=prep, load=load, mapped=mapped, train=train)
            print(f"{name}: {size / MiB:.0f} MiB in {files} files (written in {wrote:.1f} s); prepare "
                  f"{prep['seconds']:.1f} s, {prep['tokens']} tokens in {prep['shards']} shards, peak RSS "
                  f"{prep['VmHWM'] / 1024:.0f} MiB; load {args.batches} batches in {load['seconds']:.2f} s, "
                  f"peak RSS {load['VmHWM'] / 1024:.0f} MiB (after imports {load['base'] / 1024:.0f} MiB; at the "
                  f"end anon {load['RssAnon'] / 1024:.0f} MiB, file-backed {load['RssFile'] / 1024:.0f} MiB)",
                  flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    s, g = rows["small"], rows["large"]
    print(f"\n{'':<28}{'small':>12}{'large':>12}{'large/small':>14}")
    for label, a, b in [("corpus MiB", s["size"] / MiB, g["size"] / MiB),
                        ("prepare peak RSS MiB", s["prep"]["VmHWM"] / 1024, g["prep"]["VmHWM"] / 1024),
                        ("load peak RSS MiB", s["load"]["VmHWM"] / 1024, g["load"]["VmHWM"] / 1024),
                        ("load RssAnon MiB (end)", s["load"]["RssAnon"] / 1024, g["load"]["RssAnon"] / 1024),
                        ("load RssFile MiB (end)", s["load"]["RssFile"] / 1024, g["load"]["RssFile"] / 1024),
                        ("load seconds", s["load"]["seconds"], g["load"]["seconds"]),
                        ("np.memmap reader peak MiB", s["mapped"]["VmHWM"] / 1024, g["mapped"]["VmHWM"] / 1024),
                        ("training peak RSS MiB", s["train"]["VmHWM"] / 1024, g["train"]["VmHWM"] / 1024),
                        ("training seconds", s["train"]["seconds"], g["train"]["seconds"])]:
        print(f"{label:<28}{a:>12.1f}{b:>12.1f}{b / a if a else float('nan'):>14.2f}")


if __name__ == "__main__":
    main()
