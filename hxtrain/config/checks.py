"""Validation of a topology: every field checked once, each error naming the file and the field path
(`meshes/local.toml: sites[1].data: ...`), with what was expected and what arrived. No JAX here."""

from __future__ import annotations

import difflib
import math
import re

from hxtrain.links.codecs import CODEC_NAMES

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class TopologyError(ValueError):
    """An invalid topology; the message starts with its source and names the field."""


def validate(t) -> None:
    """Every field of a Topology, its sites, links and [run] table; TopologyError naming the first bad field."""
    src = t.source
    if not isinstance(t.name, str) or not t.name:
        _fail(src, "name", f"expected a non-empty string, got {show(t.name)}")
    if not isinstance(t.description, str):
        _fail(src, "description", f"expected a string, got {show(t.description)}")
    if not t.sites:
        _fail(src, "sites", "no sites; add at least one [[sites]] table")
    for i, s in enumerate(t.sites):
        _check_site(src, f"sites[{i}]", s)
    index = {}
    for i, s in enumerate(t.sites):
        if s.name in index:
            _fail(src, f"sites[{i}].name", f"duplicate site name {s.name!r} (also sites[{index[s.name]}])")
        index[s.name] = i
    given = [s.layers is not None for s in t.sites]
    if any(given) and not all(given):
        missing = [s.name for s in t.sites if s.layers is None]
        _fail(src, f"sites[{given.index(False)}].layers",
              f"layers given for some sites only; give it for every site or none (missing: {', '.join(missing)})")
    pairs = {}
    for i, ln in enumerate(t.links):
        pair = _check_link(src, f"links[{i}]", ln, index)
        if pair in pairs:
            _fail(src, f"links[{i}].between", f"duplicate link {ln.sites[0]}-{ln.sites[1]} (also links[{pairs[pair]}])")
        pairs[pair] = i
    for i, (a, b) in enumerate(t.neighbours()):
        if frozenset((a.name, b.name)) not in pairs:
            _fail(src, "links", f"no link between pipeline neighbours {a.name!r} (sites[{i}]) and {b.name!r} "
                                f"(sites[{i + 1}]); add a [[links]] table with between = [\"{a.name}\", \"{b.name}\"]")
    _check_run(src, t.run)
    if t.diloco is not None:
        check_diloco(src, t.diloco, [s.name for s in t.sites])


