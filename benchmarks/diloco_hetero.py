"""DiLoCo with one replica at half speed: the fast replica's idle share of wall time, equal shares vs shares from
a measured profile, side by side in one run.

Two sites as two `hxtrain site` processes (one CPU device each), each a DiLoCo replica. Site a runs alone on core
0; site b runs on core 1, which a busy loop also holds (pinned with `taskset`), so b computes at about half speed.
This is a real slowdown of b's process, not a number handed to the planner.

1. Each site is profiled by itself under the same pinning (`hxtrain profile` on a one-site topology), and the two
   profiles are written as one file.
2. The run with equal shares (lockstep): both replicas take half of every global batch, and the fast one waits at
   every sync for the slow one.
3. The run with `--shares planned:PROFILE`: each replica's rows follow the tokens/s that the planner predicts from
   the measured block times.
4. The run with shares measured in run 2: each replica's rows per second of inner step there, given as explicit
   `--shares` (the user's override).
5. The run with `--shares measured`: equal for the first round, then at every outer step hxtrain deals the rows
   again from the rows per second each replica's inner steps ran at in that round (no profile, no override).

A replica takes its inner steps with no communication, so its idle time is what its sync steps take beyond its
median inner step (waiting for the other replica, the exchange itself included). The share is that over the
replica's wall time of all steps after the first round (compilation and warm-up stay out).

    python benchmarks/diloco_hetero.py [--model small --steps 40 --sync-every 5 --batch-size 32]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hxtrain.sites.launch import launch  # noqa: E402

_SITE = 'name = "{n}"\nbackend = "cpu"\ndevices = 1\ndata = 1\ntensor = 1\n'
PIN = {"a": ["taskset", "-c", "0"], "b": ["taskset", "-c", "1"]}


def _topologies(folder: Path, sync_every: int) -> tuple[Path, dict[str, Path]]:
    both = folder / "two.toml"
    both.write_text(f'name = "hetero"\n[[sites]]\n{_SITE.format(n="a")}\n[[sites]]\n{_SITE.format(n="b")}\n'
                    f'[[links]]\nbetween = ["a", "b"]\nbandwidth_gbps = 10\nlatency_ms = 1\n\n'
                    f'[diloco]\nsync_every = {sync_every}\n')
    alone = {}
    for n in "ab":
        alone[n] = folder / f"only-{n}.toml"
        alone[n].write_text(f'name = "hetero-{n}"\n[[sites]]\n{_SITE.format(n=n)}')
    return both, alone


def _hog(seconds: float) -> subprocess.Popen:
    """A busy loop on core 1 that ends by itself after `seconds`."""
    code = f"import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end:\n    pass\n"
    return subprocess.Popen([*PIN["b"], sys.executable, "-c", code])


def _profile(alone: dict[str, Path], args, folder: Path) -> Path:
    from hxtrain.planning.profile import load_profile, write_profile

    times = []
    for n, mesh in alone.items():
        out = folder / f"profile-{n}.toml"
        subprocess.run([*PIN[n], sys.executable, "-m", "hxtrain", "profile", "--mesh", str(mesh), "--model",
                        args.model, "--microbatch", str(args.microbatch), "--out", str(out)], check=True,
                       stdout=subprocess.DEVNULL)
        times += load_profile(out)
    return write_profile(folder / "profile.toml", times, model=args.model, topology="hetero")


def _run(mesh: Path, args, folder: Path, name: str, shares: str | None) -> dict:
    out = folder / name
    site_args = ["--strategy", "diloco", "--model", args.model, "--steps", str(args.steps), "--batch-size",
                 str(args.batch_size), "--microbatches", "1", "--out", str(out)]
    if shares:
        site_args += ["--shares", shares]
    with open(folder / f"{name}.log", "w") as log:
        exits = launch(str(mesh), site_args, timeout=120.0, prefix=PIN, out=log)
    text = (folder / f"{name}.log").read_text()
    if any(e.returncode for e in exits):
        raise RuntimeError(f"{name}: {exits[0].describe()}\n{text[-3000:]}")
    result = {"rows": {}}
    metrics = {n: [json.loads(x) for x in (out / f"metrics-{n}.jsonl").read_text().splitlines()] for n in "ab"}
    # the rows settle once the round in which they last changed is over (measured shares compile the new shapes
    # in that round); with fixed shares that is the first round
    a = metrics["a"]
    changed = max((r["step"] for r in a[1:] if r["replica_rows"] != a[r["step"] - 2]["replica_rows"]), default=1)
    settled = -(-changed // args.sync_every) * args.sync_every
    for n in "ab":
        rows = metrics[n]
        result[n] = {}
        for key, after in (("", args.sync_every), ("settled_", max(settled, args.sync_every))):
            steady = [r for r in rows if r["step"] > after]
            inner = statistics.median(r["step_s"] for r in steady if r["step"] % args.sync_every)
            idle = sum(max(0.0, r["step_s"] - inner) for r in steady if r["step"] % args.sync_every == 0)
            wall = sum(r["step_s"] for r in steady)
            result[n].update({f"{key}idle_share": idle / wall, f"{key}inner_step_s": inner, f"{key}wall_s": wall})
        result[n]["settled_after"] = max(settled, args.sync_every)
        result["rows"][n] = rows[-1]["replica_rows"]  # of the last step (measured shares: as dealt last)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="small")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--sync-every", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--microbatch", type=int, default=16, help="sequences per microbatch of the profile (16)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    if (os.cpu_count() or 1) < 2:
        print("needs two cores (one per replica)", file=sys.stderr)
        return 2
    hog = _hog(1800.0)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            mesh, alone = _topologies(tmp, args.sync_every)
            profile = _profile(alone, args, tmp)
            results = {}
            for name in ("equal", "profiled", "override", "measured"):
                shares = {"equal": None, "profiled": f"planned:{profile}", "measured": "measured"}.get(name)
                if name == "override":  # rows per second of inner step in the lockstep run, given as --shares
                    eq = results["equal"]
                    shares = ",".join(f"{eq['rows'][n] / eq[n]['inner_step_s']:.3f}" for n in "ab")
                results[name] = _run(mesh, args, tmp, name, shares)
                r = results[name]
                print(f"{name}: rows a {r['rows']['a']}, b {r['rows']['b']}; idle share a "
                      f"{r['a']['idle_share']:.1%}, b {r['b']['idle_share']:.1%}; inner step a "
                      f"{r['a']['inner_step_s'] * 1e3:.1f} ms, b {r['b']['inner_step_s'] * 1e3:.1f} ms", flush=True)
    finally:
        hog.kill()
    eq = results["equal"]
    print(f"\nmodel {args.model}, {args.steps} steps, batch {args.batch_size}, sync every {args.sync_every}; site b "
          f"shares its core with a busy loop")
    print("shares | rows a | rows b | fast replica idle | slow replica idle | wall after round 1 | vs equal | "
          "rows settled after step | fast replica idle from then | wall per step from then vs equal")
    for name, r in results.items():
        a, per = r["a"], lambda x: x["settled_wall_s"] / (args.steps - x["settled_after"])  # noqa: E731
        print(f"{name} | {r['rows']['a']} | {r['rows']['b']} | {a['idle_share']:.1%} | {r['b']['idle_share']:.1%}"
              f" | {a['wall_s']:.2f} s | {a['wall_s'] / eq['a']['wall_s']:.2f}x | {a['settled_after']} | "
              f"{a['settled_idle_share']:.1%} | {per(a) / per(eq['a']):.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
