"""The checks that need an accelerator, prepared as one short run for a lent GPU machine (issue 4).

    python benchmarks/device_check.py --out "$OUT"           # on the GPU machine: ~3-5 min, cuda + cpu
    python benchmarks/device_check.py --stand-in cpu         # here: the same code with the "GPU" site on the CPU

`--stand-in cpu` only checks that the script runs; it measures nothing about GPUs, and says so in its output.

1. info: `hxtrain info` (which backends initialise, their devices and capabilities).
2. CPU+GPU in one process: sites a = GPU (1 device) and b = CPU (1 device), `small`, 1F1B, 4 microbatches, a few
   optimizer steps, against the same run with both sites on the CPU. With both sites at fp32 (matmul precision
   "highest": JAX's default lets GPUs use TF32 for fp32 dots) the first step's loss must agree within 1e-5 and
   later steps within 1e-4 (other hardware, other reduction orders; Adam amplifies the differences); with the GPU
   site at its policy dtype (bf16) within 2e-2.
3. CPU+GPU as two processes: `hxtrain launch` of the same topology at fp32 for 3 steps; site b's losses against
   the in-process run of the same topology, within 1e-5.
4. MFU of a site's stage program: `hxtrain.planning.profile` times the forward and backward programs of a middle stage of
   the `350m` preset on the GPU site (bf16, microbatch 8 x 2048 tokens); model FLOPs per block and microbatch
   (3 x forward: the forward, and the backward's two matmuls per forward one) over (forward + backward time) and
   the device's dense bf16 peak. The backward program recomputes its forward, so the hardware does 4 x forward:
   the hardware utilisation is 4/3 of the MFU printed.

Everything printed also goes to OUT/device_check.json. Exit status 1 when a tolerance is missed.
The GPU image has jax, flax, optax and orbax but not grain: carry grain's wheel (and its needs that the image
lacks, e.g. array-record, dm-tree) as the device tool's README says.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # as the CLI sets it

TOPOLOGY = """
[[sites]]
name = "a"
backend = "{gpu}"
devices = 1
data = 1
tensor = 1
compute_dtype = "float32"

[[sites]]
name = "b"
backend = "cpu"
devices = 1
data = 1
tensor = 1
compute_dtype = "float32"

[[links]]
between = ["a", "b"]
bandwidth_gbps = 100
latency_ms = 1.0

