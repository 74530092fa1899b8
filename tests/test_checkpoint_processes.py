"""A checkpoint folder shared by the processes of one site (a `jax.distributed` cluster): every process takes
part in setting steps aside with the same list, however late it lists the folder. Before, a process that listed
the folder after process 0 had moved the steps found none, skipped the barrier, and left process 0 waiting in it
for ever: the hang of a multi-process site's elastic restore."""

import os
import subprocess
import sys
from pathlib import Path

from hxtrain.sites.launch import free_port

ROOT = Path(__file__).resolve().parents[1]


def test_every_process_sets_aside_the_same_steps_however_late_it_lists(tmp_path):
    port, folder = free_port(), tmp_path / "ckpt"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "_set_aside_child.py"), str(pid), str(port),
                               str(folder)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                              cwd=ROOT) for pid in (0, 1)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=120)[0])
    finally:
        for p in procs:
            p.kill()
    for pid, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {pid} exited {p.returncode}:\n{out[-3000:]}"
        assert f"process {pid}: steps [1]" in out, out[-3000:]
    assert sorted(d.name.split("-")[0] for d in (folder / "rejected").iterdir()) == ["2", "3"]
