"""The command line (smoke and a run whose loss falls), and the import layering of the code base."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import hxtrain
from hxtrain import cli
from models import gpt

ROOT = Path(__file__).resolve().parents[1]


def _run_cli(*args, timeout=600):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "hxtrain", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def test_cli_train_smoke_on_tiny(tmp_path):
    out = tmp_path / "run"
    r = _run_cli("train", "--model", "tiny", "--steps", "2", "--microbatches", "4", "--batch-size", "8",
                 "--out", str(out), "--no-progress", "--eval-every", "2", "--eval-batches", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "stage 1 -> site 'b'" in r.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]
    assert all(row["bytes_per_link"] for row in rows)
    assert "eval_loss" not in rows[0] and f"held-out loss {rows[1]['eval_loss']:.4f}" in r.stdout
    # The run ends with text from the trained model: prompt + generated = the context's 16 byte tokens, decoded
    # (an undecodable byte becomes U+FFFD, 3 bytes in UTF-8), then print's newline.
    sample = r.stdout.split("sample (temperature 0.8, top-k 40):\n", 1)[1][:-1]
    assert 16 <= len(sample.encode("utf-8")) <= 3 * 16


def test_training_loss_falls(tmp_path):
    """In-process, on TINY: the loss of the last steps is clearly below the first step's."""
    trainer = hxtrain.Trainer(gpt.build(gpt.TINY), "local", schedule="1f1b", microbatches=4, batch_size=16,
                              optimizer=hxtrain.OptimizerConfig(learning_rate=1e-2, warmup_steps=3, total_steps=30))
    history = trainer.fit(30, progress=False)
    first, last = history[0]["loss"], sum(h["loss"] for h in history[-5:]) / 5
    assert last < first - 1.0, (first, last)


def test_cli_reports_bad_input_without_traceback():
    r = _run_cli("train", "--model", "nope", "--steps", "1", "--no-progress")
    assert r.returncode == 2
    assert "unknown model 'nope'" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("flag", ["--steps", "--microbatches", "--batch-size"])
def test_cli_refuses_an_explicit_zero_instead_of_using_the_default(capsys, flag):
    assert cli.main(["train", "--model", "tiny", flag, "0", "--no-progress"]) == 2
    assert capsys.readouterr().err.strip() == f"hxtrain train: error: {flag}: expected a whole number >= 1, got 0"


def test_cli_refuses_batch_that_does_not_split(capsys):
    code = cli.main(["train", "--model", "tiny", "--steps", "1", "--microbatches", "3", "--batch-size", "8",
                     "--no-progress"])
    assert code == 2
    assert "batch 8 is not divisible by microbatches=3" in capsys.readouterr().err


def test_info_prints_devices_backends_and_placement(capsys):
    assert cli.main(["info", "--model", "tiny"]) == 0
    text = capsys.readouterr().out
    assert "8 devices" in text and "cpu" in text
    assert "stage 0 -> site 'a'" in text and "embed + blocks[0:4]" in text


def test_python_dash_m_help():
    r = _run_cli("--help", timeout=60)
    assert r.returncode == 0 and "train" in r.stdout and "info" in r.stdout


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package,forbidden", [("models", {"hxtrain", "meshes"}), ("meshes", {"hxtrain", "models"})])
def test_lower_layers_never_import_upper_ones(package, forbidden):
    for path in (ROOT / package).rglob("*.py"):
        assert not (_imports(path) & forbidden), f"{path.relative_to(ROOT)} imports {_imports(path) & forbidden}"


# hxtrain's subpackages, lowest first: a module imports only from its own package or from packages before it (at
# any depth, inside functions too), so the packages form no cycle. The top-level modules (the public API in
# __init__, the command line) sit above all of them.
LAYERS = ("links", "config", "data", "backends", "core", "schedules", "engine", "network", "checkpoints",
          "generation", "planning", "training", "sites")


