"""Sites as separate OS processes over loopback TCP: same losses as in one process, and failures that stop the
run naming the site (never a hang). Each test starts real `python -m hxtrain` processes."""

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

import hxtrain
from hxtrain.sites import process as site_runner
from hxtrain.links import wire
from hxtrain.core.optim import OptimizerConfig
from hxtrain.training.trainer import build_model
from tests.helpers import rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOISE = re.compile(r"^[WI]\d{4} |^\[Gloo\]")  # absl / gloo log lines


def _topology(tmp_path, data=1, name="two.toml", **run):
    text = "".join(f"""
[[sites]]
name = "{s}"
backend = "cpu"
devices = {data}
data = {data}
tensor = 1
""" for s in ("a", "b"))
    text += '[[links]]\nbetween = ["a", "b"]\nbandwidth_gbps = 100\nlatency_ms = 1.0\n'
    run = {"model": '"tiny"', "schedule": '"1f1b"', "microbatches": 2, "batch_size": 4, "steps": 3, **run}
    text += "[run]\n" + "".join(f"{k} = {v}\n" for k, v in run.items())
    path = tmp_path / name
    path.write_text(text)
    return path


class _Run:
    """A process whose merged output lines are collected by a thread, each with its arrival time."""

    def __init__(self, argv, env=None):
        env = {**os.environ, **(env or {})}
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                                     env=env)
        self.lines: list[tuple[float, str]] = []
        self._q: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            if not NOISE.match(line):
                item = (time.monotonic(), line.rstrip("\n"))
                self.lines.append(item)
                self._q.put(item)

    def wait_for(self, pattern, timeout):
        """The first output line matching `pattern` (new or already seen), waiting at most `timeout` s."""
        deadline = time.monotonic() + timeout
        for _, line in list(self.lines):
            if re.search(pattern, line):
                return line
        while True:
            try:
                _, line = self._q.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is not None and re.search(pattern, line):
                return line
            if time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"no line matching {pattern!r} within {timeout} s; output:\n{self.text()}")

    def finish(self, timeout):
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"process did not exit within {timeout} s; output:\n{self.text()}") from None
        time.sleep(0.2)  # let the reader drain
        return self.proc.returncode

    def text(self):
        return "\n".join(line for _, line in self.lines)


def _launch(mesh, *args, timeout=20):
    return _Run([sys.executable, "-m", "hxtrain", "launch", "--mesh", str(mesh), "--timeout", str(timeout),
                 *map(str, args)])


def _reference(mesh, schedule="1f1b", microbatches=2, batch_size=4, steps=3, eval_every=0, eval_batches=0):
    """The same run in this process: the Trainer's per-step rows, with the optimizer `hxtrain site` derives."""
    opt = OptimizerConfig.for_steps(steps)  # what `hxtrain site` derives
    trainer = hxtrain.Trainer(build_model("tiny"), hxtrain.load_topology(mesh), schedule=schedule,
                              microbatches=microbatches, batch_size=batch_size, optimizer=opt,
                              eval_batches=eval_batches)
    return trainer.fit(steps, progress=False, eval_every=eval_every)


def _check_rows(out, ref) -> dict:
    """The sites' metrics-<site>.jsonl in `out` vs the reference rows: the last site's losses and every site's
    global grad norm (the CONTROL exchange) within 1e-5. Returns {site: rows}."""
    rows = {s: [json.loads(x) for x in (out / f"metrics-{s}.jsonl").read_text().splitlines()] for s in ("a", "b")}
    assert [r["step"] for r in rows["b"]] == [r["step"] for r in ref]
    for got, want in zip(rows["b"], ref):
        assert rel_err(got["loss"], want["loss"]) <= 1e-5, (got["loss"], want["loss"])
        assert ("eval_loss" in got) == ("eval_loss" in want), (got, want)  # at the same steps
        if "eval_loss" in want:  # the held-out loss through the sites' forward-only table
            assert rel_err(got["eval_loss"], want["eval_loss"]) <= 1e-5, (got["eval_loss"], want["eval_loss"])
    for s in ("a", "b"):
        for got, want in zip(rows[s], ref):
            assert rel_err(got["grad_norm"], want["grad_norm"]) <= 1e-5, (s, got["grad_norm"], want["grad_norm"])
    return rows


