"""Bytes and step time per link for boundary codecs none / bf16 / int8, two sites as two processes.

    python benchmarks/transport.py [--model small --steps 12 --batch-size 16 --microbatches 4 --pin]

For each codec (on activations and cotangents both), one run over loopback and, side by side, one over an emulated
WAN (10 ms one way, 1 Gbit/s):
  1. `ip netns` + veth + `tc netem delay 10ms rate 1gbit`, each site in its own network namespace, when the machine
     allows it (root, and a kernel with sch_netem);
  2. otherwise the reason is printed, and a user-space relay on loopback stands in: it holds every chunk for the
     delay and paces it at the rate (both directions), so the sites see the same latency and bandwidth.
Step time is the median over steps after the first two (the last two, recorded for the timeline, left out); bytes
are per step and per directed link (frames, headers included) and the codec payload alone.

The schedules: `--schedules 1f1b,planned` (default) runs today's 1F1B and the one `hxtrain plan` chooses for this
link at this batch and microbatch count, from the block times `hxtrain profile` measures first. Each run records its
last step (`hxtrain site --timeline`); the table then shows, per schedule, the WAN step the simulator predicts from
the loopback run's recorded task times (the loopback step + the simulated WAN makespan - the simulated loopback
makespan) and the planner's own prediction from the profile, each with its error against the measured WAN step.
`--pin` puts site a on CPU 0 and b on CPU 1, so the sites compute side by side as separate machines would; without
it both sites share every core, and a site that waits for the link lends its core to the other.

    python benchmarks/transport.py --overlap-ab 3 [--model small --codecs none]

instead runs the loopback pair with overlapped sends (the default) and with synchronous ones (`hxtrain site
--sync-sends`), alternating the order each round, and prints the step times side by side with their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hxtrain.sites.launch import free_port, launch  # noqa: E402

DELAY_S, RATE_BPS = 0.010, 1e9
NS = ("hxbench_a", "hxbench_b")
IPS = ("10.203.7.1", "10.203.7.2")


def _topology(folder: Path, codec: str, latency_ms: float = DELAY_S * 1e3) -> Path:
    sites = "".join(f'[[sites]]\nname = "{n}"\nbackend = "cpu"\ndevices = 1\ndata = 1\ntensor = 1\n\n' for n in "ab")
    link = (f'[[links]]\nbetween = ["a", "b"]\nbandwidth_gbps = {RATE_BPS / 1e9:g}\nlatency_ms = {latency_ms:g}\n'
            f'activations = "{codec}"\ncotangents = "{codec}"\n')
    path = folder / f"two-{codec}.toml"
    path.write_text(f'name = "bench-{codec}"\n{sites}{link}')
    return path


_SYNC_MARK = "sends synchronous"  # what `hxtrain site --sync-sends` logs


def _run(mesh: Path, args, out: Path, extra_args=(), schedule: str = "1f1b", timeline: bool = False, **kw) -> dict:
    """One launch of the two sites; with `timeline`, each site also records its last step (and the one before,
    dropped), which are then left out of the step median. `args.pin`: site a on CPU 0, b on CPU 1."""
    site_args = [*extra_args, "--model", args.model, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                 "--microbatches", str(args.microbatches), "--schedule", schedule, "--out", str(out)]
    if timeline:
        site_args += ["--timeline", str(out / "timeline.json")]
    if getattr(args, "pin", False):
        kw["prefix"] = {n: ["taskset", "-c", str(i), *kw.get("prefix", {}).get(n, [])] for i, n in enumerate("ab")}
    log = open(out.with_suffix(".log"), "w")
    exits = launch(str(mesh), site_args, timeout=60.0, out=log, **kw)
    log.close()
    if any(e.returncode for e in exits):
        raise RuntimeError(f"{exits[0].describe()}; see {out.with_suffix('.log')}")
    rows = {s: [json.loads(x) for x in (out / f"metrics-{s}.jsonl").read_text().splitlines()] for s in "ab"}
    steady = rows["b"][2:-2 if timeline else None] or rows["b"]
    traces = {s: json.loads((out / f"timeline-{s}.json").read_text()) for s in "ab"} if timeline else None
    return {"step_s": statistics.median(r["step_s"] for r in steady), "traces": traces,
            "bytes": {**rows["a"][-1]["bytes_per_link"], **rows["b"][-1]["bytes_per_link"]},
            "payload": {**rows["a"][-1]["payload_bytes_per_link"], **rows["b"][-1]["payload_bytes_per_link"]},
            "loss": rows["b"][-1]["loss"], "steps_s": [r["step_s"] for r in steady],
            "log": out.with_suffix(".log").read_text()}


# ---- emulated WAN, 1: network namespaces + tc netem ------------------------------------------------------------


def _sh(*cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise OSError(f"`{' '.join(cmd)}` failed: {(r.stderr or r.stdout).strip()}")


def netns_up(delay: float = DELAY_S) -> None:
    """Two namespaces joined by a veth pair, netem on both ends; OSError saying which step failed."""
    netns_down()
    for ns in NS:
        _sh("ip", "netns", "add", ns)
    _sh("ip", "link", "add", "hxbva", "type", "veth", "peer", "name", "hxbvb")
    for ns, dev, ip in zip(NS, ("hxbva", "hxbvb"), IPS):
        _sh("ip", "link", "set", dev, "netns", ns)
        _sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
        _sh("ip", "-n", ns, "link", "set", dev, "up")
        _sh("ip", "-n", ns, "link", "set", "lo", "up")
        _sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "netem", "delay",
            f"{delay * 1e3:g}ms", "rate", f"{RATE_BPS / 1e9:g}gbit")


def netns_down() -> None:
    for ns in NS:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


# ---- emulated WAN, 2: a user-space relay -------------------------------------------------------------------------


class Relay:
    """Listens on a loopback port and forwards to `target`, holding each chunk `delay` s and pacing at `rate`
    bit/s, in both directions (one relay = one emulated link)."""

    def __init__(self, target: tuple[str, int], delay: float = DELAY_S, rate: float = RATE_BPS):
        self.target, self.delay, self.rate = target, delay, rate
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            server = self._dial()
            if server is None:  # the target never came up: drop the client, which then reports it
                client.close()
                continue
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for src, dst in ((client, server), (server, client)):
                q: queue.Queue = queue.Queue()
                threading.Thread(target=self._read, args=(src, q), daemon=True).start()
                threading.Thread(target=self._write, args=(dst, q), daemon=True).start()

    def _dial(self, patience: float = 120.0):
        # The site behind the relay may still be starting (importing JAX) when its peer dials: retry, as
        # Endpoint.connect does for a direct link.
        deadline = time.monotonic() + patience
        while time.monotonic() < deadline:
            try:
                server = socket.create_connection(self.target, timeout=5)
                server.settimeout(None)  # idle links (sites compiling) are fine; only the sites judge silence
                return server
            except OSError:
                time.sleep(0.1)
        return None

    def _read(self, src, q):
        while True:
            try:
                chunk = src.recv(1 << 16)
            except OSError:
                chunk = b""
            q.put((time.monotonic(), chunk))
            if not chunk:
                return

    def _write(self, dst, q):
        free = 0.0  # when the emulated wire is next free
        while True:
            t, chunk = q.get()
            if not chunk:
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            start = max(t, free)
            free = start + len(chunk) * 8 / self.rate
            wait = start + self.delay - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            try:
                dst.sendall(chunk)
            except OSError:
                return

    def close(self):
        self.sock.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="small")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--codecs", default="none,bf16,int8")
    p.add_argument("--schedules", default="1f1b,planned",
                   help="schedules to run; 'planned' is the one `hxtrain plan` chooses for this link at this batch "
                        "and microbatch count, from block times `hxtrain profile` measures first (default: "
                        "1F1B and the planned one)")
    p.add_argument("--delay-ms", type=float, default=DELAY_S * 1e3, help="the WAN's one-way latency (default 10)")
    p.add_argument("--pin", action="store_true",
                   help="pin site a to CPU 0 and site b to CPU 1 (taskset), so the two sites compute side by side "
                        "like separate machines instead of sharing every core")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--overlap-ab", type=int, default=0, metavar="ROUNDS",
                   help="instead: loopback runs with overlapped vs synchronous sends, ROUNDS of each, alternating")
    args = p.parse_args(argv)
    if args.overlap_ab:
        return overlap_ab(args)

    wan, why = "netem", ""
    try:
        netns_up(args.delay_ms / 1e3)
    except OSError as e:
        netns_down()
        wan, why = "relay", str(e)
        print(f"tc netem WAN skipped: {why}\n-> using a user-space relay on loopback "
              f"({args.delay_ms:g} ms one way, {RATE_BPS / 1e9:g} Gbit/s) instead", flush=True)
    results = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            planner = _planned(_topology(tmp, "none", args.delay_ms), args, tmp)
            schedules = [planner["schedule"] if x == "planned" else x for x in args.schedules.split(",")]
            for schedule in dict.fromkeys(schedules):
                for codec in args.codecs.split(","):
                    mesh = _topology(tmp, codec, args.delay_ms)
                    name = f"{schedule.replace(':', '-')}-{codec}"
                    local = _run(mesh, args, tmp / f"{name}-local", schedule=schedule, timeline=True)
                    if wan == "netem":
                        ports = (29511, 29512)
                        wide = _run(mesh, args, tmp / f"{name}-wan", schedule=schedule, timeline=True,
                                    addresses={n: f"{ip}:{pt}" for n, ip, pt in zip("ab", IPS, ports)},
                                    prefix={n: ["ip", "netns", "exec", ns] for n, ns in zip("ab", NS)})
                    else:
                        b_port = free_port()
                        relay = Relay(("127.0.0.1", b_port), delay=args.delay_ms / 1e3)
                        try:
                            wide = _run(mesh, args, tmp / f"{name}-wan", schedule=schedule, timeline=True,
                                        addresses={"b": f"127.0.0.1:{b_port}"},
                                        extra={"a": ["--connect", f"b=127.0.0.1:{relay.port}"]})
                        finally:
                            relay.close()
                    sim = _simulated(local, wide, schedule, args)
                    sim["planner_s"] = planner["by_schedule"].get(schedule) if codec == "none" else None
                    results.append({"schedule": schedule, "codec": codec, "local": local, "wan": wide, "sim": sim})
                    print(f"{schedule} {codec}: local {local['step_s'] * 1e3:.1f} ms/step, WAN "
                          f"{wide['step_s'] * 1e3:.1f} ms/step, predicted {sim['wan_s'] * 1e3:.1f}", flush=True)
    finally:
        if wan == "netem":
            netns_down()
    _print(results, args, wan, planner)
    if args.json:
        for r in results:
            for side in ("local", "wan"):
                r[side].pop("traces", None)
        Path(args.json).write_text(json.dumps({"wan": wan, "wan_skipped_because": why, "planner": planner,
                                               "results": results}, indent=1))
    return 0


# ---- what hxtrain would choose, and what the simulator predicts -------------------------------------------------


def _planned(mesh: Path, args, tmp: Path) -> dict:
    """The planner's schedule for this link at --batch-size and --microbatches (even layers, as the runs use),
    from block times `hxtrain profile` measures here (pinned to one CPU under --pin, as a site runs), and its
    predicted step for every schedule it could choose."""
    prof = tmp / "profile.toml"
    cmd = [sys.executable, "-m", "hxtrain", "profile", "--mesh", str(mesh), "--model", args.model,
           "--microbatch", str(args.batch_size // args.microbatches), "--out", str(prof)]
    subprocess.run((["taskset", "-c", "0"] if args.pin else []) + cmd, check=True, capture_output=True)
    from hxtrain.config.topology import load_topology
    from hxtrain.core import model_registry
    from hxtrain.planning import planner
    from hxtrain.planning.profile import load_site_profiles

    topo, cfg = load_topology(str(mesh)), model_registry.preset(args.model)
    profiles = load_site_profiles(str(prof), topo)
    kw = dict(global_batch=args.batch_size, microbatch_choices=[args.microbatches], profiles=profiles,
              codecs=("none",), reorder=False)  # the runs keep the sites in the mesh's order
    chosen = planner.plan(topo, cfg, **kw).predicted
    by_schedule = {}
    for name in ("gpipe", "1f1b", "1f1b:2", "1f1b:4", "zb-h1", chosen.schedule):
        try:
            by_schedule[name] = planner.plan(topo, cfg, schedules=(name,), **kw).predicted.step_s
        except planner.PlanError:
            pass
    print(f"planner (profile of {args.model}, microbatch {args.batch_size // args.microbatches}): chooses "
          f"{chosen.schedule}, {chosen.microbatches} microbatches, layers {[x.layers for x in chosen.sites]}, "
          f"{chosen.step_s * 1e3:.1f} ms/step on the {args.delay_ms:g} ms link; per schedule (ms): "
          + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in by_schedule.items()), flush=True)
    return {"schedule": chosen.schedule, "step_s": chosen.step_s, "by_schedule": by_schedule}


def _simulated(local: dict, wide: dict, schedule: str, args) -> dict:
    """The WAN step as the simulator predicts it from the loopback run: each task's time from the loopback run's
    recorded step (per site, stage and kind, median over microbatches), transfers at the link's rate and latency.
    wan_s = the loopback step measured + (simulated WAN makespan - simulated loopback makespan): what is outside
    the task table (the optimizer, the batch, the norm's last hop) is taken as measured, the link's effect on the
    schedule is the simulator's. makespan_s: the simulated WAN makespan alone."""
    from hxtrain.schedules.simulate import makespan, simulate
    from hxtrain.schedules.tables import get_schedule

    times: dict[tuple, list[float]] = {}
    for trace in local["traces"].values():
        me = {v for v in _site_ids(trace)}
        for e in trace["traceEvents"]:
            if e.get("ph") == "X" and e["cat"] == "compute" and e["pid"] in me:
                a = e["args"]
                times.setdefault((e["pid"], a["stage"], a["kind"]), []).append(e["dur"] * 1e-6)
    med = {k: statistics.median(v) for k, v in times.items()}
    orders = get_schedule(schedule).site_orders(2, args.microbatches)
    per_mb = {k: v / args.microbatches for k, v in local["bytes"].items()}  # bytes per microbatch, each way

    def duration(site, task):
        return med[(site, task.stage, task.kind)]

    def span(delay: float, rate: float) -> float:
        link = lambda src, dst, task: (per_mb["a->b" if src == 0 else "b->a"] * 8 / rate, delay)  # noqa: E731
        return makespan(simulate(orders, 2, duration=duration, transfer=link))

    loop, far = span(0.0, float("inf")), span(args.delay_ms * 1e-3, RATE_BPS)
    return {"wan_s": local["step_s"] + far - loop, "makespan_s": far, "loop_makespan_s": loop}


def _site_ids(trace: dict) -> list[int]:
    """The site a trace was written by (its own compute track)."""
    names = {e["pid"]: e["args"]["name"] for e in trace["traceEvents"] if e.get("name") == "process_name"}
    site = trace["otherData"]["site"]
    return [pid for pid, name in names.items() if name.endswith(f": {site}")]


def overlap_ab(args) -> int:
    """Loopback, first codec of --codecs: `rounds` runs with overlapped sends and as many synchronous, in the order
    on/off, off/on, ... (load drifts on a shared machine). Prints per-round step medians and the ratio."""
    codec = args.codecs.split(",")[0]
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        mesh = _topology(tmp, codec)
        for i in range(args.overlap_ab):
            got = {}
            for mode in (("on", "off") if i % 2 == 0 else ("off", "on")):
                r = _run(mesh, args, tmp / f"{codec}-{mode}-{i}", extra_args=["--sync-sends"] if mode == "off" else [])
                if (_SYNC_MARK in r["log"]) != (mode == "off"):
                    raise RuntimeError(f"round {i}, overlap {mode}: the sites did not run in that mode")
                got[mode] = r
                print(f"round {i}: overlap {mode}: {r['step_s'] * 1e3:.1f} ms/step", flush=True)
            if got["on"]["bytes"] != got["off"]["bytes"]:
                raise RuntimeError(f"bytes per link differ: overlap {got['on']['bytes']}, sync {got['off']['bytes']}")
            rounds.append(got)
    on = [r["on"]["step_s"] for r in rounds]
    off = [r["off"]["step_s"] for r in rounds]
    ratio = [a / b for a, b in zip(on, off)]
    mb = args.batch_size // args.microbatches
    print(f"\nmodel {args.model}, batch {args.batch_size} = {args.microbatches} x {mb}, 1F1B, 2 sites x 1 CPU device, "
          f"loopback, codec {codec}, {args.steps} steps per run (median of steps 3..), {len(rounds)} rounds; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print("round | overlap ms/step | sync ms/step | overlap/sync")
    for i, (a, b, q) in enumerate(zip(on, off, ratio)):
        print(f"{i} | {a * 1e3:.1f} | {b * 1e3:.1f} | {q:.3f}")
    print(f"median | {statistics.median(on) * 1e3:.1f} | {statistics.median(off) * 1e3:.1f} | "
          f"{statistics.median(ratio):.3f} (min {min(ratio):.3f}, max {max(ratio):.3f}); bytes per link equal: "
          f"{rounds[0]['on']['bytes']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"codec": codec, "overlap_s": on, "sync_s": off, "ratio": ratio,
                                               "steps_s": [{m: r[m]["steps_s"] for m in r} for r in rounds]}))
    return 0


