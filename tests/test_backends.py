"""Backend registry: names, plugin discovery, the guarded JAX plugin API, capabilities, dtypes, devices.

Runs on CPU with no plugin installed. Discovery is fed explicit `env`/`providers` so the results do not
depend on what this machine has; no bogus plugin is ever registered with this process's JAX.
"""

import _ctypes
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import pytest

import hxtrain
import hxtrain.backends as hb
from hxtrain.backends import BackendError, PluginNotInstalledError
from hxtrain.backends import _jax_bridge

NO_PLUGINS = frozenset()
NO_ENV: dict[str, str] = {}


@pytest.fixture
def fake_so(tmp_path) -> Path:
    """A file that looks like an ELF shared library but is garbage past the magic."""
    p = tmp_path / "libpjrt_fake.so"
    p.write_bytes(b"\x7fELF" + b"\0" * 60)
    return p


@pytest.fixture
def real_non_pjrt_so() -> Path:
    """A real, loadable shared library that is not a PJRT plugin (CPython's _ctypes extension)."""
    p = Path(_ctypes.__file__)
    assert p.suffix == ".so", f"expected _ctypes to be a shared library, got {p}"
    return p


# ---- names ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("alias, name", [("gpu", "cuda"), ("NVIDIA", "cuda"), ("cuda", "cuda"), ("amd", "rocm"),
                                         ("npu", "ascend"), (" Ascend ", "ascend"), ("tpu", "tpu"), ("CPU", "cpu")])
def test_aliases_resolve(alias, name):
    assert hb.canonical_backend(alias) == name


def test_unknown_backend_lists_names_and_suggests():
    with pytest.raises(BackendError, match=r"unknown backend 'cdua': known backends are amd, ascend, cpu, cuda, "
                                           r"gpu, npu, nvidia, rocm, tpu.*did you mean 'cuda'\?"):
        hb.canonical_backend("cdua")
    with pytest.raises(BackendError, match=r"unknown backend 'quantum'.*plugin:/path") as e:
        hb.canonical_backend("quantum")
    assert "did you mean" not in str(e.value)
    with pytest.raises(BackendError, match=r"non-empty string, got ''"):
        hb.canonical_backend("")
    with pytest.raises(BackendError, match=r"the path is empty"):
        hb.canonical_backend("plugin:")


@pytest.mark.parametrize("path, platform", [("/x/libpjrt_ascend.so", "ascend"), ("/x/libfoo.so", "foo"),
                                            ("pjrt-my-npu.so", "my_npu"), ("/x/libmychip_plugin.so.1", "mychip")])
def test_plugin_platform_name(path, platform):
    assert hb.plugin_platform_name(path) == platform


# ---- PJRT_NAMES_AND_LIBRARY_PATHS --------------------------------------------------------------------------

def test_parse_pjrt_env_good():
    assert hb.parse_pjrt_env("") == {}
    assert hb.parse_pjrt_env("ascend:/opt/a.so,foo:/opt/foo.json", sep=":") == {
        "ascend": "/opt/a.so", "foo": "/opt/foo.json"}
    assert hb.parse_pjrt_env("npu;C:/p/npu.dll", sep=";") == {"npu": "C:/p/npu.dll"}


@pytest.mark.parametrize("value, msg", [
    ("ascend", r"malformed entry 'ascend'"), ("ascend:", r"malformed entry 'ascend:'"),
    (":/x.so", r"malformed entry ':/x.so'"), ("a:/x.so,", r"malformed entry ''"),
    ("a:/x:y.so", r"malformed entry 'a:/x:y.so'"), (" a:/x.so", r"entry ' a:/x.so' has spaces around the name"),
    ("a:/x.so,a:/y.so", r"plugin name 'a' appears twice"),
])
def test_parse_pjrt_env_malformed(value, msg):
    with pytest.raises(BackendError, match=r"PJRT_NAMES_AND_LIBRARY_PATHS: " + msg):
        hb.parse_pjrt_env(value, sep=":")


# ---- discovery ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend, extra, package", [
    ("cuda", "cuda", "jax-cuda12-plugin"), ("gpu", "cuda", "jax-cuda13-plugin"),
    ("rocm", "rocm", "jax-rocm7-plugin"), ("tpu", "tpu", "libtpu"),
])
def test_missing_plugin_names_the_pip_extra(backend, extra, package):
    with pytest.raises(PluginNotInstalledError, match=rf"no plugin for it is installed: install it with "
                                                      rf"`pip install 'hxtrain\[{extra}\]'` \(provides .*{package}"):
        hb.find_plugin(backend, env=NO_ENV, providers=NO_PLUGINS)


