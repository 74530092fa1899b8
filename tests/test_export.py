"""Export to a plain orbax checkpoint that loads with Flax + orbax alone; --init-from; resume from the CLI."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

import hxtrain
from hxtrain import cli
from hxtrain.checkpoints import logical
from hxtrain.training import metrics
from hxtrain.checkpoints.checkpoint import CheckpointMismatch
from hxtrain.checkpoints.export import export
from models import gpt
from tests.helpers import assert_trees_close, rel_err

# One worker runs this module, so its costly shared run (the session fixture below) is computed once.
pytestmark = pytest.mark.xdist_group("export")

ROOT = Path(__file__).resolve().parents[1]
KW = dict(microbatches=2, batch_size=8, max_corpus_bytes=200_000)
FIXED = np.random.default_rng(3).integers(0, 256, (8, gpt.TINY.seq_len + 1)).astype(np.int32)

# Runs in a fresh interpreter: flax, orbax, numpy and the model class only.
LOADER = textwrap.dedent("""
    import sys
    import numpy as np
    import orbax.checkpoint as ocp
    from flax import nnx
    from models import gpt

    model = gpt.GPT(gpt.TINY, nnx.Rngs(123))
    state = nnx.state(model, nnx.Param)
    pure = ocp.StandardCheckpointer().restore(sys.argv[1] + "/params", nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
    print("loss", repr(float(gpt.loss(model, np.load(sys.argv[2])))))
    print("hxtrain imported:", any(m.split(".")[0] == "hxtrain" for m in sys.modules))
""")


@pytest.fixture(scope="session")  # not torn down when xdist runs another module in between
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    trainer = hxtrain.Trainer(gpt.build(gpt.TINY, seed=0), hxtrain.uniform(1), out=root / "run", **KW)
    trainer.fit(2, progress=False)
    params = jax.tree.map(np.asarray, logical.to_logical(trainer.pipeline)["params"])
    return dict(root=root, dir=root / "run", params=params, loss=float(trainer.pipeline.grads(FIXED)[0]))


def test_export_loads_with_flax_and_orbax_alone(run, tmp_path):
    out = export(run["dir"], tmp_path / "exported")
    info = json.loads((out / "model.json").read_text())
    assert info["step"] == 2 and info["model"] == "GPT" and info["config"]["d_ff"] == gpt.TINY.d_ff
    np.save(tmp_path / "batch.npy", FIXED)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", LOADER, str(out), str(tmp_path / "batch.npy")], capture_output=True,
                       text=True, timeout=300, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in r.stdout.splitlines() if " " in line)
    assert lines["hxtrain"] == "imported: False"
    assert rel_err(float(lines["loss"]), run["loss"]) <= 1e-6


def test_export_in_bf16(run, tmp_path):
    out = export(run["dir"], tmp_path / "bf16", dtype="bfloat16")
    info = json.loads((out / "model.json").read_text())
    assert info["shapes"]["head/w_out"] == [[32, 256], "bfloat16"]


def test_init_from_export_starts_a_fresh_run(run, tmp_path):
    out = export(run["dir"], tmp_path / "exported")
    trainer = hxtrain.Trainer(gpt.build(gpt.TINY, seed=7), hxtrain.uniform(1), init_from=out, **KW)
    assert trainer.step == 0
    assert_trees_close(jax.tree.map(np.asarray, logical.to_logical(trainer.pipeline)["params"]), run["params"],
                       rtol=0, what="init_from")
    assert float(trainer.pipeline.grads(FIXED)[0]) == run["loss"]
    other = gpt.GPTConfig(seq_len=16, d_model=32, n_heads=4, n_layers=8, d_ff=128)
    with pytest.raises(CheckpointMismatch, match=r"export .*: parameter blocks/0/b1 has shape \(64,\) in the "
                                                 r"checkpoint but \(128,\) in the model"):
        hxtrain.Trainer(gpt.build(other), hxtrain.uniform(1), init_from=out, **KW)


def test_export_cli(run, tmp_path, capsys):
    assert cli.main(["export", "--checkpoint", str(run["dir"]), "--out", str(tmp_path / "e")]) == 0
    assert "exported step 2 of" in capsys.readouterr().out
    assert cli.main(["export", "--checkpoint", str(run["dir"]), "--out", str(tmp_path / "e")]) == 2
    assert "already exists; export into a new folder" in capsys.readouterr().err
    assert cli.main(["export", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "f")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_train_cli_resumes_and_writes_metrics(tmp_path, capsys):
    # One site of one device and a small text file: the programs the fixture run already compiled.
    (tmp_path / "one.toml").write_text('name = "one"\n[[sites]]\nname = "a"\nbackend = "cpu"\n'
                                       'devices = 1\ndata = 1\ntensor = 1\n')
    (tmp_path / "text.txt").write_bytes(bytes(range(32, 127)) * 300)
    base = ["train", "--mesh", str(tmp_path / "one.toml"), "--model", "tiny", "--microbatches", "2",
            "--batch-size", "8", "--data", str(tmp_path / "text.txt"), "--no-progress", "--out", str(tmp_path / "r"),
            "--sample-tokens", "0"]
    assert cli.main(base + ["--resume", "must", "--steps", "2"]) == 2
    assert "resume=must but there is no checkpoint" in capsys.readouterr().err
    assert cli.main(base + ["--steps", "2", "--save-every", "1", "--keep", "1"]) == 0
    assert "resuming" not in capsys.readouterr().out
    assert [p.name for p in (tmp_path / "r" / "checkpoints").iterdir()] == ["2"]
    assert cli.main(base + ["--steps", "3"]) == 0
    assert "at step 2 (1 of 3 steps left)" in capsys.readouterr().out
    assert cli.main(base + ["--steps", "3", "--resume", "never"]) == 2
    assert "resume=never but" in capsys.readouterr().err
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    scalars = [e for f in sorted((tmp_path / "r" / "tb").iterdir()) for e in metrics.read_events(f)]
    assert [s for s, tag, _ in scalars if tag == "loss"] == [1, 2, 3]
    assert {tag for _, tag, _ in scalars} >= {"loss", "lr", "grad_norm", "tokens_per_s"}
    assert [v for s, tag, v in scalars if tag == "loss"] == pytest.approx([r["loss"] for r in rows], rel=1e-6)


def test_export_carries_the_runs_tokenizer(run, tmp_path):
    import shutil

    from hxtrain.data import tokenizer

    (tmp_path / "text.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 50)
    bpe = tokenizer.load(tokenizer.train_bpe([tmp_path / "text.txt"], 300, tmp_path / "tok"))
    copy = shutil.copytree(run["dir"], tmp_path / "run")
    bpe.save(copy)  # what Trainer(out=...) does with a prepared corpus's tokenizer
    out = export(copy, tmp_path / "exported")
    again = tokenizer.for_run(out)
    assert again.vocab_size == bpe.vocab_size and again.encode("lazy fox") == bpe.encode("lazy fox")
    assert tokenizer.for_run(export(run["dir"], tmp_path / "bytes")).name == "byte"  # a byte-level run: no file
