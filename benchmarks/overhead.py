"""Engine overhead: one hxtrain step on 1 site x 1 device vs a plain `jax.jit(nnx.value_and_grad)` + optax step.

Same model (`small` by default), same batch, same optimizer (AdamW, warmup-cosine, global-norm clipping). The two
are alternated step by step in one run (the machine is shared and noisy) and the median of per-step ratios is
printed. Target: <= 1.10 on `small`.

    python benchmarks/overhead.py [--model small] [--steps 30] [--batch 32] [--microbatches 1]
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import hxtrain
from hxtrain.config import topology as T
from hxtrain.core.optim import OptimizerConfig
from hxtrain.training.trainer import build_model


def plain_step_fn(graphdef, tx, clip):
    def loss_fn(params, tokens):
        from models import gpt

        return gpt.loss(nnx.merge(graphdef, params), tokens)

    @jax.jit
    def step(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
        norm = optax.global_norm(grads)
        grads = jax.tree.map(lambda g: g * jnp.minimum(1.0, clip / (norm + 1e-6)), grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="small")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--microbatches", type=int, default=1)
    args = ap.parse_args()

    model = build_model(args.model)
    seq = model.cfg.seq_len
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 256, (args.batch, seq + 1)).astype(np.int32) for _ in range(4)]
    opt = OptimizerConfig(total_steps=10 * args.steps)

    trainer = hxtrain.Trainer(model, T.uniform(1), microbatches=args.microbatches, batch_size=args.batch,
                              optimizer=opt, max_corpus_bytes=100_000)
    graphdef, params = nnx.split(model, nnx.Param)
    params = jax.tree.map(jnp.copy, nnx.to_pure_dict(params))  # its own buffers: the plain step donates them
    tx = optax.adamw(opt.schedule(), b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay)
    opt_state = tx.init(params)
    plain = plain_step_fn(graphdef, tx, opt.clip_norm)

    def run_hx(tokens):
        m = trainer.train_step(tokens)
        jax.block_until_ready((m, [s.params for s in trainer.pipeline.stages]))

    def run_plain(tokens):
        nonlocal params, opt_state
        params, opt_state, loss = plain(params, opt_state, jnp.asarray(tokens))
        jax.block_until_ready((params, loss))

    for i in range(3):  # compile and warm up both
        run_hx(batches[i % 4])
        run_plain(batches[i % 4])
    ratios, t_hx, t_plain = [], [], []
    for i in range(args.steps):
        b = batches[i % 4]
        order = (run_hx, run_plain) if i % 2 == 0 else (run_plain, run_hx)  # alternate who goes first
        times = {}
        for fn in order:
            t0 = time.perf_counter()
            fn(b)
            times[fn] = time.perf_counter() - t0
        t_hx.append(times[run_hx])
        t_plain.append(times[run_plain])
        ratios.append(times[run_hx] / times[run_plain])
    print(f"model={args.model} batch={args.batch} microbatches={args.microbatches} steps={args.steps} "
          f"device={jax.devices()[0].device_kind}")
    print(f"median step: hxtrain {statistics.median(t_hx) * 1e3:.1f} ms, plain jit {statistics.median(t_plain) * 1e3:.1f} ms")
    print(f"median ratio hxtrain/plain = {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