def test_ascend_without_plugin_says_no_public_plugin_exists():
    expected = ('no public JAX PJRT plugin exists for Ascend; point hxtrain at one with plugin = '
                '"/path/to/libpjrt_ascend.so" in the site table or PJRT_NAMES_AND_LIBRARY_PATHS=ascend:/path.so')
    with pytest.raises(PluginNotInstalledError) as e:
        hb.find_plugin("npu", env=NO_ENV, providers=NO_PLUGINS)
    assert str(e.value).endswith(expected)


@pytest.mark.parametrize("providers, backend, how, where", [
    ({"xla_cuda12"}, "gpu", "jax_plugins", "xla_cuda12"),
    ({"xla_cuda13", "other"}, "cuda", "jax_plugins", "xla_cuda13"),
    ({"xla_rocm7"}, "amd", "jax_plugins", "xla_rocm7"), ({"libtpu"}, "tpu", "libtpu", "libtpu"),
    ({"xla_cuda12"}, "cpu", "builtin", "jaxlib"),
])
def test_find_plugin_from_providers(providers, backend, how, where):
    src = hb.find_plugin(backend, env=NO_ENV, providers=frozenset(providers))
    assert (src.how, src.where, src.platform) == (how, where, hb.canonical_backend(backend))


def test_installed_providers_scans_namespace_without_importing(tmp_path, monkeypatch):
    pkg = tmp_path / "jax_plugins" / "xla_cuda12"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('discovery must not import plugins')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "jax_plugins" not in sys.modules  # else find_spec would answer from the cached module
    found = hb.installed_providers()
    assert "xla_cuda12" in found
    assert "jax_plugins.xla_cuda12" not in sys.modules
    assert hb.find_plugin("cuda", env=NO_ENV, providers=found).where == "xla_cuda12"


def test_find_plugin_from_env_and_site_plugin(fake_so):
    env = {hb.ENV_VAR: f"npu:{fake_so}"}
    src = hb.find_plugin("ascend", env=env, providers=NO_PLUGINS)
    assert (src.platform, src.how, src.where) == ("npu", "env", str(fake_so.resolve()))
    src = hb.find_plugin("ascend", plugin=str(fake_so), env=NO_ENV, providers=NO_PLUGINS)
    assert (src.platform, src.how) == ("ascend", "library")
    src = hb.find_plugin(f"plugin:{fake_so}", env=NO_ENV, providers=NO_PLUGINS)
    assert (src.platform, src.how) == ("fake", "library")
    with pytest.raises(BackendError, match=r"PJRT_NAMES_AND_LIBRARY_PATHS entry 'ascend'.*does not exist"):
        hb.find_plugin("ascend", env={hb.ENV_VAR: "ascend:/nope/libpjrt_ascend.so"}, providers=NO_PLUGINS)
    with pytest.raises(BackendError, match=r"malformed entry"):
        hb.find_plugin("ascend", env={hb.ENV_VAR: "ascend"}, providers=NO_PLUGINS)


# ---- plugin libraries and the guarded JAX API --------------------------------------------------------------

def test_check_plugin_library_rejects_bad_paths(tmp_path, fake_so, real_non_pjrt_so):
    with pytest.raises(BackendError, match=r"'/nope/libx.so' does not exist"):
        hb.check_plugin_library("/nope/libx.so")
    with pytest.raises(BackendError, match=r"is not a file; expected the path of the plugin's .so"):
        hb.check_plugin_library(tmp_path)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(BackendError, match=r"is not a shared library \(its first bytes are b'hell'\)"):
        hb.check_plugin_library(text)
    assert hb.check_plugin_library(fake_so) == fake_so.resolve()  # the cheap checks pass
    with pytest.raises(BackendError, match=r"cannot load PJRT plugin library"):
        hb.check_plugin_library(fake_so, load=True)
    with pytest.raises(BackendError, match=r"loads but does not export GetPjrtApi, so it is not a PJRT plugin"):
        hb.check_plugin_library(real_non_pjrt_so, load=True)


