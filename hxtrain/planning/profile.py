"""`hxtrain profile`: time the real stage programs on every site, for the planner and the simulator.

    hxtrain profile --mesh local --model small [--microbatch 8 --seq 128 --repeats 5 --out profile.toml]
    hxtrain plan --mesh local --model small --profile profile.toml

Per site, on its own mesh and backend, the programs the executor runs (`hxtrain.core.programs`) are compiled, warmed up
and timed (`block_until_ready`, median of `repeats` calls) for one microbatch of `microbatch` sequences x `seq`
tokens:

    forward / backward of a middle stage with 1 and with 2 blocks   -> per-block cost and fixed cost (a line in n)
    forward / backward of a first stage (embedding) with 1 block     -> the embedding's extra
    last_step (forward + loss + backward) of a last stage, 1 block   -> the head's extra over a backward

so any stage's task costs `fixed + n x per_block (+ extras)`. The backward programs recompute the stage's forward
from its input (see `hxtrain.core.programs`), so a measured backward includes that forward: it is what a real task costs.
`SiteProfile`s for the planner carry the per-block figures (per data replica, at the site's tensor size).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from hxtrain.planning import costmodel as cm


class ProfileError(ValueError):
    """Inputs `hxtrain profile` cannot measure, or a profile file it cannot read; the message names the field."""


@dataclass(frozen=True)
class StageTimes:
    """Measured seconds per microbatch of one site's stage programs (medians), as lines in the block count n.

    forward(n) = fwd_fixed + n fwd_block;  backward(n) = bwd_fixed + n bwd_block (includes the recomputed
    forward); a first stage adds embed_fwd / embed_bwd; a last stage's fused step is backward(n) + head.
    `microbatch` sequences (over all `data` replicas) of `seq` tokens.
    """

    site: str
    backend: str
    data: int
    tensor: int
    microbatch: int
    seq: int
    fwd_block: float
    bwd_block: float
    fwd_fixed: float
    bwd_fixed: float
    embed_fwd: float
    embed_bwd: float
    head: float
    repeats: int = 5

    @property
    def tokens(self) -> int:
        """Tokens per data replica in one microbatch (what `SiteProfile.tokens` counts)."""
        return self.microbatch // self.data * self.seq

    def site_profile(self) -> cm.SiteProfile:
        """The planner's view: one block's forward and backward on `tokens` tokens per replica."""
        return cm.SiteProfile(fwd_s=self.fwd_block, bwd_s=self.bwd_block, tokens=self.tokens, tensor=self.tensor)

    def task_seconds(self, kind: str, blocks: int, *, first: bool, last: bool) -> float:
        """Predicted seconds of one executor task ("F" or "B", unsplit backward) of a stage with `blocks` blocks.

        A last stage's F only holds its input (its forward is fused into its B), so it costs nothing here."""
        if kind == "F":
            if last:
                return 0.0
            return self.fwd_fixed + blocks * self.fwd_block + (self.embed_fwd if first else 0.0)
        if kind == "B":
            t = self.bwd_fixed + blocks * self.bwd_block + (self.embed_bwd if first else 0.0)
            return t + (self.head if last else 0.0)
        raise ProfileError(f"task kind {kind!r}: expected 'F' or 'B' (split backward W tasks are not profiled)")


# ---- measuring -----------------------------------------------------------------------------------------------


def _timed_rounds(programs: dict, repeats: int, warmup: bool = True) -> dict[str, list[float]]:
    """Wall seconds of each `programs[name]()` until its outputs are ready, `repeats` times each.

    With `warmup`, every program is compiled and warmed up (2 untimed calls) first. The timed calls go round-robin
    (one call of each program per round), so a load change on a shared machine hits every program of a round
    alike and the paired differences (2 blocks - 1 block) stay meaningful."""
    import jax

    for fn in programs.values() if warmup else ():
        jax.block_until_ready(fn())  # compile
        jax.block_until_ready(fn())  # warm
    times: dict[str, list[float]] = {name: [] for name in programs}
    for _ in range(repeats):
        for name, fn in programs.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - t0)
    return times


