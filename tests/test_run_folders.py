"""A run folder that cannot be written is refused before training, naming its flag; a checkpoint folder that
becomes read-only mid-run ends the run at once with one error line (it used to hang for 5 minutes in orbax's save
threads). A path under a regular file is unwritable for root too; the mid-run case needs a real read-only folder,
so its child process runs without root's permission overrides."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hxtrain import cli
from hxtrain.checkpoints.checkpoint import CheckpointError, Checkpoints
from hxtrain.checkpoints.manifest import unwritable
from hxtrain.config.topology import load_topology
from hxtrain.sites.process import SiteConfig
from hxtrain.training.trainer import RunConfig, resolve_run

ROOT = Path(__file__).resolve().parents[1]
ONE_SITE = '[[sites]]\nname = "a"\nbackend = "cpu"\ndevices = 1\ndata = 1\ntensor = 1\n'


def _blocked(tmp_path) -> Path:
    """A regular file: nothing can be created under it, whoever runs."""
    f = tmp_path / "afile"
    f.write_text("keep me")
    return f


def test_unwritable_creates_the_folder_and_leaves_no_probe(tmp_path):
    folder = tmp_path / "new" / "run"
    assert unwritable(folder) is None
    assert folder.is_dir() and list(folder.iterdir()) == []
    assert unwritable(_blocked(tmp_path) / "run") == "Not a directory"
    assert unwritable(_blocked(tmp_path)) == "it is a file"


def test_resolve_run_refuses_each_folder_a_run_writes_naming_its_flag(tmp_path):
    topo = load_topology("local")
    blocked = _blocked(tmp_path)
    with pytest.raises(ValueError) as e:
        resolve_run(topo, RunConfig(out=str(blocked / "run")))
    assert str(e.value) == f"--out: cannot write to run folder '{blocked / 'run'}' (Not a directory)"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("")  # hxtrain train keeps its checkpoints there
    with pytest.raises(ValueError) as e:
        resolve_run(topo, RunConfig(out=str(tmp_path / "run")))
    assert str(e.value) == (f"--out: cannot write to checkpoint folder '{tmp_path / 'run' / 'checkpoints'}' "
                            "(it is a file)")
    site = SiteConfig(mesh="local", site="b", out=str(tmp_path / "site-out"), checkpoint_dir=str(blocked))
    with pytest.raises(ValueError) as e:  # hxtrain site: its checkpoints are under --checkpoint-dir/<site>
        resolve_run(topo, site)
    assert str(e.value) == f"--checkpoint-dir: cannot write to checkpoint folder '{blocked / 'b'}' (Not a directory)"
    ok = resolve_run(topo, SiteConfig(mesh="local", site="b", out=str(tmp_path / "o"),
                                      checkpoint_dir=str(tmp_path / "c")))
    assert ok.out == str(tmp_path / "o") and (tmp_path / "c" / "b").is_dir()
    # only a site's leader writes metrics into --out; another process of the site need not reach it
    assert resolve_run(topo, SiteConfig(mesh="local", site="b", out=str(blocked / "o"), process_id=1)).process_id == 1


def test_checkpoints_refuse_a_folder_they_cannot_write(tmp_path):
    with pytest.raises(CheckpointError) as e:
        Checkpoints(_blocked(tmp_path) / "checkpoints")
    assert str(e.value) == f"cannot write to checkpoint folder '{_blocked(tmp_path) / 'checkpoints'}' (Not a directory)"


def test_cli_names_an_unwritable_out_in_one_line(capsys, tmp_path):
    blocked = _blocked(tmp_path)
    assert cli.main(["train", "--model", "tiny", "--steps", "1", "--no-progress", "--out", str(blocked / "r")]) == 2
    assert capsys.readouterr().err == (
        f"hxtrain train: error: --out: cannot write to run folder '{blocked / 'r'}' (Not a directory)\n")


# The child: `hxtrain train` into a read-only folder (refused before training), then a run whose checkpoint folder
# is made read-only once step 1 is sealed, so that saving step 2 fails. As root, it first gives up the capabilities
# that override file permissions (while it has one thread: later threads inherit that), so that a read-only folder
# refuses it as it refuses any user.
_CHILD = """
import ctypes, os, sys
from pathlib import Path

if os.geteuid() == 0:
    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Sets(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    libc, head, sets = ctypes.CDLL(None, use_errno=True), Header(0x20080522, 0), (Sets * 2)()  # capability v3
    assert libc.capget(ctypes.byref(head), sets) == 0, os.strerror(ctypes.get_errno())
    keep = ~(1 << 1 | 1 << 2) & 0xFFFFFFFF  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
    sets[0].effective &= keep
    sets[0].permitted &= keep
    assert libc.capset(ctypes.byref(head), sets) == 0, os.strerror(ctypes.get_errno())

from hxtrain import cli
from hxtrain.training import trainer

ro_out, out, mesh, data = sys.argv[1:]
save = trainer._TrainerSaver.save

def save_then_lock(self, step, *, force=False):
    started = save(self, step, force=force)
    if step == 1:
        self.trainer.checkpoints.wait()  # step 1 sealed; from now on its folder is read-only
        os.chmod(Path(out) / "checkpoints", 0o555)
    return started

trainer._TrainerSaver.save = save_then_lock
run = ["train", "--mesh", mesh, "--model", "tiny", "--steps", "3", "--microbatches", "1", "--batch-size", "4",
       "--data", data, "--save-every", "1", "--no-progress", "--sample-tokens", "0"]
assert cli.main(run + ["--out", ro_out]) == 2
sys.exit(cli.main(run + ["--out", out]))
"""


def test_read_only_folders_fail_before_training_and_mid_run_without_hanging(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    out, mesh, data = tmp_path / "run", tmp_path / "one.toml", tmp_path / "corpus.txt"
    mesh.write_text(ONE_SITE)
    data.write_text("the quick brown fox jumps over the lazy dog\n" * 500)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", _CHILD, str(ro / "run"), str(out), str(mesh), str(data)],
                       capture_output=True, text=True, timeout=150, env=env, cwd=ROOT, check=False)  # a hang fails
    ckpts = out / "checkpoints"
    assert r.stderr.splitlines() == [  # one line each, no traceback, no orbax log
        f"hxtrain train: error: --out: cannot write to run folder '{ro / 'run'}' (Permission denied)",
        (f"hxtrain train: error: checkpoint step 2: cannot write to checkpoint folder '{ckpts}' (Permission denied: "
         f"'{ckpts / '2.orbax-checkpoint-tmp'}')")], r.stderr[-3000:]
    assert r.returncode == 2
    assert not (ro / "run").exists()
    assert sorted(p.name for p in ckpts.iterdir()) == ["1"]  # the step sealed before is intact
    assert (ckpts / "1" / "hxtrain_manifest.json").is_file()