def test_check_plugin_library_json_config(tmp_path, fake_so):
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"library_path": str(fake_so)}))
    assert hb.check_plugin_library(good) == fake_so.resolve()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"path": str(fake_so)}))
    with pytest.raises(BackendError, match=r"must be JSON with a \"library_path\" field"):
        hb.check_plugin_library(bad)


def _fake_bridge(initialised=False, calls=None, fail=None):
    def register_plugin(name, *, priority=400, library_path=None, options=None):
        if fail:
            raise RuntimeError(fail)
        calls.append((name, priority, library_path, options))
    return SimpleNamespace(register_plugin=register_plugin, _backends={"cpu": object()} if initialised else {})


@pytest.mark.parametrize("make_path, msg", [
    (lambda tmp: tmp / "missing.so", r"does not exist"),
    (lambda tmp: tmp, r"is not a file"),
    (lambda tmp: (tmp / "x.so").write_text("not a library") and tmp / "x.so", r"is not a shared library"),
])
def test_register_rejects_bad_path_before_touching_jax(tmp_path, make_path, msg):
    untouchable = SimpleNamespace()  # any access to JAX's API would fail with "no longer exists"
    with pytest.raises(BackendError, match=rf"plugin 'ascend': .*{msg}"):
        hb.register_plugin_library("ascend", make_path(tmp_path), _bridge_module=untouchable)


def test_register_after_backends_initialised_is_refused(fake_so):
    assert jax.devices()  # conftest has initialised the backends; the real bridge must say so
    with pytest.raises(BackendError, match=r"plugin 'ascend': JAX has already initialised its backends.*"
                                           r"PJRT_NAMES_AND_LIBRARY_PATHS=ascend:"):
        hb.register_plugin_library("ascend", fake_so)
    with pytest.raises(BackendError, match=r"already initialised"):
        hb.register_plugin_library("ascend", fake_so, _bridge_module=_fake_bridge(initialised=True, calls=[]))


def test_register_api_matches_installed_jax():
    from jax._src import xla_bridge

    assert _jax_bridge._register_api(xla_bridge) is xla_bridge.register_plugin
    assert _jax_bridge._backends_initialised(xla_bridge) is True


def test_register_when_private_api_moved(fake_so):
    with pytest.raises(BackendError, match=rf"jax {jax.__version__}: .*register_plugin no longer exists; "
                                           r"set PJRT_NAMES_AND_LIBRARY_PATHS"):
        hb.register_plugin_library("ascend", fake_so, _bridge_module=SimpleNamespace())
    old = SimpleNamespace(register_plugin=lambda name, library_path=None: None, _backends={})
    with pytest.raises(BackendError, match=r"lost parameter\(s\) \['priority', 'options'\]"):
        hb.register_plugin_library("ascend", fake_so, _bridge_module=old)
    blind = SimpleNamespace(register_plugin=_fake_bridge(calls=[]).register_plugin)
    with pytest.raises(BackendError, match=r"cannot tell whether JAX's backends are initialised"):
        hb.register_plugin_library("ascend", fake_so, _bridge_module=blind)


def test_register_loads_then_hands_to_jax(fake_so, real_non_pjrt_so, monkeypatch):
    calls = []
    with pytest.raises(BackendError, match=r"cannot load PJRT plugin library"):
        hb.register_plugin_library("ascend", fake_so, _bridge_module=_fake_bridge(calls=calls))
    with pytest.raises(BackendError, match=r"does not export GetPjrtApi"):
        hb.register_plugin_library("ascend", real_non_pjrt_so, _bridge_module=_fake_bridge(calls=calls))
    assert calls == []  # JAX never saw a library that failed the checks
    # No real PJRT plugin exists on a CPU machine: stand in for the load check to see what JAX is handed.
    monkeypatch.setattr(_jax_bridge, "check_plugin_library", lambda p, load=False, what="": Path(p))
    hb.register_plugin_library("ascend", fake_so, priority=500, options={"k": 1},
                               _bridge_module=_fake_bridge(calls=calls))
    assert calls == [("ascend", 500, str(fake_so), {"k": 1})]
    with pytest.raises(BackendError, match=r"plugin 'ascend': JAX refused to register .*RuntimeError: boom"):
        hb.register_plugin_library("ascend", fake_so, _bridge_module=_fake_bridge(calls=calls, fail="boom"))


