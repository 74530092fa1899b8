"""The command-line flags of a run, the same for `hxtrain train`, `hxtrain site` and `hxtrain launch`, and the
argparse types that check them (a bad value is a one-line usage error naming the flag)."""

from __future__ import annotations

import argparse


def parse_partition(text: str) -> tuple[int, ...]:
    """`--partition 5,3` -> (5, 3): blocks per stage."""
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected blocks per stage like 5,3; got {text!r}") from None


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return value


def add_run_arguments(p, *, out_help: str) -> None:
    """The flags of a run, the same for `hxtrain train`, `hxtrain site` and `hxtrain launch`; None = the
    topology's [run] table (`RunDefaults.fill`)."""
    p.add_argument("--mesh", default="local", help="topology TOML file or shipped name (default: local)")
    p.add_argument("--model", help="model preset: tiny, small, ... (default: the topology's [run] model)")
    p.add_argument("--schedule", help="gpipe, 1f1b, interleaved, zb-h1 or a table file (default: the topology's)")
    p.add_argument("--microbatches", type=int)
    p.add_argument("--batch-size", type=int, help="global batch in sequences")
    p.add_argument("--steps", type=int)
    p.add_argument("--data", help="a text file or folder, or a folder from `hxtrain prepare` (default: this "
                                   "Python's standard library sources)")
    p.add_argument("--out", help=out_help)
    p.add_argument("--partition", type=parse_partition, help="blocks per stage, e.g. 5,3 (default: the topology's "
                                                              "layers, else even)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=_seed, default=0, help="seed of the model's initialisation and the data order")
    p.add_argument("--eval-every", type=int, default=0, metavar="N",
                   help="the held-out loss every N steps and at the end, through the pipeline's forward only "
                        "(default 0: none, and every document trains; N >= 1 holds documents out)")
    p.add_argument("--eval-batches", type=int, default=4, metavar="K",
                   help="held-out batches per evaluation (default 4)")
    p.add_argument("--timeline", metavar="FILE",
                   help="write one step's per-site tasks and transfers as a Chrome trace (Perfetto) and print each "
                        "site's busy/idle %% next to the analytic bubble; recording waits on every task's outputs "
                        "(in watcher threads), so that step runs somewhat slower. A site process writes FILE with "
                        "-<site> before its suffix; what it waited for from another site shows as transfer")
    p.add_argument("--timeline-step", type=int, metavar="N", help="which step --timeline records (default: the last)")