def _place(parts, mesh, blocks: int, first: bool, last: bool, dtype: str = "float32"):
    """A stage of `blocks` blocks on `mesh` computing in `dtype` (as `stages.place_stage` lays one out):
    (role, params, shardings)."""
    import jax

    from hxtrain.core import programs as _stage
    from hxtrain.core import stages as _stages

    params, shard = _stages.stage_params(parts, (0, blocks), first, last, mesh)
    role = _stage.StageRole(parts.embed_def, parts.block_def, parts.head_def, first, last, mesh, dtype)
    return role, jax.device_put(params, shard), shard


def _site_programs(parts, mesh, site, *, microbatch: int, seq: int, width: int, vocab: int, seed: int) -> dict:
    """The programs to time on one site, as zero-argument callables: mid1/mid2 forward and backward (middle stage
    of 1 and 2 blocks), first stage (1 block) forward and backward, last stage (1 block) fused step."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    from hxtrain.core import placement as _placement
    from hxtrain.core import programs as _stage

    dtype = _placement.site_compute_dtype(site, mesh)  # what the site's stage programs compute (and send) in
    rng = np.random.default_rng(seed)
    put = lambda a: jax.device_put(a, NamedSharding(mesh, P(_placement.DATA)))  # noqa: E731
    x = put(rng.standard_normal((microbatch, seq, width), np.float32).astype(jnp.dtype(dtype)))
    dy = put((rng.standard_normal((microbatch, seq, width), np.float32) * 1e-2).astype(jnp.dtype(dtype)))
    tokens = put(rng.integers(0, vocab, (microbatch, seq), dtype=np.int32))
    scale = jnp.float32(1.0 / microbatch)

    def fwd(role, params, inp):
        return lambda: _stage.forward(role, params, inp)

    def bwd(role, params, shard, inp):
        acc = {"g": _stage.zeros_accumulator(params, shard, site.data)}

        def run():  # the accumulator is donated: carry the returned one into the next call
            dx, acc["g"] = _stage.backward(role, params, inp, dy, acc["g"])
            return dx, acc["g"]
        return run

    def last(role, params, shard):
        acc = {"g": _stage.zeros_accumulator(params, shard, site.data), "l": put(np.zeros((site.data,), np.float32))}

        def run():
            dx, acc["g"], acc["l"] = _stage.last_step(role, params, x, tokens, acc["g"], acc["l"], scale)
            return dx, acc["g"], acc["l"]
        return run

    programs = {}
    for n in (1, 2):
        role, params, shard = _place(parts, mesh, n, first=False, last=False, dtype=dtype)
        programs[f"fwd{n}"], programs[f"bwd{n}"] = fwd(role, params, x), bwd(role, params, shard, x)
    role, params, shard = _place(parts, mesh, 1, first=True, last=False, dtype=dtype)
    programs["first_fwd"], programs["first_bwd"] = fwd(role, params, tokens), bwd(role, params, shard, tokens)
    programs["last_step"] = last(*_place(parts, mesh, 1, first=False, last=True, dtype=dtype))
    return programs


def _fit(site, times: dict[str, list[float]], *, microbatch: int, seq: int, repeats: int) -> StageTimes:
    """Medians of the paired per-round differences: per block = (2 blocks - 1 block), extras over the 1-block
    middle stage."""
    med = lambda a, b=None: statistics.median(  # noqa: E731
        [x - y for x, y in zip(times[a], times[b])] if b else times[a])
    fwd_block, bwd_block = med("fwd2", "fwd1"), med("bwd2", "bwd1")
    return StageTimes(site=site.name, backend=site.backend, data=site.data, tensor=site.tensor,
                      microbatch=microbatch, seq=seq, fwd_block=fwd_block, bwd_block=bwd_block,
                      fwd_fixed=med("fwd1") - fwd_block, bwd_fixed=med("bwd1") - bwd_block,
                      embed_fwd=med("first_fwd", "fwd1"), embed_bwd=med("first_bwd", "bwd1"),
                      head=med("last_step", "bwd1"), repeats=repeats)


def profile_sites(model, topology, *, microbatch: int | None = None, seq: int | None = None, repeats: int = 5,
                  seed: int = 0, share_identical: bool = True) -> list[StageTimes]:
    """Time `model`'s stage programs on every site of `topology` (a Topology, path or shipped name).

    model: an NNX model following `hxtrain.core.parts`'s protocol, with at least 2 blocks (only the first two are
    used). microbatch: sequences per microbatch (default: the topology's run.batch_size / run.microbatches);
    it must split over every site's `data`. seq: tokens per sequence (default: model.cfg.seq_len).
    share_identical: sites with the same backend, device kind, data x tensor and compute_dtype run the same
    programs on the same kind of device, so only the first of them is measured and the others reuse its times.
    Returns one `StageTimes` per site, in the topology's order.
    """

    from hxtrain.core import parts as _parts
    from hxtrain.core import placement as _placement
    from hxtrain.config.topology import Topology, load_topology

    topo = topology if isinstance(topology, Topology) else load_topology(topology)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ProfileError(f"repeats: expected a whole number >= 1, got {repeats!r}")
    if microbatch is None:
        microbatch = max(topo.run.batch_size // topo.run.microbatches, 1)
    if isinstance(microbatch, bool) or not isinstance(microbatch, int) or microbatch < 1:
        raise ProfileError(f"microbatch: expected a whole number of sequences >= 1, got {microbatch!r}")
    for s in topo.sites:
        if microbatch % s.data:
            raise ProfileError(f"microbatch: {microbatch} sequences do not split over site {s.name!r} data = "
                               f"{s.data}; use a multiple of {s.data}")
    seq = seq if seq is not None else getattr(getattr(model, "cfg", None), "seq_len", None)
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
        raise ProfileError(f"seq: expected a whole number of tokens >= 1, got {seq!r} (the model has no "
                           "cfg.seq_len: pass seq=)")
    parts = _parts.split_model(model)
    if parts.n_layers < 2:
        raise ProfileError(f"model: profiling needs at least 2 blocks (1 and 2 separate per-block from fixed "
                           f"cost), the model has {parts.n_layers}")
    from hxtrain.core import stages as _stages

    width = int(_stages.embed_output(parts, seq).shape[-1])
    vocab = int(getattr(getattr(model, "cfg", None), "vocab_size", 2))
    out, seen = [], {}
    for i, (site, mesh) in enumerate(zip(topo.sites, _placement.site_meshes(topo))):
        key = (site.backend, site.device_kind, site.data, site.tensor, site.compute_dtype)
        if share_identical and key in seen:
            out.append(dataclasses.replace(seen[key], site=site.name))
            continue
        programs = _site_programs(parts, mesh, site, microbatch=microbatch, seq=seq, width=width, vocab=vocab,
                                  seed=seed + i)
        seen[key] = _fit(site, _timed_rounds(programs, repeats), microbatch=microbatch, seq=seq, repeats=repeats)
        out.append(seen[key])
    return out


def site_profiles(times: list[StageTimes]) -> dict[str, cm.SiteProfile]:
    """{site name: SiteProfile} for `planner.plan(profiles=...)`. Raises ProfileError when a per-block time is not
    positive (timing noise larger than one block's work: use a bigger microbatch or more repeats)."""
    out = {}
    for t in times:
        if not (t.fwd_block > 0 and t.bwd_block > 0):
            raise ProfileError(f"site {t.site!r}: measured per-block forward {t.fwd_block * 1e3:.4g} ms, backward "
                               f"{t.bwd_block * 1e3:.4g} ms; one block's work is below the timing noise: profile "
                               "with a bigger --microbatch or --seq, or more --repeats")
        out[t.site] = t.site_profile()
    return out


# ---- report and file ---------------------------------------------------------------------------------------------


def format_table(times: list[StageTimes]) -> str:
    """Per site: per-block forward / backward ms per microbatch, fixed costs, embedding and head extras."""
    lines = [f"  {'site':<10} {'backend':<8} {'data x tensor':>13} {'tokens/rep':>10} {'fwd/block':>10} "
             f"{'bwd/block':>10} {'fwd fixed':>10} {'bwd fixed':>10} {'embed':>8} {'head':>8}   (ms per microbatch)"]
    for t in times:
        lines.append(f"  {t.site:<10} {t.backend:<8} {f'{t.data} x {t.tensor}':>13} {t.tokens:>10} "
                     f"{t.fwd_block * 1e3:>10.3f} {t.bwd_block * 1e3:>10.3f} {t.fwd_fixed * 1e3:>10.3f} "
                     f"{t.bwd_fixed * 1e3:>10.3f} {(t.embed_fwd + t.embed_bwd) * 1e3:>8.3f} "
                     f"{t.head * 1e3:>8.3f}")
    return "\n".join(lines)


def write_profile(path, times: list[StageTimes], *, model: str = "", topology: str = "") -> Path:
    """Write `times` as TOML (`[[sites]]` tables, every StageTimes field); `load_profile` reads it back."""
    from hxtrain.planning.plan_file import toml_value as _fmt  # the one TOML value writer

    path = Path(path)
    body = [f"# hxtrain profile: model {model!r} on topology {topology!r}; seconds per microbatch (medians)",
            f"model = {_fmt(model)}", f"topology = {_fmt(topology)}", ""]
    for t in times:
        body.append("[[sites]]")
        body += [f"{f.name} = {_fmt(getattr(t, f.name))}" for f in dataclasses.fields(t)]
        body.append("")
    path.write_text("\n".join(body), encoding="utf-8")
    return path


def load_profile(path) -> list[StageTimes]:
    """Read a file written by `write_profile` (or `hxtrain profile --out`)."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ProfileError(f"{path}: cannot read the profile: {e}") from None
    sites = raw.get("sites")
    if not isinstance(sites, list) or not sites:
        raise ProfileError(f"{path}: expected [[sites]] tables; is this a file written by `hxtrain profile`?")
    names = {f.name for f in dataclasses.fields(StageTimes)}
    out = []
    for k, s in enumerate(sites):
        missing, extra = sorted(names - {"repeats"} - s.keys()), sorted(s.keys() - names)
        if missing or extra:
            raise ProfileError(f"{path}: sites[{k}]: missing {missing}, unknown {extra}")
        for f in names - {"site", "backend"}:
            v = s[f]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ProfileError(f"{path}: sites[{k}].{f}: expected a number, got {v!r}")
        out.append(StageTimes(**s))
    return out


def load_site_profiles(path, topology=None) -> dict[str, cm.SiteProfile]:
    """{site name: SiteProfile} from a profile file, for `hxtrain plan --profile`. With `topology`, every
    profiled site must be one of its sites."""
    times = load_profile(path)
    if topology is not None:
        known = {s.name for s in topology.sites}
        unknown = [t.site for t in times if t.site not in known]
        if unknown:
            raise ProfileError(f"{path}: profiled sites {unknown} are not in topology {topology.name!r} (sites "
                               f"{sorted(known)}); profile this topology with `hxtrain profile --mesh`")
    return site_profiles(times)


# ---- command line ------------------------------------------------------------------------------------------------


def register(subparsers) -> None:
    """Add the `profile` command to hxtrain's argparse subparsers."""
    p = subparsers.add_parser("profile", help="time the real stage programs on every site (per-block forward / "
                                              "backward); feeds `hxtrain plan --profile`")
    p.add_argument("--mesh", default="local", help="topology TOML file or shipped name (default: local)")
    p.add_argument("--model", required=True, help="model preset (models.gpt.PRESETS), e.g. tiny, small")
    p.add_argument("--microbatch", type=int, help="sequences per microbatch (default: run.batch_size / "
                                                  "run.microbatches of the topology)")
    p.add_argument("--seq", type=int, help="tokens per sequence (default: the model's seq_len)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per program; the median counts (default 5)")
    p.add_argument("--out", help="write the profile as TOML here (for `hxtrain plan --profile`)")
    p.set_defaults(func=run)


def run(args, out=None) -> int:
    """Run `hxtrain profile` with parsed `args`; prints to `out` (default stdout)."""
    import sys

    from hxtrain.config.topology import load_topology

    out = out or sys.stdout
    topo = load_topology(args.mesh)
    model = _two_block_model(args.model)
    times = profile_sites(model, topo, microbatch=args.microbatch, seq=args.seq, repeats=args.repeats)
    t = times[0]
    print(f"profile: model {args.model} on {topo.name} ({topo.source}); microbatch {t.microbatch} x {t.seq} "
          f"tokens, median of {args.repeats}", file=out)
    print(format_table(times), file=out)
    if args.out:
        write_profile(args.out, times, model=args.model, topology=str(topo.source))
        print(f"wrote {args.out} (`hxtrain plan --mesh {args.mesh} --model {args.model} --profile {args.out}`)",
              file=out)
    return 0


def _two_block_model(name: str):
    """The preset `name` with only 2 blocks: profiling uses no more, and building all of them costs time."""
    from hxtrain.core import model_registry

    try:
        model_registry.preset(name)
    except ValueError as e:  # the profile command's errors are ProfileErrors
        raise ProfileError(str(e)) from None
    return model_registry.build(name, n_layers=2)