@pytest.mark.parametrize("name", ["Ascend", "", "my-npu", 3])
def test_register_rejects_bad_names(fake_so, name):
    with pytest.raises(BackendError, match=r"plugin name must be lower-case letters"):
        hb.register_plugin_library(name, fake_so, _bridge_module=SimpleNamespace())


# ---- capabilities ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, name", [
    ("cpu", "cpu"), ("NVIDIA A100-SXM4-80GB", "NVIDIA A100 SXM"), ("NVIDIA A100-SXM4-40GB", "NVIDIA A100 40GB"),
    ("NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM"), ("H100", "NVIDIA H100 SXM"), ("NVIDIA H100 PCIe", "NVIDIA H100 PCIe"),
    ("NVIDIA H200", "NVIDIA H200"), ("NVIDIA B200", "NVIDIA B200"), ("AMD Instinct MI250X", "AMD MI250X"),
    ("MI300X", "AMD MI300X"), ("AMD Instinct MI300X", "AMD MI300X"), ("TPU v4", "TPU v4"),
    ("TPU v5 lite", "TPU v5e"), ("TPU v5", "TPU v5p"), ("TPU v5p", "TPU v5p"), ("TPU v6 lite", "TPU v6e"),
    ("Ascend910A", "Ascend 910A"), ("Ascend910", "Ascend 910A"), ("Ascend910B", "Ascend 910B"),
    ("Ascend910B3", "Ascend 910B"),
])
def test_capability_lookup_by_device_kind(kind, name):
    cap = hb.capability_for(kind)
    assert cap.name == name and cap.known


def test_capability_table_is_consistent():
    for cap in hb.CAPABILITIES.values():
        assert cap.known and cap.source, cap.name
        assert cap.hbm_gib > 0 and cap.bandwidth_gbs > 0 and cap.flops_fp32 > 0, cap.name
        assert cap.dtypes[0] == "float32", cap.name
        for dtype in cap.dtypes[1:] if cap.platform != "cpu" else ():  # CPU emulates 16-bit floats
            # on accelerators narrower formats are never slower than fp32
            assert cap.peak_flops(dtype) >= cap.flops_fp32, (cap.name, dtype)
        assert (cap.fp8_format is None) == (cap.flops_fp8 is None), cap.name
        assert hb.capability_for(cap.name) == cap  # every table name finds itself


def test_fp8_formats_per_vendor():
    formats = {c.name: c.fp8_format for c in hb.CAPABILITIES.values()}
    assert {n for n, f in formats.items() if f == "e4m3fn"} == {
        "NVIDIA H100 SXM", "NVIDIA H100 PCIe", "NVIDIA H200", "NVIDIA B200"}
    assert {n for n, f in formats.items() if f == "e4m3fnuz"} == {"AMD MI300X"}
    assert formats["NVIDIA A100 SXM"] is None and formats["AMD MI250X"] is None
    assert all(formats[n] is None for n in formats if n.startswith(("TPU", "Ascend", "cpu")))


def test_ascend_910a_has_no_bf16():
    a, b = hb.capability_for("Ascend910A"), hb.capability_for("Ascend910B")
    assert not a.supports("bfloat16") and a.supports("float16") and b.supports("bfloat16")
    with pytest.raises(BackendError,
                       match=r"device 'Ascend 910A' has no bfloat16 compute \(it supports float32, float16\)"):
        a.peak_flops("bfloat16")
    with pytest.raises(BackendError, match=r"dtype must be one of .*got 'float64'"):
        a.peak_flops("float64")


def test_unknown_device_kind_gets_conservative_default():
    cap = hb.capability_for("Cerebras WSE-9")
    assert not cap.known and cap.name == "unknown (Cerebras WSE-9)" and cap.dtypes == ("float32",)
    slowest = min(c.flops_fp32 for c in hb.CAPABILITIES.values() if c.platform != "cpu")
    assert cap.flops_fp32 <= slowest and cap.hbm_gib <= min(c.hbm_gib for c in hb.CAPABILITIES.values())
    assert "unknown kind: conservative default" in cap.summary()
    with pytest.raises(BackendError, match=r"device_kind must be a string.*got None"):
        hb.capability_for(None)


def test_capability_summary():
    assert hb.capability_for("H100").summary() == "NVIDIA H100 SXM: 989 TF bf16, 80 GiB, 3350 GB/s, fp8 e4m3fn"
    assert hb.capability_for("Ascend910A").summary().startswith("Ascend 910A: 256 TF fp16")


