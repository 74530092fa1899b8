"""A site spanning two OS processes (jax.distributed inside the site, gloo on CPU) next to a one-process site:
the same losses as in one process, a lost process stops the whole run within a bound, and the command line says
which flag is missing. Starts real `python -m hxtrain launch` runs on loopback."""

import os
import re
import signal
import time

import pytest

import hxtrain
from hxtrain.sites import process as site_runner
from hxtrain.links import wire
from hxtrain.sites.launch import SiteExit
from tests.test_multiprocess import _check_rows, _launch, _reference

_SITE = """
[[sites]]
name = "{name}"
backend = "cpu"
devices = {n}
data = {n}
tensor = 1
processes = {n}
"""


def _topology(tmp_path, steps=3, a_dtype=None):
    """Site a: data 2 over 2 processes (1 CPU device each); site b: one process, one device."""
    text = _SITE.format(name="a", n=2) + (f'compute_dtype = "{a_dtype}"\n' if a_dtype else "")
    text += _SITE.format(name="b", n=1)
    text += '[[links]]\nbetween = ["a", "b"]\nbandwidth_gbps = 100\nlatency_ms = 1.0\n'
    text += f'[run]\nmodel = "tiny"\nschedule = "1f1b"\nmicrobatches = 2\nbatch_size = 4\nsteps = {steps}\n'
    path = tmp_path / "multihost.toml"
    path.write_text(text)
    return path


def test_a_site_over_two_processes_matches_the_in_process_trainer(tmp_path):
    # Site a computes in bf16 (its policy, fp32 master weights), so bf16 activations cross the link and bf16
    # cotangents come back to a site of two processes; the in-process Trainer runs the same programs.
    # Each process of site a reads only its own rows of each batch; the held-out loss is taken at the end.
    mesh = _topology(tmp_path, a_dtype="bfloat16")
    run = _launch(mesh, "--out", tmp_path / "out", "--eval-every", 3, "--eval-batches", 1)
    ref = _reference(mesh, eval_every=3, eval_batches=1)  # meanwhile, the same run in this process
    assert run.finish(240) == 0, run.text()
    # one metrics file per site, written by its leader
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["metrics-a.jsonl", "metrics-b.jsonl", "tb"]
    assert sorted(p.name for p in (tmp_path / "out" / "tb").iterdir()) == ["a", "b"]  # one writer per site
    rows = _check_rows(tmp_path / "out", ref)
    assert [r["step"] for r in rows["b"]] == [1, 2, 3]
    act = 2 * (wire.HEADER_SIZE + 2 * 16 * 32 * 2)  # 2 microbatches of [mb 2, T 16, D 32] bf16 frames, as 1 process
    assert rows["a"][-1]["bytes_per_link"] == {"a->b": act}
    out = run.text()
    for k in (0, 1):  # every process of the site logs its steps, with the global norm
        assert re.search(rf"\[a/{k}\] site 'a': cpu cpu x 2 \(data 2 x tensor 1, process {k} of 2\).*compute "
                         r"bfloat16.*; reads 2 of 4 rows per step$", out, re.M)
        for want in ref:
            assert re.search(rf"\[a/{k}\] step {want['step']} grad_norm {want['grad_norm']:.4f}", out), out
    assert re.search(r"\[a/1\] step 3 grad_norm \S+ step_s \S+ sent - control 0 B", out)  # no TCP: the leader's
    assert "[launch] site 'a' process 1 of 2: pid" in out
    assert re.search(r"\[b\] site 'b': .*; reads 4 of 4 rows per step$", out, re.M)
    assert "eval_loss" in rows["b"][-1]  # compared with the reference by _check_rows
    assert "[launch] all 2 sites finished (3 processes)" in out


def test_killing_a_follower_stops_every_process(tmp_path):
    timeout = 5
    run = _launch(_topology(tmp_path, steps=100000), "--grace", 3, timeout=timeout)
    line = run.wait_for(r"\[launch\] site 'a' process 1 of 2: pid (\d+)", 30)
    pid = int(line.split("pid ")[1].split(",")[0])
    run.wait_for(r"\[b\] step 2 loss", 240)
    t0 = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    assert run.finish(timeout + 15) == 1  # measured: 3.5 s from the kill to the launcher's exit (2 cores, load 12)
    waited = time.monotonic() - t0
    assert waited <= timeout + 10, f"the run took {waited:.1f} s to stop after the follower died"
    out = run.text()
    assert re.search(r"\[a/0\] hxtrain site 'a' process 0: error: lost a process of the site", out), out
    assert "hxtrain launch: error: site 'a' process 1 was killed by SIGKILL (from outside)" in out
    assert "site 'a' process 0 exited with code 3" in out
    assert re.search(r"site 'b' exited with code 3|site 'b' was killed by SIGKILL \(by the launcher\)", out)