[run]
model = "small"
schedule = "1f1b"
microbatches = 4
batch_size = 16
steps = {steps}
"""


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def losses(topology, steps: int) -> list[float]:
    """Per-step losses of the Trainer `hxtrain site` derives for `steps` steps (same optimizer, data and seed)."""
    import hxtrain
    from hxtrain.core.optim import OptimizerConfig
    from hxtrain.training.trainer import build_model

    opt = OptimizerConfig.for_steps(steps)
    trainer = hxtrain.Trainer(build_model("small"), topology, schedule="1f1b", microbatches=4, batch_size=16,
                              optimizer=opt)
    return [float(r["loss"]) for r in trainer.fit(steps, progress=False)]


def compare(name: str, got: list[float], want: list[float], first_tol: float, tol: float, report: dict) -> bool:
    errs = [rel(g, w) for g, w in zip(got, want)]
    ok = len(got) == len(want) and errs[0] <= first_tol and max(errs) <= tol
    report[name] = {"losses": got, "reference": want, "rel_err": errs, "first_tol": first_tol, "tol": tol, "ok": ok}
    print(f"{name}: rel err per step {['%.2e' % e for e in errs]} (step 1 <= {first_tol:g}, all <= {tol:g}): "
          f"{'ok' if ok else 'MISSED'}", flush=True)
    return ok


def check_in_process(gpu: str, steps: int, report: dict) -> bool:
    import jax

    import hxtrain

    cpu_only = hxtrain.uniform(2).replace_sites(compute_dtype="float32")
    mixed = cpu_only.replace_site("s0", backend=gpu)
    with jax.default_matmul_precision("highest"):
        t0 = time.perf_counter()
        ref = losses(cpu_only, steps)
        t1 = time.perf_counter()
        got = losses(mixed, steps)
        t2 = time.perf_counter()
    report["in_process_seconds"] = {"cpu+cpu": t1 - t0, f"{gpu}+cpu": t2 - t1}
    ok = compare(f"in-process {gpu}+cpu fp32 vs cpu+cpu", got, ref, 1e-5, 1e-4, report)
    policy = mixed.replace_site("s0", compute_dtype=None)  # the GPU's policy dtype (bf16 on NVIDIA)
    from hxtrain.core import placement

    dtype = placement.site_compute_dtype(policy.sites[0])
    got16 = losses(policy, steps)
    return compare(f"in-process {gpu}({dtype})+cpu vs cpu+cpu fp32", got16, ref, 2e-2, 2e-2, report) and ok


def check_processes(gpu: str, report: dict) -> bool:
    import jax

    import hxtrain

    with tempfile.TemporaryDirectory() as tmp:
        mesh = Path(tmp) / "mixed.toml"
        mesh.write_text(TOPOLOGY.format(gpu=gpu, steps=3))
        env = dict(os.environ, JAX_DEFAULT_MATMUL_PRECISION="highest")
        t0 = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", "hxtrain", "launch", "--mesh", str(mesh), "--timeout", "120",
                              "--out", str(Path(tmp) / "out")], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=400)
        report["launch_seconds"] = time.perf_counter() - t0
        print(run.stdout[-3000:], flush=True)
        if run.returncode != 0:
            report["launch"] = {"ok": False, "rc": run.returncode, "tail": run.stdout[-3000:] + run.stderr[-2000:]}
            print(f"launch failed with {run.returncode}", flush=True)
            return False
        rows = [json.loads(x) for x in (Path(tmp) / "out" / "metrics-b.jsonl").read_text().splitlines()]
        with jax.default_matmul_precision("highest"):
            ref = losses(hxtrain.load_topology(mesh), 3)
    return compare(f"two processes {gpu}+cpu vs in-process {gpu}+cpu", [float(r["loss"]) for r in rows], ref,
                   1e-5, 1e-5, report)


def check_mfu(gpu: str, stand_in: bool, report: dict) -> None:
    import dataclasses

    import jax

    import hxtrain
    from hxtrain import backends
    from hxtrain.planning import costmodel
    from hxtrain.planning import profile
    from models import gpt

    name, microbatch = ("tiny", 8) if stand_in else ("350m", 8)
    cfg = dataclasses.replace(gpt.PRESETS[name], n_layers=2)
    topo = hxtrain.uniform(1, backend=gpu).replace_sites(compute_dtype="bfloat16")
    (t,) = profile.profile_sites(gpt.build(cfg), topo, microbatch=microbatch, repeats=5)
    mm, att = costmodel.ModelShape.of(cfg).block_flops(cfg.seq_len)  # per sequence, scores computed in full
    model_flops = 3 * (mm + att) * microbatch  # per block and microbatch: forward + backward
    seconds = t.fwd_block + t.bwd_block
    kind = jax.devices(gpu)[0].device_kind
    cap = backends.capability_for(kind)
    peak = cap.peak_flops("bfloat16") if cap.known else None
    mfu = model_flops / seconds / peak if peak else None
    report["mfu"] = {"model": name, "microbatch": microbatch, "seq": cfg.seq_len, "device_kind": kind,
                     "fwd_block_s": t.fwd_block, "bwd_block_s": t.bwd_block, "model_flops": model_flops,
                     "peak_flops": peak, "mfu": mfu}
    print(f"stage program on {kind}: {name} block, microbatch {microbatch} x {cfg.seq_len}, bf16: forward "
          f"{t.fwd_block * 1e3:.2f} ms + backward {t.bwd_block * 1e3:.2f} ms per block; "
          f"{model_flops / seconds / 1e12:.2f} TFLOP/s model; "
          + (f"MFU {mfu:.1%} of {peak / 1e12:.3g} TFLOP/s" if mfu else "no known peak for this device kind"),
          flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stand-in", choices=["cpu"], help="run the GPU site on the CPU (checks the script only)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--out", default=None, help="folder for device_check.json")
    args = p.parse_args(argv)
    gpu = args.stand_in or "cuda"
    report: dict = {"stand_in": bool(args.stand_in), "backend": gpu}
    if args.stand_in:
        print("STAND-IN: the 'GPU' site runs on the CPU; nothing here measures a GPU", flush=True)
    info = subprocess.run([sys.executable, "-m", "hxtrain", "info"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    print(info.stdout, info.stderr[-2000:], flush=True)
    report["info"] = info.stdout
    import jax

    report["jax"] = jax.__version__
    report["devices"] = [str(d) for d in jax.devices(gpu)]
    ok = check_in_process(gpu, args.steps, report)
    ok = check_processes(gpu, report) and ok
    check_mfu(gpu, bool(args.stand_in), report)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "device_check.json").write_text(json.dumps(report, indent=1, default=str))
    print("all within tolerance" if ok else "SOME CHECK MISSED ITS TOLERANCE", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