# ---- dtype policy ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, compute", [("cpu", "float32"), ("H100", "bfloat16"), ("MI300X", "bfloat16"),
                                           ("TPU v4", "bfloat16"), ("Ascend910A", "float16"),
                                           ("Ascend910B", "bfloat16"), ("mystery chip", "float32")])
def test_default_dtype_policy(kind, compute):
    assert hb.dtype_policy(hb.capability_for(kind)) == hb.DtypePolicy("float32", compute, compute)


def test_dtype_policy_overrides():
    h100, a910 = hb.capability_for("H100"), hb.capability_for("Ascend910A")
    assert hb.dtype_policy(h100, "fp32").compute_dtype == "float32"
    assert hb.dtype_policy(hb.capability_for("cpu"), "bf16").compute_dtype == "bfloat16"
    assert hb.dtype_policy(a910, "float16") == hb.DtypePolicy("float32", "float16", "float16")
    with pytest.raises(BackendError, match=r"compute_dtype 'bfloat16' is not supported by device 'Ascend 910A' "
                                           r"\(it supports float32, float16\)"):
        hb.dtype_policy(a910, "bfloat16")
    with pytest.raises(BackendError, match=r"compute_dtype 'float16' is not supported by device 'TPU v4'"):
        hb.dtype_policy(hb.capability_for("TPU v4"), "float16")
    for bad in ("float64", "int8", 16):
        with pytest.raises(BackendError, match=r"compute_dtype must be one of \('float32', 'bfloat16', 'float16'\)"):
            hb.dtype_policy(h100, bad)


@pytest.mark.parametrize("a, b, codec, wire", [
    ("H100", "H200", "fp8", "float8_e4m3fn"), ("MI300X", "MI300X", "fp8", "float8_e4m3fnuz"),
    ("H100", "MI300X", "fp8", "bfloat16"),  # fp8 formats differ: never mix them on one link
    ("H100", "Ascend910A", "fp8", "float16"), ("H100", "Ascend910A", "bf16", "float32"),
    ("H100", "Ascend910B", "bf16", "bfloat16"), ("A100", "A100", "fp8", "bfloat16"),
    ("cpu", "H100", "none", "float32"), ("Ascend910A", "TPU v4", "int8", "int8"),
    ("Ascend910A", "TPU v4", "fp8", "float32"),
])
def test_link_wire_dtype(a, b, codec, wire):
    ca, cb = hb.capability_for(a), hb.capability_for(b)
    assert hb.link_wire_dtype(ca, cb, codec) == wire
    assert hb.link_wire_dtype(cb, ca, codec) == wire  # symmetric


def test_link_wire_dtype_bad_codec():
    cpu = hb.capability_for("cpu")
    with pytest.raises(BackendError, match=r"link codec must be one of \('none', 'bf16', 'int8', 'fp8'\), got 'zstd'"):
        hb.link_wire_dtype(cpu, cpu, "zstd")


# ---- devices -----------------------------------------------------------------------------------------------

def test_devices_for_cpu_with_offset():
    devs = hb.devices_for("cpu", 4, offset=4)
    assert devs == jax.devices("cpu")[4:8]
    assert [d.id for d in hb.devices_for("CPU", 2)] == [0, 1]


def test_devices_for_too_many():
    with pytest.raises(BackendError, match=r"^site 'a' asks for 9 devices of backend 'cpu', which has 8; for fake CPU "
                                           r"devices set XLA_FLAGS=--xla_force_host_platform_device_count=9"):
        hb.devices_for("cpu", 9, site="a")
    with pytest.raises(BackendError, match=r"site 'b' asks for 5 devices of backend 'cpu' starting at offset 4, "
                                           r"which has 8.*device_count=9"):
        hb.devices_for("cpu", 5, offset=4, site="b")


@pytest.mark.parametrize("count, offset, msg", [(0, 0, r"count must be an int >= 1, got 0"),
                                                (2, -1, r"offset must be an int >= 0, got -1"),
                                                (True, 0, r"count must be an int >= 1, got True"),
                                                (2.0, 0, r"count must be an int >= 1, got 2.0")])
def test_devices_for_bad_counts(count, offset, msg):
    with pytest.raises(BackendError, match=rf"site 's0': {msg}"):
        hb.devices_for("cpu", count, offset, site="s0")


