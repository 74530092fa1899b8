"""Two PJRT clients in one run: site a on jaxlib's built-in CPU client, site b on XLA's CPU plugin loaded from the
`fastatomstruct-xla-cpu` package (`meshes/local-2client.toml`), the stand-in for CUDA + Ascend on a laptop.

The plugin is a dependency of the test extra, so nothing here is skipped. Plugins are registered before JAX
initialises its backends, which this pytest process has done long ago, so every check that needs the plugin runs
in a fresh process (`_two_client_child.py`, `hxtrain info`, `hxtrain launch`) and is asserted on here.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import computed_once, rel_err
from tests.test_multiprocess import _check_rows, _launch

ROOT = Path(__file__).resolve().parent.parent
CHILD = Path(__file__).resolve().parent / "_two_client_child.py"
PLUGIN = "fastatomstruct_xla_cpu"
# One worker runs this module, so the in-process child below (a minute of compiling) runs once.
pytestmark = pytest.mark.xdist_group("two_clients")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def _child(mode: str, tmp: Path) -> dict:
    out = tmp / f"{mode}.json"
    got = subprocess.run([sys.executable, str(CHILD), mode, str(out)], capture_output=True, text=True,
                         timeout=600, env=_env(), cwd=ROOT)
    assert got.returncode == 0, got.stdout[-3000:] + got.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="session")
def inprocess(tmp_path_factory):
    # once per session, whichever xdist workers run this module's tests (the xdist_group alone did not keep them
    # on one worker: the child ran twice)
    return computed_once(tmp_path_factory, "two-clients-inprocess", lambda folder: _child("inprocess", folder))


def test_the_plugin_is_installed_by_the_test_extra():
    import fastatomstruct_xla_cpu

    assert Path(fastatomstruct_xla_cpu.library_path()).name == "libpjrt_cpu.so"


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe", "zb-h1"])
def test_two_clients_match_the_one_device_reference(inprocess, schedule):
    got = inprocess["schedules"][schedule]
    assert got["loss_rel"] <= 1e-5 and got["grads"] == "ok", got
    # two different clients, each site on its own, although both say platform "cpu" and device ids 0-3
    assert (got["same_client"], got["a_is_builtin"], got["b_is_plugin"]) == (False, True, True)
    assert got["platforms"] == ["cpu", "cpu"] and got["ids"] == [[0, 1, 2, 3], [0, 1, 2, 3]]
    # activations forward and cotangents back, through the host, counted: 2 (S-1) M mb T D * 4 bytes
    assert got["bytes"] == inprocess["analytic_bytes"]
    assert got["per_kind"] == {"act": got["bytes"] // 2, "cot": got["bytes"] // 2}


def test_describe_names_each_sites_client(inprocess):
    assert "site 'a' (cpu, client 'cpu'" in inprocess["describe"]
    assert f"site 'b' (cpu, client '{PLUGIN}'" in inprocess["describe"]


def test_spmd_refuses_sites_on_different_clients(inprocess):
    assert inprocess["spmd"].startswith("ValueError: ")
    assert (f"sites[1] ('b') client: the SPMD executor compiles one program over every site, so it expected 'cpu' "
            f"like sites[0] ('a'), got '{PLUGIN}'; use executor 'mpmd'") in inprocess["spmd"]


def _close(a, b):
    return len(a) == len(b) and all(rel_err(x, y) <= 1e-5 for x, y in zip(a, b))


def test_checkpoints_restore_across_clients(inprocess):
    two, builtin = inprocess["two"], inprocess["builtin"]
    assert _close(two["first"] + two["later"], builtin["first"] + builtin["later"])  # the same maths on both
    for case, uninterrupted in (("two_to_builtin", two), ("two_to_one_device", two), ("builtin_to_two", builtin)):
        got = inprocess[case]
        assert got["resumed_from"] == 2, (case, got)
        assert _close(got["losses"], uninterrupted["later"]), (case, got["losses"], uninterrupted["later"])


def test_export_of_a_two_client_run_loads_on_one_device(inprocess):
    assert inprocess["export_on_builtin"] is True
    assert rel_err(inprocess["export_fixed_loss"], inprocess["two"]["fixed_loss"]) <= 1e-6


def test_placement_keeps_clients_apart_and_says_why_not(tmp_path):
    got = _child("placement", tmp_path)
    # the package, the same library by path, and a jax_plugins package serving "ascend" (JAX discovers it): three
    # more clients, named apart from the built-in "cpu"
    assert got["names"] == ["cpu", PLUGIN, "plugin_cpu", "ascend"] and got["ascend_source"] == "jax_plugins"
    assert got["distinct_clients"] == 4 and got["platforms"] == ["cpu"] * 4
    assert got["ids"] == [[0, 1, 2, 3]] * 3 + [[0, 1]]
    assert got["builtin_after_builtin"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert got["shared"] == [[0, 1, 2, 3], [0, 1, 2, 3]]  # share_devices on both: on purpose
    assert got["too_few"] == (f"BackendError: site 'b' asks for 8 devices of backend 'cpu' on client '{PLUGIN}', "
                              "which has 4; a plugin's device count is its own (XLA's CPU plugin takes "
                              "plugin_options = { cpu_device_count = 8 } in the site table)")
    assert got["past_the_end"] == (f"BackendError: sites 'b' and 'd' are both placed on device 2 of client "
                                   f"'{PLUGIN}'; give 'd' a first_device past the other's devices, or set "
                                   "share_devices = true on both to share them on purpose")
    assert got["overlap"].startswith("BackendError: sites 'a' and 'a2' are both placed on device 2 of client 'cpu'")
    assert got["missing_library"] == ("BackendError: site 'b': backend 'cpu' plugin: PJRT plugin library "
                                      f"'{CHILD.parent / 'missing.so'}' does not exist")
    assert got["options_disagree"].startswith(f"BackendError: sites 'b' and 'b2' both run on client '{PLUGIN}' but "
                                              "give it different plugin_options")


def test_a_plugin_after_jax_started_is_refused_with_the_fix(tmp_path):
    late = _child("late", tmp_path)["late"]
    assert late.startswith(f"BackendError: site 'b' needs PJRT plugin '{PLUGIN}' (")
    assert ("but JAX has already initialised its backends without it, so this process cannot reach that client; "
            "call hxtrain.register_plugins(topology) before the first JAX array") in late
    assert f"or set PJRT_NAMES_AND_LIBRARY_PATHS={PLUGIN}:" in late


def _hxtrain(*args, **env):
    return subprocess.run([sys.executable, "-m", "hxtrain", *args], capture_output=True, text=True, timeout=300,
                          env=_env(**env), cwd=ROOT)


def test_jax_platforms_that_leave_the_plugin_out_are_an_error_not_a_fallback():
    got = _hxtrain("info", "--mesh", "local-2client", JAX_PLATFORMS="cpu")
    assert got.returncode == 2 and got.stdout == ""
    assert got.stderr.strip().splitlines()[-1] == (
        f"hxtrain info: error: site 'b' runs on client '{PLUGIN}', but JAX_PLATFORMS='cpu' leaves it out; set "
        f"JAX_PLATFORMS=cpu,{PLUGIN} (or unset it) before JAX starts")


def test_info_lists_each_client_apart():
    got = _hxtrain("info", "--mesh", "local-2client")
    assert got.returncode == 0, got.stderr
    table = got.stdout.split("clients (each its own PJRT client; no program or mesh spans two):\n")[1]
    rows = [line.split() for line in table.split("\n\n")[0].splitlines()[2:]]
    builtin = next(r for r in rows if r[0] == "cpu")
    plugin = next(r for r in rows if r[0] == PLUGIN)
    assert builtin[1] == "cpu" and builtin[-2:] == ["8", "-"]  # platform, ..., devices, library
    assert plugin[1] == "cpu" and plugin[-2] == "4" and plugin[-1].endswith("fastatomstruct_xla_cpu/libpjrt_cpu.so")
    assert "stage 1 -> site 'b' (cpu, client 'fastatomstruct_xla_cpu'" in got.stdout


def test_launch_runs_the_plugin_site_on_its_plugin(inprocess, tmp_path):
    run = _launch("local-2client", "--model", "tiny", "--steps", 3, "--microbatches", 2, "--batch-size", 8,
                  "--out", tmp_path / "out", timeout=60)
    assert run.finish(400) == 0, run.text()
    text = run.text()
    # the plugin site's process logs its own client (its version string is "PJRT C API" on jax 0.10, "cpu" on 0.12)
    assert f"[b] site 'b': client '{PLUGIN}' (library: " in text and ": platform cpu, version " in text
    assert "[a] site 'a': client 'cpu' (builtin: jaxlib): platform cpu" in text
    _check_rows(tmp_path / "out", inprocess["site_reference"])  # losses and grad norms of the in-process run
