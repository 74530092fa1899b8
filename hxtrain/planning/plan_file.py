"""The plan and the plan on disk: `Plan` (what `planner.plan` returns; `hxtrain.planning.planner` re-exports it), `write_plan`
/ `load_plan` (what `Plan.to_toml` / `Plan.load` do), and a small TOML writer. Imports go planner -> plan_file.

A plan is two files: the plan itself (`[plan]`, `[assumptions]`, `[predicted]`, `[even]`, `[cross_site_dp]`),
which names its topology by a path relative to itself, and that topology (`<stem>.topology.toml`), which
`hxtrain.config.topology.load_topology` reads as is: the chosen data/tensor/layers per site, link codecs and the `[run]`.
`hxtrain train --plan FILE` runs it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from pathlib import Path

from hxtrain.planning import costmodel as cm
from hxtrain.planning.predict import LinkPlan, Prediction, SitePlan
from hxtrain.planning.problem import PlanError


@dataclasses.dataclass(frozen=True)
class Plan:
    """A chosen placement with its predicted figures; `to_toml` writes what `hxtrain train --plan` runs."""

    topology: object  # hxtrain.config.topology.Topology, its sites in the pipeline order the plan chose
    model: str | None
    global_batch: int
    seq: int
    predicted: Prediction
    even: Prediction | None
    cross_site_dp: Prediction | None
    ideal_tokens_per_s: float
    warnings: tuple[str, ...]
    assumptions: cm.Assumptions
    planning_s: float
    diloco: Prediction | None = None  # one replica per site, synced every H steps (the topology's [diloco] or H 500)
    reversed_order: bool = False  # the pipeline runs the given topology's sites last to first (`planner` doc)
    compute_bound_tokens_per_s: float = math.nan  # the sites alone, memory aside: an upper bound of every row

    def ranked(self) -> list[Prediction]:
        """Every way of running that was predicted, fastest first (those that do not fit last)."""
        rows = [r for r in (self.predicted, self.even, self.cross_site_dp, self.diloco) if r is not None]
        return sorted(rows, key=lambda r: (not r.fits, -r.tokens_per_s))

    @property
    def schedule(self) -> str:
        return self.predicted.schedule

    @property
    def microbatches(self) -> int:
        return self.predicted.microbatches

    @property
    def recompute(self) -> bool:
        return self.predicted.recompute

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(s.layers for s in self.predicted.sites)

    def partition(self, virtual: int = 1) -> tuple[int, ...]:
        """Blocks per stage for a schedule of `virtual` chunks per site: stage k * S + i is chunk k of site i
        (the pipeline's order), each site's layers split as the planner simulated them."""
        return tuple(L // virtual + (k < L % virtual) for k in range(virtual) for L in self.layers)

    def to_topology(self):
        """The topology with this plan applied: each site's data/tensor/layers, link codecs, and the [run]."""
        topo = self.topology
        by_site = {s.name: s for s in self.predicted.sites}
        by_link = {frozenset(lp.sites): lp for lp in self.predicted.links}
        sites = tuple(dataclasses.replace(s, data=by_site[s.name].data, tensor=by_site[s.name].tensor,
                              layers=by_site[s.name].layers) for s in topo.sites)
        links = tuple(dataclasses.replace(ln, activations=by_link[frozenset(ln.sites)].activations,
                              cotangents=by_link[frozenset(ln.sites)].cotangents)
                      if frozenset(ln.sites) in by_link else ln for ln in topo.links)
        run = dataclasses.replace(topo.run, model=self.model or topo.run.model, schedule=self.schedule,
                      microbatches=self.microbatches, batch_size=self.global_batch)
        return dataclasses.replace(topo, sites=sites, links=links, run=run)

    def diloco_topology(self):
        """The topology `hxtrain train --plan FILE --strategy diloco` runs: every site a replica of the whole model
        at the data x tensor the plan's DiLoCo row chose for it, and the [diloco] table (kept from the planned
        topology, else DiLoCo's defaults) with the row's shares (each site's predicted speed) unless it has its
        own. PlanError when the plan has no DiLoCo row or the table groups the sites otherwise."""
        from hxtrain.config.topology import Diloco

        if self.diloco is None:
            raise PlanError(f"--plan: this plan of {self.topology.name!r} has no DiLoCo row (a topology of one site, "
                            "or a plan written before DiLoCo was planned); run `hxtrain plan` again")
        # The row's sites in its own order (the given topology's), which its shares follow; the pipeline row may
        # have reversed them, and a chain is linked either way.
        topo = dataclasses.replace(self.topology, sites=tuple(self.topology.site(r.name) for r in self.diloco.sites))
        d = topo.diloco or Diloco()
        if d.replicas is not None and d.groups(topo) != tuple((s.name,) for s in topo.sites):
            raise PlanError(f"--plan: the plan's DiLoCo row has one replica per site, but the topology's [diloco] "
                            f"replicas are {['+'.join(g) for g in d.replicas]}; plan without them or run without "
                            "--plan")
        by_site = {s.name: s for s in self.diloco.sites}
        sites = tuple(dataclasses.replace(s, data=by_site[s.name].data, tensor=by_site[s.name].tensor,
                                          layers=None) for s in topo.sites)
        shares = d.shares  # the table's own, else the row's speeds (none in a row without shares)
        if shares is None and self.diloco.shares:
            shares = tuple(self.diloco.shares)
        run = dataclasses.replace(topo.run, model=self.model or topo.run.model,
                                  microbatches=self.diloco.microbatches, batch_size=self.global_batch)
        return dataclasses.replace(topo, sites=sites, run=run, diloco=dataclasses.replace(d, shares=shares))

    def to_toml(self, path) -> tuple[Path, Path]:
        """Write the plan to `path` and its topology next to it (`<stem>.topology.toml`); returns both paths."""
        return write_plan(self, path)

    @classmethod
    def load(cls, path) -> Plan:
        """Read a plan written by `to_toml` (and the topology file it names)."""
        return load_plan(path)


def write_plan(plan: Plan, path) -> tuple[Path, Path]:
    """Write `plan` to `path` and its topology next to it (`<stem>.topology.toml`); returns both paths."""
    path = Path(path)
    topo_path = path.with_name(path.stem + ".topology.toml")
    p = plan.predicted
    topo_path.write_text(topology_toml(plan.to_topology(), f"planned by `hxtrain plan` (see {path.name}): "
                                       f"{p.step_s:.4g} s per step, {p.tokens_per_s:.4g} tokens/s, "
                                       f"{p.fraction_of_ideal:.1%} of ideal"), encoding="utf-8")
    body = [f"# hxtrain plan: model {plan.model!r} on topology {plan.topology.name!r}",
            f"# predicted {p.step_s:.4g} s per step, {p.tokens_per_s:.4g} tokens/s, {p.fraction_of_ideal:.1%} "
            "of the sum of the sites' capacities",
            f"topology = {toml_value(topo_path.name)}  # relative to this file; load_topology reads it as is",
            f"warnings = {toml_value(list(plan.warnings))}", ""]
    body += toml_table("plan", {"model": plan.model or "", "global_batch": plan.global_batch, "seq": plan.seq,
                                "schedule": plan.schedule, "microbatches": plan.microbatches,
                                "recompute": plan.recompute, "ideal_tokens_per_s": plan.ideal_tokens_per_s,
                                "compute_bound_tokens_per_s": plan.compute_bound_tokens_per_s,
                                "reversed_order": plan.reversed_order, "planning_s": plan.planning_s})
    body += toml_table("assumptions", dataclasses.asdict(plan.assumptions))
    for key, pred in (("predicted", plan.predicted), ("even", plan.even), ("cross_site_dp", plan.cross_site_dp),
                      ("diloco", plan.diloco)):
        if pred is not None:
            body += _prediction_toml(key, pred)
    path.write_text("\n".join(body) + "\n", encoding="utf-8")
    return path, topo_path


def load_plan(path) -> Plan:
    """Read a plan written by `write_plan` (and the topology file it names)."""
    from hxtrain.config.topology import load_topology

    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise PlanError(f"{path}: cannot read the plan: {e}") from None
    missing = sorted({"topology", "plan", "assumptions", "predicted"} - raw.keys())
    if missing:
        raise PlanError(f"{path}: missing {missing}; is this a file written by `hxtrain plan`?")
    topo = load_topology(path.parent / raw["topology"])
    pl = raw["plan"]
    preds = {k: _prediction_load(raw[k]) if k in raw else None
             for k in ("predicted", "even", "cross_site_dp", "diloco")}
    return Plan(topology=topo, model=pl["model"] or None, global_batch=pl["global_batch"], seq=pl["seq"],
                predicted=preds["predicted"], even=preds["even"], cross_site_dp=preds["cross_site_dp"],
                diloco=preds["diloco"],
                ideal_tokens_per_s=pl["ideal_tokens_per_s"], warnings=tuple(raw.get("warnings", ())),
                assumptions=cm.Assumptions(**raw["assumptions"]), planning_s=pl["planning_s"],
                reversed_order=pl.get("reversed_order", False),  # plans written before these two lack them
                compute_bound_tokens_per_s=pl.get("compute_bound_tokens_per_s", math.nan))


# --- TOML writing (tomllib only reads) ---


def toml_value(v) -> str:
    """One TOML value: bool, int, float (nan/inf too), str, or a list of those."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf"))
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # JSON string escapes are TOML basic-string escapes
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} to TOML")


def toml_table(name: str, values: dict, array: bool = False) -> list[str]:
    """Lines of a `[name]` (or `[[name]]`) table; None values are left out."""
    head = f"[[{name}]]" if array else f"[{name}]"
    return [head] + [f"{k} = {toml_value(v)}" for k, v in values.items() if v is not None] + [""]


def topology_toml(topo, comment: str) -> str:
    """A topology file `hxtrain.config.topology.load_topology` reads back to an equal topology."""
    out = [f"# {comment}", f"name = {toml_value(topo.name)}", f"description = {toml_value(topo.description)}", ""]
    for s in topo.sites:
        out += toml_table("sites", {f.name: getattr(s, f.name) for f in dataclasses.fields(s)}, array=True)
    for ln in topo.links:
        vals = {"between": list(ln.sites), **{f.name: getattr(ln, f.name) for f in dataclasses.fields(ln)
                                              if f.name != "sites"}}
        out += toml_table("links", vals, array=True)
    out += toml_table("run", dataclasses.asdict(topo.run))
    if topo.diloco is not None:
        out += toml_table("diloco", dataclasses.asdict(topo.diloco))
    return "\n".join(out)


def _prediction_toml(key: str, p: Prediction) -> list[str]:
    scalars = {f.name: getattr(p, f.name) for f in dataclasses.fields(p) if f.name not in ("sites", "links")}
    out = toml_table(key, scalars)
    for s in p.sites:
        out += toml_table(f"{key}.sites", dataclasses.asdict(s), array=True)
    for ln in p.links:
        out += toml_table(f"{key}.links", dataclasses.asdict(ln), array=True)
    return out


def _prediction_load(t: dict) -> Prediction:
    sites = tuple(SitePlan(**s) for s in t.get("sites", ()))
    links = tuple(LinkPlan(**{**ln, "sites": tuple(ln["sites"])}) for ln in t.get("links", ()))
    rest = {k: v for k, v in t.items() if k not in ("sites", "links")}
    return Prediction(**{**rest, "notes": tuple(rest.get("notes", ())), "shares": tuple(rest.get("shares", ()))},
                      sites=sites, links=links)