def test_two_site_processes_match_the_in_process_trainer(tmp_path):
    # With the held-out loss every 2 steps and at the end (steps 2 and 3), as `hxtrain train --eval-every 2`
    mesh = _topology(tmp_path, data=2)
    run = _launch(mesh, "--out", tmp_path / "out", "--eval-every", 2, "--eval-batches", 2)
    ref = _reference(mesh, eval_every=2, eval_batches=2)  # meanwhile, the same run in this process
    assert run.finish(240) == 0, run.text()
    rows = _check_rows(tmp_path / "out", ref)
    assert [r["step"] for r in ref if "eval_loss" in r] == [2, 3]
    assert all(r["loss"] is None and "eval_loss" not in r for r in rows["a"])  # only the last site has the loss
    assert re.search(r"\[b\] step 2 loss \S+ eval_loss \S+ grad_norm", run.text())
    act = 2 * (wire.HEADER_SIZE + 2 * 16 * 32 * 4)  # 2 microbatches of [mb 2, T 16, D 32] fp32 frames
    assert rows["a"][-1]["bytes_per_link"] == {"a->b": act}
    assert rows["b"][-1]["bytes_per_link"] == {"b->a": act}
    assert rows["a"][-1]["control_bytes"] == wire.HEADER_SIZE + 2 * 4  # 2 stages' squared norms, one hop each way
    for s in ("a", "b"):  # the same training loop as the Trainer: TensorBoard events too, one folder per site
        assert len(list((tmp_path / "out" / "tb" / s).glob("events.out.tfevents.*"))) == 1
    out = run.text()
    for s in ("a", "b"):  # the site reports its dtype policy from the capability table (CPU: fp32)
        assert re.search(rf"\[{s}\] site '{s}': cpu cpu x 2 .*dtype policy: params float32, compute float32", out)
    # launch minted a certificate per site: the link is mutual TLS, and nothing warned about plaintext
    for s, peer in (("a", "b"), ("b", "a")):
        assert f"[{s}] site '{s}': linked to ['{peer}'] (mutual TLS 1.3)" in out
    assert "NOT encrypted" not in out
    assert "[launch] all 2 sites finished" in out


def _pid(run, site):
    return int(run.wait_for(rf"\[launch\] site '{site}': pid (\d+)", 30).split("pid ")[1].split(",")[0])


