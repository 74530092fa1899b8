"""Elastic pipeline runs: how long a lost site costs, and what the launcher's compilation cache saves.

    python benchmarks/elastic.py [--model tiny] [--rounds 3]

1. Restart compile, side by side: a 2-site `hxtrain launch` of a few steps, alternately with no JAX compilation
   cache and with a cache the previous launch of the same topology filled (what `launch --elastic` keeps for the
   segments of one run). Prints each site's "compiled in" seconds and the cached/uncached ratio.
2. Recovery: `hxtrain launch --elastic` on 2 sites, site b SIGKILLed when it logs step 5 (save every 2): seconds
   from the kill until the survivor runs its first step again, the step it went back to, the steps lost, and the
   seconds until the rejoined pair runs again.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from hxtrain.sites.elastic import CACHE_EVERYTHING  # noqa: E402


def topology(folder: Path, model: str, steps: int) -> Path:
    text = "".join(f'[[sites]]\nname = "{s}"\nbackend = "cpu"\ndevices = 1\ndata = 1\ntensor = 1\n' for s in "ab")
    text += '[[links]]\nbetween = ["a", "b"]\nbandwidth_gbps = 100\nlatency_ms = 1.0\n'
    text += f'[run]\nmodel = "{model}"\nschedule = "1f1b"\nmicrobatches = 2\nbatch_size = 4\nsteps = {steps}\n'
    path = folder / "two.toml"
    path.write_text(text)
    return path


def launch(mesh: Path, *args, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "hxtrain", "launch", "--mesh", str(mesh), "--timeout", "20",
                             *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env={**os.environ, **(env or {})})


def compile_seconds(mesh: Path, cache: str | None) -> list[float]:
    env = {"JAX_COMPILATION_CACHE_DIR": cache, **CACHE_EVERYTHING} if cache else {}  # as launch --elastic sets it
    env = {**env, "JAX_ENABLE_COMPILATION_CACHE": "true" if cache else "false"}
    proc = launch(mesh, "--steps", 2, env=env)
    out, _ = proc.communicate(timeout=600)
    if proc.returncode != 0:
        raise SystemExit(out)
    return [float(x) for x in re.findall(r"compiled in ([\d.]+) s", out)]


def recovery(mesh: Path, folder: Path) -> dict:
    proc = launch(mesh, "--elastic", "--save-every", 2, "--checkpoint-dir", folder / "D", "--out", folder / "out")
    pid, killed, got = None, None, {}
    for line in proc.stdout:
        now = time.monotonic()
        if pid is None and (m := re.match(r"\[launch\] site 'b': pid (\d+)", line)):
            pid = int(m[1])
        elif killed is None and line.startswith("[b] step 5 "):
            os.kill(pid, signal.SIGKILL)
            killed = now
        elif (m := re.search(r"going on from step (\d+), .*\((\d+) steps lost\)", line)):
            got.update(step=int(m[1]), lost=int(m[2]), noticed_s=now - killed)
        elif "continued from step" in line and "resumed_s" not in got and killed is not None:
            got["resumed_s"] = now - killed
        elif re.match(r"\[a\] step \d+ loss", line) and "first_step_s" not in got and killed is not None:
            got["first_step_s"] = now - killed
        elif "rejoin at step" in line:
            got["rejoin_at"] = now
        elif "rejoin_at" in got and "rejoined_step_s" not in got and re.match(r"\[b\] step \d+ loss", line):
            got["rejoined_step_s"] = now - got.pop("rejoin_at")
    proc.wait(600)
    if proc.returncode != 0 or "first_step_s" not in got:
        raise SystemExit(f"elastic run failed (exit {proc.returncode}): {got}")
    return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="hxtrain-bench-elastic-") as tmp:
        tmp = Path(tmp)
        mesh = topology(tmp, args.model, steps=8)
        cache = str(tmp / "cache")
        compile_seconds(mesh, cache)  # fill the cache, as an elastic run's first segment does
        cold, warm = [], []
        for r in range(args.rounds):  # alternating, so that load changes hit both alike
            for label, sink, c in (("no cache", cold, None), ("cache", warm, cache))[:: 1 if r % 2 == 0 else -1]:
                got = compile_seconds(mesh, c)
                sink.append(max(got))
                print(f"round {r}: {label:8s} compiled in {', '.join(f'{x:.1f}' for x in got)} s", flush=True)
        ratio = statistics.median(w / c for w, c in zip(warm, cold))
        print(f"restart compile, {args.model}: no cache {statistics.median(cold):.1f} s, cache "
              f"{statistics.median(warm):.1f} s, cache/no-cache median ratio {ratio:.2f}")
        rec = recovery(topology(tmp, args.model, steps=8), tmp)
        print(f"recovery, {args.model}: the launcher named the lost site {rec['noticed_s']:.1f} s after the kill; "
              f"the survivor continued from step {rec['step']} ({rec['lost']} steps lost) and ran its first step "
              f"{rec['first_step_s']:.1f} s after the kill; the rejoined pair ran its first step "
              f"{rec.get('rejoined_step_s', float('nan')):.1f} s after the rejoin")


if __name__ == "__main__":
    main()