def test_process_flags_are_checked_against_the_site(tmp_path):
    topo = hxtrain.load_topology(_topology(tmp_path))
    a, b = topo.site("a"), topo.site("b")
    assert site_runner.check_processes(a, 1, "127.0.0.1:5000") == 1
    assert site_runner.check_processes(b, None, None) == 0
    assert site_runner.check_processes(b, 0, None) == 0
    with pytest.raises(site_runner.SiteError, match=r"--process-id is missing: site 'a' spans 2 processes; start "
                                                     r"one `hxtrain site` per process with --process-id 0 \.\. 1"):
        site_runner.check_processes(a, None, "127.0.0.1:5000")
    with pytest.raises(site_runner.SiteError, match=r"--process-id is 2: site 'a' spans 2 processes"):
        site_runner.check_processes(a, 2, "127.0.0.1:5000")
    with pytest.raises(site_runner.SiteError, match=r"--process-id is -1: site 'a'"):
        site_runner.check_processes(a, -1, "127.0.0.1:5000")
    with pytest.raises(site_runner.SiteError, match=r"--coordinator is missing: site 'a' spans 2 processes, which "
                                                     r"meet at a jax.distributed coordinator"):
        site_runner.check_processes(a, 0, None)
    with pytest.raises(site_runner.SiteError, match=r"--coordinator 'here' is not host:port: site 'a'"):
        site_runner.check_processes(a, 0, "here")
    with pytest.raises(site_runner.SiteError, match=r"--process-id 1: site 'b' runs in one process \(processes = "
                                                     r"1\); leave --process-id out"):
        site_runner.check_processes(b, 1, None)
    with pytest.raises(site_runner.SiteError, match=r"--coordinator 127.0.0.1:5000: site 'b' runs in one process"):
        site_runner.check_processes(b, 0, "127.0.0.1:5000")
    # a site of several processes is supported now
    assert site_runner.check_supported(topo, "a", hxtrain.get_schedule("1f1b")) == 0


def test_site_command_names_the_missing_flag(tmp_path, capsys, monkeypatch):
    """`hxtrain site` stops with code 2 and the flag's name before the cluster or the network is touched."""
    from hxtrain import cli

    mesh = str(_topology(tmp_path))
    monkeypatch.setenv("HXT_TEST_SECRET", "0123456789abcdef" * 2)
    common = ["--mesh", mesh, "--secret-env", "HXT_TEST_SECRET"]
    assert cli.main(["site", "--site", "a", *common]) == 2
    assert "hxtrain site 'a': error: --process-id is missing: site 'a' spans 2 processes" in capsys.readouterr().err
    assert cli.main(["site", "--site", "a", "--process-id", "0", *common]) == 2
    assert "error: --coordinator is missing: site 'a' spans 2 processes" in capsys.readouterr().err
    assert cli.main(["site", "--site", "b", "--process-id", "1", *common]) == 2
    assert "error: --process-id 1: site 'b' runs in one process" in capsys.readouterr().err


def test_launch_names_the_process_that_failed():
    assert SiteExit("a", -9, process=1).describe() == "site 'a' process 1 was killed by SIGKILL (from outside)"
    assert SiteExit("a", 3, process=0).describe() == "site 'a' process 0 exited with code 3"
    assert SiteExit("b", 3).describe() == "site 'b' exited with code 3"


def test_group_checks_name_the_site(tmp_path):
    """In this single process every device belongs to process 0: a 2-process site's mesh is refused, and the
    transport wants the leader's NetTransport on process 0."""
    import jax
    import numpy as np
    from jax.sharding import Mesh

    from hxtrain.network import group as site_group

    site = hxtrain.load_topology(_topology(tmp_path)).site("a")
    mesh = Mesh(np.array(jax.devices()[:2]).reshape(2, 1), ("data", "tensor"))
    with pytest.raises(ValueError, match=r"site 'a': expected the mesh's devices to belong to processes \[0, 1\] "
                                         r"\(in order, 1 per process\), got processes \[0, 0\]"):
        site_group.check_mesh(mesh, site)
    with pytest.raises(ValueError, match=r"site 'a' process 0: the leader \(process 0\) needs the TCP transport"):
        site_group.GroupTransport(None, 0, "a", mesh, lambda key: ((2, 16, 32), np.float32))
    assert site_group.leader_mesh(mesh).devices.shape == (1, 1)
