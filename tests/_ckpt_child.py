"""Helper for tests/test_checkpoint.py: a small run that saves every step and SIGKILLs itself at a chosen point.

    python tests/_ckpt_child.py OUT --kill-at POINT --kill-step K --steps N

Prints `done <step> <checksum>` after each step whose checkpoint is sealed (checksum: float64 sum of every
parameter, in logical order, so the parent can compare a restored model exactly). Kill points, all at step K:
    during-write   right after orbax's async save started (the step folder is a temporary one or unsealed)
    before-seal    orbax has finished and renamed the step folder; the manifest is not written yet
    mid-seal       half of the manifest's temporary file is written
"""

import os
import signal
import sys
from pathlib import Path

if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import hxtrain  # noqa: E402
from hxtrain.checkpoints import logical  # noqa: E402
from hxtrain.checkpoints import manifest
from hxtrain.checkpoints import checkpoint as ckpt  # noqa: E402
from models import gpt  # noqa: E402

CFG = gpt.GPTConfig(seq_len=8, d_model=16, n_heads=2, n_layers=2, d_ff=32)


def make_trainer(out, seed: int = 0, **kw) -> hxtrain.Trainer:
    """The child's run, also rebuilt by the parent to restore into: 1 site of 1 device."""
    return hxtrain.Trainer(gpt.build(CFG, seed=seed), hxtrain.uniform(1), microbatches=1, batch_size=4,
                           out=out, max_corpus_bytes=50_000, **kw)


def checksum(trainer) -> float:
    return float(sum(np.asarray(x, np.float64).sum() for x in
                     jax.tree.leaves(logical.to_logical(trainer.pipeline)["params"])))


def _die(*_):
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def main(argv):
    out, point, kill_step, steps = argv[0], argv[2], int(argv[4]), int(argv[6])
    # keep=1: only the newest *sealed* step may count, or a kill before the seal would leave nothing to restore
    trainer = make_trainer(out, save_every=1, keep=1, resume="never")
    folder = Path(out) / "checkpoints"

    if point == "during-write":
        original = ckpt.Checkpoints.save

        def save(self, tr, *, force=False):
            started = original(self, tr, force=force)
            if started and tr.step == kill_step:
                print("listing", " ".join(sorted(os.listdir(folder))), flush=True)
                _die()
            return started

        ckpt.Checkpoints.save = save
    elif point in ("before-seal", "mid-seal"):
        original_seal = manifest.seal

        def seal(step_dir):
            if Path(step_dir).name == str(kill_step):
                if point == "mid-seal":
                    (Path(step_dir) / (manifest.MANIFEST + ".tmp")).write_text('{"files": {"par')
                _die()
            return original_seal(step_dir)

        manifest.seal = seal
    else:
        raise SystemExit(f"unknown kill point {point!r}")

    for _ in range(steps):
        trainer.fit(1, progress=False)  # saves (save_every=1) and seals at the end of fit
        print(f"done {trainer.step} {checksum(trainer)!r}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