def _print(results, args, wan, planner):
    mb = args.batch_size // args.microbatches
    print(f"\nmodel {args.model}, batch {args.batch_size} = {args.microbatches} x {mb}, 2 sites x 1 CPU "
          f"device{' (pinned: a on CPU 0, b on CPU 1)' if args.pin else ''}, {args.steps} steps; WAN = {wan} "
          f"({args.delay_ms:g} ms, {RATE_BPS / 1e9:g} Gbit/s); {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}; hxtrain plan chooses {planner['schedule']}")
    base = next((r for r in results if r["codec"] == "none"), results[0])
    head = ("schedule", "codec", "a->b B/step", "b->a B/step", "payload vs none", "loopback ms/step", "WAN ms/step",
            "WAN/loop", "simulated WAN ms (error)", "planner ms (error)")
    print(" | ".join(head))
    errors = []
    for r in results:
        ratio = sum(r["local"]["payload"].values()) / max(1, sum(base["local"]["payload"].values()))
        measured, sim = r["wan"]["step_s"], r["sim"]
        errors.append(sim["wan_s"] / measured - 1)
        plan = "-" if sim["planner_s"] is None else \
            f"{sim['planner_s'] * 1e3:.1f} ({sim['planner_s'] / measured - 1:+.0%})"
        print(" | ".join([r["schedule"], r["codec"], str(r["local"]["bytes"].get("a->b")),
                          str(r["local"]["bytes"].get("b->a")), f"{ratio:.3f}", f"{r['local']['step_s'] * 1e3:.1f}",
                          f"{measured * 1e3:.1f}", f"{measured / r['local']['step_s']:.2f}x",
                          f"{sim['wan_s'] * 1e3:.1f} ({errors[-1]:+.1%})", plan]))
    print(f"simulated vs measured WAN step: median |error| {statistics.median(map(abs, errors)):.1%} over "
          f"{len(errors)} runs (task times from each loopback run's recorded step, transfers at the link's rate "
          "and latency)")


if __name__ == "__main__":
    sys.exit(main())
