"""Child of tests/test_checkpoint_processes.py: process `pid` of a 2-process jax.distributed cluster (one site of
several processes) saves steps 1..3 into one checkpoint folder, then sets aside the steps after 1, as a restore
does. Process 1 lists the folder late, after process 0 would already have moved those steps.

    python tests/_set_aside_child.py PID PORT FOLDER
"""

import sys
import time

pid, port, folder = int(sys.argv[1]), sys.argv[2], sys.argv[3]

from hxtrain.network.group import init_site_cluster  # noqa: E402

init_site_cluster(f"127.0.0.1:{port}", 2, pid, timeout=60, shutdown_timeout=30)

import numpy as np  # noqa: E402

from hxtrain.checkpoints.checkpoint import Checkpoints  # noqa: E402

ck = Checkpoints(folder, keep=5, async_save=False)
for step in (1, 2, 3):
    ck.save_trees(step, {"w": np.full(4, step, np.float32)}, {"m": np.zeros(4, np.float32)}, {"next": step},
                  {"step": step})
ck.wait()
if pid == 1:
    time.sleep(2.0)  # lists the folder well after process 0 did
ck.set_aside([s for s in ck.all_steps() if s > 1])
print(f"process {pid}: steps {ck.all_steps()}", flush=True)