@pytest.mark.parametrize("how", ["kill", "stall"])
def test_a_lost_site_stops_its_peer_within_the_timeout_naming_it(tmp_path, how):
    timeout = 4
    run = _launch(_topology(tmp_path, steps=100000), "--grace", 2, timeout=timeout)
    pid_a = _pid(run, "a")
    run.wait_for(r"\[b\] step 2 loss", 240)
    t0 = time.monotonic()
    os.kill(pid_a, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
    line = run.wait_for(r"\[b\] hxtrain site 'b': error: lost a peer: .*site 'a'", timeout + 10)
    waited = time.monotonic() - t0
    assert waited <= timeout + 3, f"site b took {waited:.1f} s to stop (timeout {timeout} s)"
    if how == "kill":
        assert "closed the connection" in line or "failed" in line
    else:
        assert f"no frame from site 'a' within {timeout}" in line
    assert run.finish(30) == 1
    out = run.text()
    assert "hxtrain launch: error:" in out
    if how == "kill":
        assert "hxtrain launch: error: site 'a' was killed by SIGKILL (from outside)" in out
        assert "site 'b' exited with code 3" in out
    else:  # the stalled site, which the launcher kills after the grace period, is named first: its peer lost it
        assert ("hxtrain launch: error: site 'a' was killed by SIGKILL (by the launcher: it did not stop within the "
                "grace period); site 'b' exited with code 3") in out


def test_sites_with_different_secrets_refuse_each_other(tmp_path):
    """Plaintext on loopback (the opt-out, logged): a connects to b, b refuses a's proof, a stops naming b, and b
    drops the connection and keeps listening for its real peer (until killed here)."""
    mesh = _topology(tmp_path)
    addr = f"a=127.0.0.1:{_free_port()},b=127.0.0.1:{_free_port()}"
    a, b = [_Run([sys.executable, "-m", "hxtrain", "site", "--mesh", str(mesh), "--site", s, "--addresses", addr,
                  "--timeout", "10", "--insecure-plaintext"], env={"HXTRAIN_SECRET": secret})
            for s, secret in (("a", "secret-of-site-a-0123456789abcdefghij"), ("b", "secret-of-site-b-0123456789abcdefghij"))]
    try:
        assert a.finish(120) == 3, a.text()
        assert re.search(r"hxtrain site 'a': error: lost a peer: site 'b' refused the connection: site 'a' failed the "
                         r"challenge-response", a.text())
        b.wait_for(r"site 'b': dropped a connection from 127.0.0.1:\d+: site 'a' failed the challenge-response", 30)
        assert b.proc.poll() is None  # still listening
    finally:
        b.proc.kill()
        b.finish(30)
    text = a.text() + b.text()
    assert "WARNING: links to other sites are NOT encrypted (--insecure-plaintext)" in text
    assert "step 1" not in text


def _free_port():
    from hxtrain.sites.launch import free_port

    return free_port()


# ---- a site spanning two processes: jax.distributed on CPU ---------------------------------------------------

_CLUSTER = r"""
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
from hxtrain.network.group import init_site_cluster
init_site_cluster(sys.argv[1], 2, int(sys.argv[2]), timeout=60)
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "tensor"))
local = np.arange(2, dtype=np.float32).reshape(2, 1) + 2 * jax.process_index() + 1  # [1,2] and [3,4]
x = jax.make_array_from_process_local_data(NamedSharding(mesh, P(("data", "tensor"))), local.reshape(2))
total = jax.jit(jax.shard_map(lambda a: jax.lax.psum(a, ("data", "tensor")), mesh=mesh,
                              in_specs=P(("data", "tensor")), out_specs=P()))(x)
print("RESULT", len(jax.devices()), len(jax.local_devices()), float(np.asarray(total.addressable_data(0))[0]))
jax.distributed.shutdown()
"""


def test_one_site_over_two_processes_with_jax_distributed():
    addr = f"127.0.0.1:{_free_port()}"
    runs = [_Run([sys.executable, "-c", _CLUSTER, addr, str(i)], env={"XLA_FLAGS": ""}) for i in range(2)]
    for r in runs:
        assert r.finish(120) == 0, r.text()
        line = r.wait_for("RESULT", 1)
        assert line.split()[1:] == ["4", "2", "10.0"]  # 4 devices in all, 2 local, psum of 1+2+3+4


# ---- argument and start-up errors (no processes) ----------------------------------------------------------------


def test_site_argument_errors(tmp_path):
    with pytest.raises(ValueError, match=r"--addresses: expected site=host:port\[,site=host:port...\], got 'a=x'"):
        site_runner.parse_addresses("a=x")
    assert site_runner.parse_addresses("a=127.0.0.1:5,b=h:6") == (("a", "127.0.0.1:5"), ("b", "h:6"))
    assert site_runner.parse_addresses(None) == ()
    with pytest.raises(ValueError, match=r"^--connect: expected site=host:port\[,site=host:port\.\.\.\], got 'b'$"):
        site_runner.parse_addresses("b", "--connect")
    with pytest.raises(site_runner.SiteError, match="environment variable HXT_NONE is not set; every site needs"):
        site_runner.read_secret("HXT_NONE", env={})
    with pytest.raises(site_runner.SiteError, match="HXT_S has 5 bytes; every site needs the same random secret of "
                                                    ">= 32 bytes"):
        site_runner.read_secret("HXT_S", env={"HXT_S": "short"})
    with pytest.raises(site_runner.SiteError, match="HXT_S has only 2 distinct characters"):
        site_runner.read_secret("HXT_S", env={"HXT_S": "ab" * 32})
    assert site_runner.read_secret("HXT_S", env={"HXT_S": "0123456789abcdef" * 2}) == b"0123456789abcdef" * 2
    topo = hxtrain.load_topology(_topology(tmp_path))
    with pytest.raises(site_runner.SiteError, match=r"site 'b' has no address: set `address = \"host:port\"`"):
        site_runner.site_address(topo, "b", ())
    with pytest.raises(hxtrain.TopologyError, match="no site named 'zz'"):
        site_runner.check_supported(topo, "zz", hxtrain.get_schedule("1f1b"))
    three = hxtrain.uniform(3)
    with pytest.raises(site_runner.SiteError, match="sends from the last site back to the first.*3 sites"):
        site_runner.check_supported(three, "s0", hxtrain.get_schedule("interleaved"))
    env = {"XLA_FLAGS": "--xla_foo=1 --xla_force_host_platform_device_count=8"}
    site_runner.set_cpu_device_count(2, env)
    assert env["XLA_FLAGS"] == "--xla_foo=1 --xla_force_host_platform_device_count=2"


def test_a_cpu_site_process_restricts_jax_to_the_cpu_unless_the_user_chose():
    # On a GPU host a CPU site must not start a CUDA client (it would reserve the GPU site's memory).
    code = ("import os, dataclasses, jax, hxtrain; from hxtrain.sites import process as r; "
            "os.environ.pop('JAX_PLATFORMS', None); s = hxtrain.load_topology('local').sites[0]; "
            "gpu = dataclasses.replace(s, backend='cuda'); "
            "print(r.keep_to_site_client(gpu), r.keep_to_site_client(s), jax.config.jax_platforms, "
            "jax.default_backend(), r.keep_to_site_client(s, {'JAX_PLATFORMS': 'cuda,cpu'}))")
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert got.returncode == 0, got.stderr
    assert got.stdout.split() == ["None", "cpu", "cpu", "cpu", "None"]