def test_devices_for_missing_and_unknown_backends():
    with pytest.raises(PluginNotInstalledError, match=r"backend 'cuda' is known but .*hxtrain\[cuda\]"):
        hb.devices_for("gpu", 1, env=NO_ENV, providers=NO_PLUGINS)
    with pytest.raises(BackendError, match=r"unknown backend 'tpuu'.*did you mean 'tpu'"):
        hb.devices_for("tpuu", 1)


def test_devices_for_installed_backend_that_fails_to_start(fake_so):
    # The provider is "installed" but JAX (limited to cpu by conftest) cannot start it: JAX's error is wrapped.
    with pytest.raises(BackendError, match=r"backend 'cuda' is installed \(jax_plugins: xla_cuda12\) but failed to "
                                           r"initialise: RuntimeError: .*JAX_PLATFORMS='cpu' leaves it out"):
        hb.devices_for("cuda", 1, env={"JAX_PLATFORMS": "cpu"}, providers=frozenset({"xla_cuda12"}))
    with pytest.raises(BackendError, match=r"backend 'ascend' is installed \(library: .*libpjrt_fake.so\) but failed"):
        hb.devices_for("ascend", 1, plugin=str(fake_so), env=NO_ENV, providers=NO_PLUGINS)


def test_describe_on_this_machine_lists_cpu():
    rows = {r["backend"]: r for r in hb.describe()}  # real discovery: whatever else is installed, cpu works
    assert set(rows) >= {"cpu", "cuda", "rocm", "tpu", "ascend"}
    assert (rows["cpu"]["installed"], rows["cpu"]["initialised"], rows["cpu"]["devices"]) == (True, True, 8)


def test_describe_and_format_table():
    rows = {r["backend"]: r for r in hb.describe(env=NO_ENV, providers=NO_PLUGINS)}
    assert list(rows) == ["cpu", "cuda", "rocm", "tpu", "ascend"]
    cpu = rows["cpu"]
    assert (cpu["installed"], cpu["initialised"], cpu["devices"], cpu["device_kind"]) == (True, True, 8, "cpu")
    assert cpu["capability"].startswith("cpu: ") and cpu["provider"] == "builtin: jaxlib"
    assert not rows["cuda"]["installed"] and rows["cuda"]["initialised"] is None
    assert "hxtrain[cuda]" in rows["cuda"]["note"]
    assert rows["ascend"]["note"].startswith("no public JAX PJRT plugin exists for Ascend")
    table = hb.format_table(list(rows.values()))
    lines = table.splitlines()
    assert lines[0].split() == ["backend", "installed", "initialised", "devices", "device", "kind", "capability"]
    assert lines[2].split()[:5] == ["cpu", "yes", "yes", "8", "cpu"]
    assert "    note: install it with `pip install 'hxtrain[cuda]'`" in table


def test_describe_reports_plugins_that_fail_and_env_plugins(fake_so):
    env = {"JAX_PLATFORMS": "cpu", hb.ENV_VAR: f"ascend:{fake_so},mychip:{fake_so},ghost:/nope/libghost.so"}
    rows = {r["backend"]: r for r in hb.describe(env=env, providers=frozenset({"xla_rocm7"}))}
    assert list(rows) == ["cpu", "cuda", "rocm", "tpu", "ascend", "mychip", "ghost"]
    for name in ("rocm", "ascend", "mychip"):
        assert rows[name]["installed"] and rows[name]["initialised"] is False, name
        assert "failed to initialise" in rows[name]["note"]
    assert rows["mychip"]["provider"] == f"env: {fake_so.resolve()}"
    assert not rows["ghost"]["installed"] and "does not exist" in rows["ghost"]["note"]
    bad = {r["backend"]: r for r in hb.describe(env={hb.ENV_VAR: "garbage"}, providers=NO_PLUGINS)}
    assert bad["cpu"]["initialised"] and "malformed entry 'garbage'" in bad["cuda"]["note"]


# ---- plugins shipped in Python packages, and client names -------------------------------------------------

@pytest.fixture
def plugin_package(tmp_path, monkeypatch, fake_so):
    """An importable package `hx_fake_plugin` holding one libpjrt_*.so (whose code must never run)."""
    pkg = tmp_path / "pkgs" / "hx_fake_plugin"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('locating the library must not import the package')\n")
    (pkg / "libpjrt_fake.so").write_bytes(fake_so.read_bytes())
    monkeypatch.syspath_prepend(str(pkg.parent))
    return pkg


