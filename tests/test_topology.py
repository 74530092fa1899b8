"""Topology files and their validation: every shipped file loads, every bad input has its own message."""

import dataclasses
import re

import pytest

import meshes
from hxtrain.config.topology import (
    Link, RunDefaults, Site, Topology, TopologyError, even_split, load_topology, shipped, uniform,
)

# A valid two-site file; each bad case below edits it (first occurrence) or replaces it whole.
GOOD = """\
name = "t"
[[sites]]
name = "a"
backend = "cpu"
devices = 4
data = 2
tensor = 2
[[sites]]
name = "b"
backend = "cpu"
devices = 4
data = 2
tensor = 2
[[links]]
between = ["a", "b"]
bandwidth_gbps = 100
latency_ms = 1.0
[run]
microbatches = 8
"""
LINK = '[[links]]\nbetween = ["a", "b"]\nbandwidth_gbps = 100\nlatency_ms = 1.0\n'
A = 'name = "a"'  # anchor: insert a key into sites[0]
LAT = "latency_ms = 1.0"  # anchor: insert a key into links[0]

BAD = {  # id: (old, new, regex); old None = `new` is the whole file
    "unknown-site-key": ("devices = 4", "devics = 4",
                         r"sites\[0\]\.devics: unknown key \(did you mean 'devices'\?\); allowed keys: address, "),
    "unknown-top-key": ('name = "t"', 'name = "t"\nsite = 1', r": site: unknown key \(did you mean 'sites'\?\)"),
    "unknown-run-key": ("microbatches = 8", "microbatch = 8",
                        r"run\.microbatch: unknown key \(did you mean 'microbatches'"),
    "unknown-link-key": ("between =", "sites =",
                         r"links\[0\]\.sites: unknown key.*allowed keys: activations, bandwidth_gbps, between, "),
    "wrong-type": ("devices = 4", 'devices = "two"',
                   r"sites\[0\]\.devices: expected a positive integer, got 'two' \(str\)"),
    "bool-not-int": ("data = 2", "data = true", r"sites\[0\]\.data: expected a positive integer, got True \(bool\)"),
    "name-not-string": ('name = "t"', "name = 3", r": name: expected a non-empty string, got 3 \(int\)"),
    "missing-site-key": ('backend = "cpu"\n', "",
                         r"sites\[0\]\.backend: missing required key \(required: backend, data, devices, name, "),
    "missing-link-key": (LAT + "\n", "", r"links\[0\]\.latency_ms: missing required key"),
    "missing-between": ('between = ["a", "b"]\n', "", r"links\[0\]\.between: missing required key"),
    "data-x-tensor": ("tensor = 2", "tensor = 3",
                      r"sites\[0\]: data x tensor = 2 x 3 = 6, but devices = 4; make them equal "
                      r"\(e\.g\. devices = data \* tensor\)"),
    "data-x-tensor-fix": ("tensor = 2", "tensor = 1", r"data x tensor = 2 x 1 = 2, but devices = 4.*e\.g\. data = 4"),
    "zero-devices": ("devices = 4", "devices = 0", r"sites\[0\]\.devices: expected a positive integer, got 0 \(int\)"),
    "negative-devices": ("devices = 4", "devices = -4", r"sites\[0\]\.devices: expected a positive integer, got -4"),
    "duplicate-site": ('name = "b"', 'name = "a"', r"sites\[1\]\.name: duplicate site name 'a' \(also sites\[0\]\)"),
    "bad-site-name": (A, 'name = "a b"', r"sites\[0\]\.name: 'a b' is not a valid site name"),
    "empty-backend": ('backend = "cpu"', 'backend = ""', r"sites\[0\]\.backend: expected a non-empty string, got ''"),
    "no-sites": (None, 'name = "t"\n', r": sites: no sites; add at least one \[\[sites\]\] table"),
    "sites-not-array": (None, '[sites]\nname = "a"\n', r": sites: expected an array of tables \[\[sites\]\]"),
    "run-not-table": (None, "run = 3\n" + GOOD.replace("[run]\nmicrobatches = 8\n", ""),
                      r": run: expected a table \[run\], got 3 \(int\)"),
    "link-unknown-site": ('["a", "b"]', '["a", "c"]', r"links\[0\]\.between: unknown site 'c'; sites: 'a', 'b'"),
    "link-to-itself": ('["a", "b"]', '["a", "a"]', r"links\[0\]\.between: a link from site 'a' to itself"),
    "link-one-site": ('["a", "b"]', '["a"]', r"links\[0\]\.between: expected two site names"),
    "duplicate-link": (None, GOOD + LINK.replace('"a", "b"', '"b", "a"'),
                       r"links\[1\]\.between: duplicate link b-a \(also links\[0\]\)"),
    "missing-link": (LINK, "", r": links: no link between pipeline neighbours 'a' \(sites\[0\]\) and 'b' "
                               r'\(sites\[1\]\); add a \[\[links\]\] table with between = \["a", "b"\]'),
    "zero-bandwidth": ("bandwidth_gbps = 100", "bandwidth_gbps = 0",
                       r"links\[0\]\.bandwidth_gbps: got 0: a link with no bandwidth"),
    "negative-bandwidth": ("bandwidth_gbps = 100", "bandwidth_gbps = -5.5",
                           r"bandwidth_gbps: got -5\.5: a link with no bandwidth"),
    "string-bandwidth": ("bandwidth_gbps = 100", 'bandwidth_gbps = "fast"',
                         r"bandwidth_gbps: expected a positive number of Gbit/s, got 'fast' \(str\)"),
    "negative-latency": (LAT, "latency_ms = -1.0",
                         r"links\[0\]\.latency_ms: expected a number >= 0 \(milliseconds\), got -1\.0 \(float\)"),
    "unknown-codec": (LAT, LAT + '\nactivations = "fp16"',
                      r"links\[0\]\.activations: unknown codec 'fp16'.*expected one of none, bf16, int8, fp8"),
    "unknown-cotangent-codec": (LAT, LAT + '\ncotangents = "gzip"', r"links\[0\]\.cotangents: unknown codec 'gzip'; "),
    "layers-some-only": (A, A + "\nlayers = 4",
                         r"sites\[1\]\.layers: layers given for some sites only; give it for every site or none "
                         r"\(missing: b\)"),
    "layer-share-zero": (A, A + "\nlayers = 0",
                         r"sites\[0\]\.layers: expected a positive integer \(a layer share: every site holds at "
                         r"least one block\), got 0"),
    "invalid-toml": ("devices = 4", "devices = ", r"t\.toml: invalid TOML: "),
    "microbatches-zero": ("microbatches = 8", "microbatches = 0",
                          r"run\.microbatches: expected a positive integer, got 0"),
    "batch-not-split": ("microbatches = 8", "microbatches = 8\nbatch_size = 30",
                        r"run\.batch_size: a batch of 30 does not split into 8 equal microbatches"),
    "compute-dtype": (A, A + '\ncompute_dtype = "bf16"',
                      r"sites\[0\]\.compute_dtype: unknown compute_dtype 'bf16' \(did you mean 'bfloat16'\?\); "
                      r"expected one of float32"),
    "processes-zero": (A, A + "\nprocesses = 0", r"sites\[0\]\.processes: expected a positive integer, got 0"),
    "processes-split": (A, A + "\nprocesses = 3",
                        r"sites\[0\]\.processes: 4 devices do not split evenly over 3 processes"),
    "bad-address": (A, A + '\naddress = "localhost"',
                    r"sites\[0\]\.address: expected 'host:port' with a port in 1\.\.65535, got 'localhost'"),
    "memory-negative": (A, A + "\nmemory_gib = -80", r"sites\[0\]\.memory_gib: expected a positive number, got -80\.0"),
    "plugin-options-without-plugin": (A, A + "\nplugin_options = { cpu_device_count = 4 }",
                                      r"sites\[0\]\.plugin_options: options for a plugin, but the site names none"),
    "plugin-options-not-a-table": (A, A + '\nplugin = "package:x"\nplugin_options = 4',
                                   r"sites\[0\]\.plugin_options: expected a table of option = value, got 4 \(int\)"),
    "plugin-option-value": (A, A + '\nplugin = "package:x"\nplugin_options = { ids = [1, 2] }',
                            r"sites\[0\]\.plugin_options\.ids: expected a string, number or boolean .*got \[1, 2\]"),
    "first-device-negative": (A, A + "\nfirst_device = -1",
                              r"sites\[0\]\.first_device: expected an integer >= 0 \(a device index on the site's "
                              r"client\), got -1 \(int\)"),
    "share-devices-not-bool": (A, A + '\nshare_devices = "yes"',
                               r"sites\[0\]\.share_devices: expected true or false, got 'yes' \(str\)"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_file_has_its_own_message(tmp_path, case):
    old, new, regex = BAD[case]
    if old is not None:
        assert old in GOOD, f"test table out of date: {old!r} not in GOOD"
    path = tmp_path / "t.toml"
    path.write_text(new if old is None else GOOD.replace(old, new, 1))
    with pytest.raises(TopologyError, match=regex) as e:
        load_topology(path)
    assert str(e.value).startswith(f"{path}: "), "every message starts with the file"


def test_good_base_file_loads(tmp_path):
    # The table above is only meaningful if the unedited file is valid.
    path = tmp_path / "t.toml"
    path.write_text(GOOD)
    t = load_topology(path)
    assert (t.name, t.source, t.n_sites, t.total_devices) == ("t", str(path), 2, 8)
    assert t.run == RunDefaults(microbatches=8)
    assert t.link("b", "a") is t.link("a", "b") and t.link("a", "b").bandwidth_gbps == 100.0


@pytest.mark.parametrize("path", shipped(), ids=lambda p: p.stem)
def test_shipped_file_loads(path):
    t = load_topology(path)
    assert t.name == path.stem and t.description
    for a, b in t.neighbours():
        assert t.link(a.name, b.name).bandwidth_gbps > 0
    shares = t.layer_shares(2 * t.n_sites)
    assert sum(shares) == 2 * t.n_sites and len(shares) == t.n_sites
    for s in t.sites:
        assert s.data * s.tensor == s.devices
        # The default run splits into microbatches that divide over every site's data-parallel ranks.
        assert t.run.batch_size // t.run.microbatches % s.data == 0, (s.name, t.run)
    assert t.name in t.summary() and all(s.name in t.summary() for s in t.sites)


def test_shipped_set_and_contents():
    names = {p.stem for p in shipped()}
    assert {"local", "local-4site", "local-1site", "two-dc-nvidia-ascend", "two-dc-nvidia-amd",
            "three-site-longhaul"} <= names
    local = load_topology("local")
    assert local.source == str(meshes.DIR / "local.toml")
    assert [(s.name, s.backend, s.devices, s.data, s.tensor) for s in local.sites] == [
        ("a", "cpu", 4, 2, 2), ("b", "cpu", 4, 2, 2)]
    assert (local.link("a", "b").bandwidth_gbps, local.link("a", "b").latency_ms) == (100.0, 1.0)
    assert [(s.data, s.tensor) for s in load_topology("local-4site.toml").sites] == [(2, 1)] * 4
    assert [(s.data, s.tensor) for s in load_topology("local-1site").sites] == [(4, 2)]
    dc = load_topology("two-dc-nvidia-ascend")
    assert [(s.backend, s.device_kind, s.devices, s.data, s.tensor) for s in dc.sites] == [
        ("cuda", "H100", 1024, 128, 8), ("ascend", "Ascend910B", 1536, 192, 8)]
    assert dc.link("nv", "asc") == Link(("nv", "asc"), 100.0, 15.0, activations="bf16")
    amd = load_topology("two-dc-nvidia-amd")
    assert [s.backend for s in amd.sites] == ["cuda", "rocm"] and amd.total_devices == 1024
    three = load_topology("three-site-longhaul")
    speeds = sorted((ln.bandwidth_gbps, ln.latency_ms) for ln in three.links)
    assert three.n_sites == 3 and speeds[0] == (10.0, 50.0) and speeds[1][0] > 10.0


def test_missing_file_lists_shipped_names(tmp_path):
    with pytest.raises(TopologyError, match=r"locl: no such topology file \(did you mean 'local'\?\); shipped "
                                            r"topologies: .*local-1site.*two-dc-nvidia-ascend"):
        load_topology("locl")
    with pytest.raises(TopologyError, match=r"no such topology file; shipped topologies: "):
        load_topology(tmp_path / "nope.toml")


@pytest.mark.parametrize("n_sites,data,tensor", [(1, 1, 1), (1, 4, 2), (2, 2, 2), (2, 1, 4), (4, 2, 1), (4, 1, 1)])
def test_uniform(n_sites, data, tensor):
    t = uniform(n_sites, data=data, tensor=tensor)
    assert t.source == "<code>" and t.n_sites == n_sites
    assert [s.name for s in t.sites] == [f"s{i}" for i in range(n_sites)]
    assert all((s.backend, s.devices, s.data, s.tensor) == ("cpu", data * tensor, data, tensor) for s in t.sites)
    assert t.total_devices == n_sites * data * tensor
    assert [(a.name, b.name) for a, b in t.neighbours()] == [(f"s{i}", f"s{i + 1}") for i in range(n_sites - 1)]
    assert len(t.links) == n_sites - 1


def test_uniform_is_validated():
    with pytest.raises(TopologyError, match=r"^<code>: sites\[0\]\.devices: expected a positive integer, got 0"):
        uniform(2, data=0)
    with pytest.raises(TopologyError, match=r"^<code>: links\[0\]\.bandwidth_gbps: got 0: a link with no bandwidth"):
        uniform(2, bandwidth_gbps=0)
    with pytest.raises(TopologyError, match=r"^<code>: n_sites: expected a positive integer, got 0"):
        uniform(0)
    with pytest.raises(TopologyError, match=r"^<code>: layers: expected one share per site \(3\), got 2"):
        uniform(3, layers=[1, 2])


@pytest.mark.parametrize("n_sites,n_layers,layers,expected", [
    (1, 8, None, (8,)), (2, 8, None, (4, 4)), (3, 8, None, (3, 3, 2)), (4, 7, None, (2, 2, 2, 1)),
    (4, 4, None, (1, 1, 1, 1)), (2, 8, [5, 3], (5, 3)), (3, 6, 2, (2, 2, 2)),
])
def test_layer_shares(n_sites, n_layers, layers, expected):
    assert uniform(n_sites, layers=layers).layer_shares(n_layers) == expected


@pytest.mark.parametrize("n,k,expected", [
    (8, 1, (8,)), (8, 2, (4, 4)), (8, 3, (3, 3, 2)), (7, 4, (2, 2, 2, 1)), (4, 4, (1, 1, 1, 1)), (10, 4, (3, 3, 2, 2)),
])
def test_even_split_puts_the_remainder_first(n, k, expected):
    assert even_split(n, k) == expected
    assert sum(expected) == n


def test_layer_shares_errors(tmp_path):
    with pytest.raises(TopologyError, match=r"^<code>: 4 sites need at least one block each, but the model has 3 "):
        uniform(4).layer_shares(3)
    with pytest.raises(TopologyError, match=r"sites\[\*\]\.layers = \[5, 4\] sum to 9, but the model has 8 layers"):
        uniform(2, layers=[5, 4]).layer_shares(8)
    with pytest.raises(TopologyError, match=r"n_layers: expected a positive integer, got 2\.0 \(float\)"):
        uniform(2).layer_shares(2.0)
    path = tmp_path / "deep.toml"
    path.write_text(GOOD.replace('"t"', '"deep"'))
    with pytest.raises(TopologyError, match=rf"^{re.escape(str(path))}: 2 sites need .* the model has 1 layers"):
        load_topology(path).layer_shares(1)


def test_backend_aliases_and_custom_backends():
    sites = (Site("x", " NPU", 1, 1, 1), Site("y", "GPU", 1, 1, 1), Site("z", "my_plugin", 1, 1, 1, plugin="/p.so"))
    links = (Link(["x", "y"], 1, 0), Link(("y", "z"), 1, 0))
    t = Topology("alias", sites, links, RunDefaults(), "<code>")
    assert [s.backend for s in t.sites] == ["ascend", "cuda", "my_plugin"]
    assert t.links[0].sites == ("x", "y") and isinstance(t.links[0].bandwidth_gbps, float)


def test_non_neighbour_link_is_allowed_and_lookup_errors():
    t = uniform(3)
    t = dataclasses.replace(t, links=t.links + (Link(("s2", "s0"), 10, 30),))
    assert t.link("s0", "s2").latency_ms == 30.0
    with pytest.raises(TopologyError, match=r"^<code>: no site named 'nope'; sites: 's0', 's1', 's2'"):
        t.site("nope")
    with pytest.raises(TopologyError, match=r"no link between 's0' and 's2'; links: s0-s1, s1-s2"):
        uniform(3).link("s0", "s2")


def test_replace_revalidates():
    dc = load_topology("two-dc-nvidia-ascend")
    cpu = dc.replace_sites(backend="cpu", device_kind=None, devices=2, data=2, tensor=1, processes=1)
    assert [(s.backend, s.devices) for s in cpu.sites] == [("cpu", 2), ("cpu", 2)] and cpu.source == dc.source
    assert cpu.replace_site("asc", data=1, devices=1).site("asc").devices == 1
    with pytest.raises(TopologyError, match=r"two-dc-nvidia-ascend\.toml: sites\[1\]: data x tensor = 3 x 8 = 24"):
        dc.replace_site("asc", data=3)
    with pytest.raises(TopologyError, match=r"^<code>: run\.microbatches: expected a positive integer, got 0"):
        dataclasses.replace(uniform(2), run=RunDefaults(microbatches=0))


def test_run_defaults_fill_only_what_is_missing_and_keep_explicit_values():
    from hxtrain.training.trainer import RunConfig

    run = RunDefaults(model="tiny", schedule="1f1b", microbatches=4, batch_size=16, steps=20)
    got = run.fill(RunConfig(steps=3, schedule=None))
    assert (got.model, got.schedule, got.microbatches, got.batch_size, got.steps) == ("tiny", "1f1b", 4, 16, 3)
    assert run.fill(RunConfig(), schedule="gpipe").schedule == "gpipe"  # a caller's default before the table's
    assert run.fill(RunConfig(schedule="zb-h1"), schedule="gpipe").schedule == "zb-h1"  # explicit wins
    for flag, field in (("--steps", "steps"), ("--microbatches", "microbatches"), ("--batch-size", "batch_size")):
        with pytest.raises(TopologyError, match=rf"^{flag}: expected a whole number >= 1, got 0$"):
            run.fill(RunConfig(**{field: 0}))  # an explicit 0 is refused, never replaced by the default
