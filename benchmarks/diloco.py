"""DiLoCo against synchronous data parallelism at equal tokens: held-out loss and cross-site bytes.

Model `small` (or --model), the embedded corpus (this Python's standard library) split by bytes into a training
part and a held-out last 5%, 2 replicas of one CPU device each (`uniform(2)`). Every run sees the same batches
(the same seed, the same global batch) for the same number of steps:

- sync DP: one `Trainer` on the union batch (mathematically 2 replicas that all-reduce their gradients every
  step; counted as each replica sending its float32 gradient to the other every step);
- DiLoCo at H (codec none and int8), and streaming DiLoCo (F fragments, int8), outer Nesterov lr 0.7 / 0.9.

DiLoCo's held-out loss is the global model's (the last step is a sync). Prints a table and, with --plot FILE, the
training-loss curves (smoothed) as a PNG.

    python benchmarks/diloco.py                  # small, 300 steps, batch 32, H 25, F 5
    python benchmarks/diloco.py --steps 600 --sync-every 50 --plot benchmarks/diloco_loss.png
    python benchmarks/diloco.py --runs streaming --streaming-codec none --sync-heldout 2.2733   # sync DP known
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import numpy as np  # noqa: E402

from hxtrain.config.topology import Diloco, uniform  # noqa: E402
from hxtrain.core import model_registry  # noqa: E402
from hxtrain.core.optim import OptimizerConfig  # noqa: E402
from hxtrain.data import corpus as _corpus, loader as _data  # noqa: E402
from hxtrain.training.diloco import DilocoTrainer  # noqa: E402
from hxtrain.training.trainer import Trainer  # noqa: E402


def _split(folder: str, max_bytes: int) -> tuple[str, str]:
    corpus = _corpus.load_corpus(None, max_bytes=max_bytes)
    cut = int(corpus.size * 0.95)
    paths = (os.path.join(folder, "train.txt"), os.path.join(folder, "heldout.txt"))
    for path, part in zip(paths, (corpus[:cut], corpus[cut:])):
        with open(path, "wb") as f:
            f.write(part.tobytes())
    return paths


def _heldout(pipeline, path: str, seq: int, batch: int, n: int) -> float:
    it = _data.batches(_data.load_data(path), seq=seq, batch_size=batch, seed=1234)
    return float(np.mean([float(pipeline.grads(next(it))[0]) for _ in range(n)]))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--sync-every", type=int, default=25)
    p.add_argument("--fragments", type=int, default=5)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--outer-lr", type=float, default=0.7)
    p.add_argument("--outer-momentum", type=float, default=0.9)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--max-bytes", type=int, default=8_000_000)
    p.add_argument("--plot", help="write the training-loss curves here (PNG)")
    p.add_argument("--runs", default="sync,diloco,int8,streaming",
                   help="which runs, comma-separated (sync DP is always run: it is the yardstick)")
    p.add_argument("--streaming-codec", default="int8", choices=("none", "bf16", "int8", "fp8"),
                   help="the codec of the streaming run's pseudo-gradients")
    p.add_argument("--sync-heldout", type=float, metavar="LOSS",
                   help="sync DP's held-out loss from an earlier run of the same settings: sync DP is then not run "
                        "again (its bytes are counted from the parameters), so runs can go side by side, one per "
                        "process")
    p.add_argument("--sweep-outer", default="", metavar="LR/MU,...",
                   help="also run DiLoCo (codec none) with each of these outer lr / Nesterov momentum pairs")
    args = p.parse_args(argv)
    if args.steps % args.sync_every:
        p.error("--steps must be a multiple of --sync-every (the last step is then a sync)")
    tmp = tempfile.mkdtemp(prefix="hxtrain-diloco-bench-")
    train_path, heldout_path = _split(tmp, args.max_bytes)
    opt = OptimizerConfig.for_steps(args.steps, args.lr)
    H = args.sync_every
    outer = dict(outer_lr=args.outer_lr, outer_momentum=args.outer_momentum)
    every = {"sync": ("sync DP", None), "diloco": (f"DiLoCo H={H}", Diloco(sync_every=H, **outer)),
             "int8": (f"DiLoCo H={H} int8", Diloco(sync_every=H, codec="int8", **outer)),
             "streaming": (f"streaming H={H} F={args.fragments} {args.streaming_codec}",
                           Diloco(sync_every=H, fragments=args.fragments, codec=args.streaming_codec, **outer))}
    wanted = set(args.runs.split(",")) | ({"sync"} if args.sync_heldout is None else set())
    if wanted - set(every):
        p.error(f"--runs: expected some of {sorted(every)}, got {args.runs!r}")
    runs = dict(every[k] for k in every if k in wanted)
    for pair in filter(None, args.sweep_outer.split(",")):
        lr, mu = (float(x) for x in pair.split("/"))
        runs[f"DiLoCo H={H} outer {lr:g}/{mu:g}"] = Diloco(sync_every=H, outer_lr=lr, outer_momentum=mu)
    results, curves = {}, {}
    if args.sync_heldout is not None:  # given, not run: its bytes are each replica's gradient every step
        n_params = sum(int(np.prod(x.shape)) for x in _leaves(model_registry.build(args.model, seed=0)))
        results["sync DP"] = (args.sync_heldout, 2 * 4 * n_params * args.steps, 2 * 4 * n_params, 0.0, float("nan"))
    for name, cfg in runs.items():
        model = model_registry.build(args.model, seed=0)
        t0 = time.perf_counter()
        if cfg is None:
            run = Trainer(model, uniform(1), microbatches=1, batch_size=args.batch_size, optimizer=opt,
                          data=train_path, seed=0)
            rows = run.fit(args.steps, progress=False)
            pipe, seq = run.pipeline, run.seq
            n_params = sum(int(np.prod(x.shape)) for x in _leaves(pipe))
            sent, peak = 2 * 4 * n_params * args.steps, 2 * 4 * n_params  # each replica's gradient, every step
        else:
            run = DilocoTrainer(model, uniform(2), diloco=cfg, microbatches=1, batch_size=args.batch_size,
                                optimizer=opt, data=train_path, seed=0)
            rows = run.fit(args.steps, progress=False)
            pipe, seq = run.replicas[0].pipeline, run.seq
            sent = sum(r["sync_bytes"] for r in rows)
            peak = max(r["sync_bytes"] for r in rows)
        wall = time.perf_counter() - t0
        results[name] = (_heldout(pipe, heldout_path, seq, args.batch_size, args.eval_batches), sent, peak, wall,
                         np.mean([r["loss"] for r in rows[-20:]]))
        curves[name] = [r["loss"] for r in rows]
        print(f"{name}: done in {wall:.0f} s", flush=True)
    ref_loss, ref_sent = results["sync DP"][0], results["sync DP"][1]
    print(f"\nmodel {args.model}, {args.steps} steps x batch {args.batch_size} (equal tokens), 2 replicas, outer lr "
          f"{args.outer_lr} momentum {args.outer_momentum}; "
          f"held-out = last 5% of the corpus, {args.eval_batches} batches")
    print(f"{'run':34} {'held-out':>9} {'vs sync':>8} {'train(last20)':>13} {'bytes sent':>13} {'fewer':>8} "
          f"{'peak B/step':>12} {'wall s':>7}")
    for name, (loss, sent, peak, wall, train) in results.items():
        print(f"{name:34} {loss:9.4f} {loss / ref_loss - 1:+8.2%} {train:13.4f} {sent:13d} "
              f"{ref_sent / sent:7.1f}x {peak:12d} {wall:7.0f}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for name, ys in curves.items():
            k = 10
            smooth = np.convolve(ys, np.ones(k) / k, mode="valid")
            ax.plot(np.arange(k, len(ys) + 1), smooth, label=name)
        ax.set_xlabel("step (equal tokens per step)")
        ax.set_ylabel("training loss, nats/byte (10-step mean)")
        ax.set_title(f"{args.model}: DiLoCo vs synchronous DP, 2 replicas")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=100)
        print(f"plot -> {args.plot}")


def _leaves(pipe_or_model):
    """The parameter arrays of a pipeline's stages, or of an unsplit model."""
    import jax

    if hasattr(pipe_or_model, "stages"):
        return [x for s in pipe_or_model.stages for x in jax.tree_util.tree_leaves(s.params)]
    from flax import nnx

    return jax.tree_util.tree_leaves(nnx.state(pipe_or_model, nnx.Param))


if __name__ == "__main__":
    main()