def test_a_plugin_in_a_package_is_found_without_importing_it(plugin_package):
    assert hb.locate_plugin_library("package:hx_fake_plugin") == plugin_package / "libpjrt_fake.so"
    assert hb.locate_plugin_library("package:hx_fake_plugin/libpjrt_fake.so") == plugin_package / "libpjrt_fake.so"
    assert "hx_fake_plugin" not in sys.modules
    src = hb.find_plugin("cpu", plugin="package:hx_fake_plugin", env=NO_ENV, providers=NO_PLUGINS)
    assert (src.platform, src.how, src.where) == ("hx_fake_plugin", "library", str(plugin_package / "libpjrt_fake.so"))
    src = hb.find_plugin("plugin:package:hx_fake_plugin", env=NO_ENV, providers=NO_PLUGINS)
    assert src.platform == "hx_fake_plugin"


def test_package_plugin_errors(plugin_package):
    with pytest.raises(BackendError, match=r"^site plugin: 'package:hx_no_such_pkg': no Python package "
                                           r"'hx_no_such_pkg' is installed in this environment .*pip install"):
        hb.locate_plugin_library("package:hx_no_such_pkg", what="site plugin")
    with pytest.raises(BackendError, match=r"'package:1bad': expected 'package:NAME' or 'package:NAME/path/lib.so'"):
        hb.locate_plugin_library("package:1bad")
    with pytest.raises(BackendError, match=r"package 'hx_fake_plugin' \(.*\) has no file 'lib/other.so'"):
        hb.locate_plugin_library("package:hx_fake_plugin/lib/other.so")
    (plugin_package / "libpjrt_second.so").write_bytes(b"\x7fELF" + b"\0" * 60)
    with pytest.raises(BackendError, match=r"expected one PJRT library in package 'hx_fake_plugin' \(.*\), found "
                                           r"libpjrt_fake.so, libpjrt_second.so; name it as "
                                           r"'package:hx_fake_plugin/FILE.so'"):
        hb.locate_plugin_library("package:hx_fake_plugin")


@pytest.mark.parametrize("spec, name", [("package:fastatomstruct_xla_cpu", "fastatomstruct_xla_cpu"),
                                        ("package:Vendor.sub/lib/x.so", "vendor"),
                                        ("/x/libpjrt_cpu.so", "plugin_cpu"), ("/x/libpjrt_npu.so", "npu")])
def test_plugin_client_names_never_take_a_builtin_name(spec, name):
    assert hb.plugin_client_name(spec, spec.rsplit("/", 1)[-1]) == name


def test_a_plugin_serving_cpu_gets_its_own_client_and_an_accelerator_keeps_its_platform(tmp_path, fake_so):
    cpu_lib = tmp_path / "libpjrt_cpu.so"
    cpu_lib.write_bytes(fake_so.read_bytes())
    assert hb.find_plugin("cpu", plugin=str(cpu_lib), env=NO_ENV, providers=NO_PLUGINS).platform == "plugin_cpu"
    assert hb.find_plugin("ascend", plugin=str(cpu_lib), env=NO_ENV, providers=NO_PLUGINS).platform == "ascend"


def test_registering_after_jax_started_names_the_site_and_the_fix(fake_so):
    # This process started JAX long ago (conftest), on the cpu client only.
    site = hxtrain.Site("b", "cpu", 1, 1, 1, plugin=str(fake_so))
    with pytest.raises(BackendError, match=r"^site 'b' runs on client 'fake', but JAX_PLATFORMS='cpu' leaves it "
                                           r"out; set JAX_PLATFORMS=cpu,fake \(or unset it\) before JAX starts$"):
        hb.register_plugins([site], env=NO_ENV)
    platforms = jax.config.jax_platforms
    jax.config.update("jax_platforms", None)  # read only when JAX starts, which it did: safe to change here
    try:
        with pytest.raises(BackendError, match=r"^site 'b' needs PJRT plugin 'fake' \(.*libpjrt_fake.so\), but JAX "
                                               r"has already initialised its backends without it.*"
                                               r"register_plugins\(topology\)"):
            hb.register_plugins(hxtrain.uniform(1).replace_sites(plugin=str(fake_so), name="b"), env=NO_ENV)
    finally:
        jax.config.update("jax_platforms", platforms)