def check_diloco(src: str, d, site_names, flags: dict[str, str] | None = None) -> None:
    """A `Diloco` against the topology's sites; TopologyError naming `diloco.<field>` (or the field's flag in
    `flags`, for a value given on the command line)."""
    from hxtrain.config import topology as _t

    flags = flags or {}

    def fail(field: str, msg: str):
        if field in flags:
            raise TopologyError(f"{flags[field]}: {msg}")
        _fail(src, f"diloco.{field}", msg)

    if not isinstance(d, _t.Diloco):
        _fail(src, "diloco", f"expected a Diloco, got {show(d)}")
    if not is_int(d.sync_every) or d.sync_every < 1:
        fail("sync_every", f"expected a whole number of inner steps >= 1, got {show(d.sync_every)}")
    if not is_int(d.fragments) or not 1 <= d.fragments <= d.sync_every:
        fail("fragments", f"expected a whole number in 1..sync_every ({d.sync_every}), got {show(d.fragments)}")
    spacing = d.sync_every // d.fragments
    if not is_int(d.overlap) or not 0 <= d.overlap < spacing:
        fail("overlap", f"expected a whole number of inner steps in 0..{spacing - 1} (less than the "
                        f"{spacing} steps between two fragments' syncs), got {show(d.overlap)}")
    if not (_is_num(d.outer_lr) and d.outer_lr > 0):
        fail("outer_lr", f"expected a finite number > 0, got {show(d.outer_lr)}")
    for f in ("outer_momentum", "mix"):
        v = getattr(d, f)
        if not (_is_num(v) and 0 <= v < 1):
            fail(f, f"expected a number in [0, 1), got {show(v)}")
    if d.codec not in CODEC_NAMES:
        close = difflib.get_close_matches(str(d.codec), CODEC_NAMES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        fail("codec", f"unknown codec {d.codec!r}{hint}; expected one of {', '.join(CODEC_NAMES)}")
    if d.replicas is not None:
        if not isinstance(d.replicas, tuple) or not d.replicas or not all(
                isinstance(g, tuple) and g and all(isinstance(n, str) for n in g) for g in d.replicas):
            fail("replicas", f"expected groups of site names like [[\"a\", \"b\"], [\"c\", \"d\"]], got "
                             f"{show(d.replicas)}")
    groups = d.replicas if d.replicas is not None else tuple((n,) for n in site_names)
    if len(groups) < 2:
        fail("replicas", f"expected at least 2 replicas to average over, got {len(groups)} "
                         f"({'+'.join(groups[0])}); give a topology of several sites, or group them in replicas")
    if d.replicas is not None:
        seen = [n for g in groups for n in g]
        unknown = [n for n in seen if n not in site_names]
        twice = sorted({n for n in seen if seen.count(n) > 1})
        missing = [n for n in site_names if n not in seen]
        if unknown or twice or missing:
            what = (f"unknown site {unknown[0]!r}" if unknown else f"site {twice[0]!r} is in two replicas"
                    if twice else f"site {missing[0]!r} is in no replica")
            fail("replicas", f"the groups must cover every site exactly once ({', '.join(site_names)}); {what}")
        for g in groups:
            order = [site_names.index(n) for n in g]
            if order != sorted(order):
                fail("replicas", f"replica {list(g)} lists its sites out of pipeline order; list them as in "
                                 f"[[sites]]: {sorted(g, key=site_names.index)}")
    if isinstance(d.shares, str) and d.shares.startswith("planned:"):
        if not d.shares[len("planned:"):]:
            fail("shares", f"expected \"planned:FILE\" naming a profile of `hxtrain profile --out FILE`, got "
                           f"{show(d.shares)}")
    elif d.shares is not None and d.shares not in ("planned", "measured"):
        if (not isinstance(d.shares, tuple) or len(d.shares) != len(groups)
                or not all(_is_num(x) and x > 0 for x in d.shares)):
            fail("shares", f"expected {len(groups)} numbers > 0 (one per replica), \"planned\", "
                           f"\"planned:FILE\" or \"measured\", got {show(d.shares)}")


def _check_site(src: str, w: str, s) -> None:
    from hxtrain.config import topology as _t  # the types; topology imports this module at its top

    if not isinstance(s, _t.Site):
        _fail(src, w, f"expected a Site, got {show(s)}")
    _want_str(src, f"{w}.name", s.name)
    if not _NAME_RE.fullmatch(s.name):
        _fail(src, f"{w}.name", f"{s.name!r} is not a valid site name (letters, digits, '_', '.', '-')")
    _want_str(src, f"{w}.backend", s.backend)
    for f in ("devices", "data", "tensor", "processes"):
        _want_int(src, f"{w}.{f}", getattr(s, f))
    if s.data * s.tensor != s.devices:
        fix = f"data = {s.devices // s.tensor}" if s.devices % s.tensor == 0 else "devices = data * tensor"
        _fail(src, w, f"data x tensor = {s.data} x {s.tensor} = {s.data * s.tensor}, but devices = {s.devices}; "
                      f"make them equal (e.g. {fix})")
    if s.devices % s.processes:
        _fail(src, f"{w}.processes", f"{s.devices} devices do not split evenly over {s.processes} processes")
    if s.layers is not None:
        _want_int(src, f"{w}.layers", s.layers, " (a layer share: every site holds at least one block)")
    for f in ("device_kind", "plugin"):
        if getattr(s, f) is not None:
            _want_str(src, f"{w}.{f}", getattr(s, f))
    if s.plugin_options is not None:
        _check_plugin_options(src, f"{w}.plugin_options", s)
    if s.first_device is not None and not (is_int(s.first_device) and s.first_device >= 0):
        _fail(src, f"{w}.first_device", f"expected an integer >= 0 (a device index on the site's client), got "
                                        f"{show(s.first_device)}")
    if not isinstance(s.share_devices, bool):
        _fail(src, f"{w}.share_devices", f"expected true or false, got {show(s.share_devices)}")
    if s.compute_dtype is not None:
        _want_choice(src, f"{w}.compute_dtype", s.compute_dtype, COMPUTE_DTYPES, "compute_dtype")
    for f in ("memory_gib", "peak_tflops"):
        v = getattr(s, f)
        if v is not None and not (_is_num(v) and v > 0):
            _fail(src, f"{w}.{f}", f"expected a positive number, got {show(v)}")
    if s.address is not None:
        m = re.fullmatch(r"(.+):(\d+)", s.address) if isinstance(s.address, str) else None
        if not m or not 0 < int(m.group(2)) < 65536:
            _fail(src, f"{w}.address", f"expected 'host:port' with a port in 1..65535, got {show(s.address)}")


def _check_plugin_options(src: str, w: str, s) -> None:
    if s.plugin is None and not str(s.backend).startswith("plugin:"):
        _fail(src, w, "options for a plugin, but the site names none; add plugin = \"...\" or remove them")
    opts = s.plugin_options
    if not (isinstance(opts, tuple) and all(isinstance(kv, tuple) and len(kv) == 2 for kv in opts)):
        _fail(src, w, f"expected a table of option = value, got {show(opts)}")
    for key, value in opts:
        if not isinstance(value, (str, int, float, bool)):
            _fail(src, f"{w}.{key}", f"expected a string, number or boolean (what PJRT create options take), "
                                     f"got {show(value)}")


def _check_link(src: str, w: str, ln, index: dict[str, int]) -> frozenset:
    from hxtrain.config import topology as _t

    if not isinstance(ln, _t.Link):
        _fail(src, w, f"expected a Link, got {show(ln)}")
    pair = ln.sites
    if not (isinstance(pair, tuple) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
        _fail(src, f"{w}.between", f"expected two site names like [\"a\", \"b\"], got {show(pair)}")
    for x in pair:
        if x not in index:
            _fail(src, f"{w}.between", f"unknown site {x!r}; sites: {', '.join(map(repr, index))}")
    if pair[0] == pair[1]:
        _fail(src, f"{w}.between", f"a link from site {pair[0]!r} to itself; name two different sites")
    if not _is_num(ln.bandwidth_gbps):
        _fail(src, f"{w}.bandwidth_gbps", f"expected a positive number of Gbit/s, got {show(ln.bandwidth_gbps)}")
    if ln.bandwidth_gbps <= 0:
        _fail(src, f"{w}.bandwidth_gbps", f"got {ln.bandwidth_gbps:g}: a link with no bandwidth cannot carry "
                                          "activations; give a value > 0 Gbit/s")
    if not (_is_num(ln.latency_ms) and ln.latency_ms >= 0):
        _fail(src, f"{w}.latency_ms", f"expected a number >= 0 (milliseconds), got {show(ln.latency_ms)}")
    _want_choice(src, f"{w}.activations", ln.activations, CODEC_NAMES, "codec")
    _want_choice(src, f"{w}.cotangents", ln.cotangents, CODEC_NAMES, "codec")
    return frozenset(pair)


def _check_run(src: str, r) -> None:
    from hxtrain.config import topology as _t

    if not isinstance(r, _t.RunDefaults):
        _fail(src, "run", f"expected RunDefaults, got {show(r)}")
    _want_str(src, "run.model", r.model)
    _want_str(src, "run.schedule", r.schedule)
    for f in ("microbatches", "batch_size", "steps"):
        _want_int(src, f"run.{f}", getattr(r, f))
    if r.batch_size % r.microbatches:
        _fail(src, "run.batch_size", f"a batch of {r.batch_size} does not split into {r.microbatches} "
                                     "equal microbatches; make batch_size a multiple of microbatches")


def _fail(src: str, where: str, msg: str):
    raise TopologyError(f"{src}: {where}: {msg}")


def show(v) -> str:
    return f"{v!r} ({type(v).__name__})"


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def int_to_float(obj, field: str) -> None:
    v = getattr(obj, field)
    if is_int(v):
        object.__setattr__(obj, field, float(v))


def _want_int(src: str, where: str, v, why: str = "") -> None:
    if not is_int(v) or v < 1:
        _fail(src, where, f"expected a positive integer{why}, got {show(v)}")


def _want_str(src: str, where: str, v) -> None:
    if not isinstance(v, str) or not v.strip():
        _fail(src, where, f"expected a non-empty string, got {show(v)}")


def _want_choice(src: str, where: str, v, choices: tuple[str, ...], what: str) -> None:
    if v not in choices:
        close = difflib.get_close_matches(str(v), choices, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        _fail(src, where, f"unknown {what} {v!r}{hint}; expected one of {', '.join(choices)}")