def _hxtrain_imports(path: Path) -> set[str]:
    """The hxtrain subpackages `path` imports from (`from hxtrain import x` counts as package x, or as the top)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        mods = []
        if isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            mods = [node.module] if node.module != "hxtrain" else [f"hxtrain.{a.name}" for a in node.names]
        out |= {m.split(".")[1] for m in mods if m.startswith("hxtrain.")}
    return out


def test_subpackages_import_only_downward():
    packages = {p.name for p in (ROOT / "hxtrain").iterdir() if (p / "__init__.py").exists()}
    assert packages == set(LAYERS), f"hxtrain's subpackages {sorted(packages)} differ from LAYERS"
    for i, package in enumerate(LAYERS):
        allowed = set(LAYERS[: i + 1])
        for path in (ROOT / "hxtrain" / package).rglob("*.py"):
            upward = _hxtrain_imports(path) - allowed
            assert not upward, f"{path.relative_to(ROOT)} imports hxtrain.{sorted(upward)}, a layer above {package}"


def test_the_top_of_hxtrain_is_only_the_public_api_and_the_command_line():
    assert sorted(p.name for p in (ROOT / "hxtrain").glob("*.py")) == ["__init__.py", "__main__.py", "cli.py"]


def test_hxtrain_names_no_concrete_model_at_import_time():
    """hxtrain reaches concrete models only inside functions (the model registry), never at module level."""
    for path in (ROOT / "hxtrain").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mod = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                assert not (mod or "").startswith("models"), f"{path.relative_to(ROOT)} imports {mod} at top level"


def test_only_the_model_registry_imports_models():
    """hxtrain/core/model_registry.py is the one hxtrain module that imports `models`, at any depth (inside functions too)."""
    registry = ROOT / "hxtrain" / "core" / "model_registry.py"
    assert "models" in _imports(registry)
    for path in (ROOT / "hxtrain").rglob("*.py"):
        if path != registry:
            assert "models" not in _imports(path), f"{path.relative_to(ROOT)} imports models; ask hxtrain.core.model_registry"


def test_mesh_axis_names_stay_out_of_models():
    for path in (ROOT / "models").rglob("*.py"):
        text = path.read_text()
        for axis in ("'data'", '"data"', "'tensor'", '"tensor"', "'site'", '"site"'):
            assert axis not in text, f"{path.relative_to(ROOT)} names mesh axis {axis}"


def test_mesh_axis_names_are_spelled_only_in_placement():
    """Outside hxtrain/core/placement.py, a PartitionSpec or Mesh names its axes with placement.DATA/TENSOR/SITE."""
    for path in (ROOT / "hxtrain").rglob("*.py"):
        if path.name == "placement.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("P", "PartitionSpec", "Mesh"):
                spelled = [c.value for c in ast.walk(node) if isinstance(c, ast.Constant) and isinstance(c.value, str)]
                assert not spelled, f"{path.relative_to(ROOT)}:{node.lineno} spells mesh axes {spelled}"


def test_train_and_site_derive_one_optimizer_from_the_step_count():
    # warmup: a tenth of the steps, at least 1, at most 20 (hxtrain train and hxtrain site both call for_steps)
    got = {n: hxtrain.OptimizerConfig.for_steps(n).warmup_steps for n in (3, 50, 200, 10_000)}
    assert got == {3: 1, 50: 5, 200: 20, 10_000: 20}
    opt = hxtrain.OptimizerConfig.for_steps(30, 1e-2)
    assert (opt.learning_rate, opt.total_steps) == (1e-2, 30)


def test_cli_names_the_field_of_a_bad_seed_lr_or_mesh(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:  # argparse: usage, then one error line, exit 2
        cli.main(["train", "--seed", "-1"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "hxtrain train: error: argument --seed: expected a whole number >= 0, got '-1'")
    assert cli.main(["train", "--model", "tiny", "--steps", "1", "--lr", "nan", "--no-progress"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "hxtrain train: error: OptimizerConfig.learning_rate: expected a finite number > 0, got nan")
    assert cli.main(["train", "--mesh", str(tmp_path), "--steps", "1", "--no-progress"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"hxtrain train: error: {tmp_path}: is a folder; expected a topology .toml file or a shipped name such as "
        "'local'")


def test_cli_names_the_field_of_a_bad_schedule_backend_or_out(capsys, tmp_path):
    def last_error(argv):
        assert cli.main(["train", "--steps", "1", "--no-progress", *argv]) == 2
        return capsys.readouterr().err.strip().splitlines()[-1]

    assert last_error(["--schedule", "nope"]) == (
        "hxtrain train: error: --schedule: unknown schedule 'nope'; choices: gpipe, 1f1b, 1f1b:<k>, interleaved, "
        "interleaved:<v>, interleaved:<v>:<k>, zb-h1, zb-h1:<k>, zbh1, <path>.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text('[[sites]]\nname = "a"\nbackend = "cudaa"\ndata = 1\ntensor = 1\ndevices = 1\n')
    assert last_error(["--mesh", str(bad)]) == (
        f"hxtrain train: error: {bad}: sites[0].backend (site 'a'): unknown backend 'cudaa': known backends are "
        "amd, ascend, cpu, cuda, gpu, npu, nvidia, rocm, tpu, or 'plugin:/path/to/libpjrt_x.so'; did you mean "
        "'cuda'?")
    in_run = tmp_path / "run.toml"
    in_run.write_text('[[sites]]\nname = "a"\nbackend = "cpu"\ndata = 1\ntensor = 1\ndevices = 1\n'
                      '[run]\nschedule = "nope"\n')
    assert last_error(["--mesh", str(in_run)]).startswith(
        f"hxtrain train: error: {in_run}: run.schedule: unknown schedule 'nope'; choices: gpipe,")
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    assert last_error(["--out", str(afile), "--model", "tiny"]) == (
        f"hxtrain train: error: --out: expected a run folder (created if missing), got '{afile}', which is a file")
    assert afile.read_text() == "keep me"  # nothing lost
