"""A trained model back from disk, for sampling: a run folder (`hxtrain train --out`) or an export folder.

    model, tokenizer, info = load_model("runs/a")        # the run's newest sealed, intact checkpoint
    model, tokenizer, info = load_model("exported/a")    # model.json + params/ (`hxtrain export`)

The model is rebuilt from what the checkpoint recorded (`run_meta`'s class name and config) by
`core.model_registry.from_config`, its parameters read whole onto one device: a run's through
`checkpoints.export.read_run` (what `hxtrain export` reads), an export's with orbax onto the model's own state. The
tokenizer is the one the folder keeps (`data.tokenizer.for_run`; bytes when it keeps none).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from hxtrain.generation.sampling import GenerationError

_HINT = "give a run folder (hxtrain train --out) or an export folder (hxtrain export --out)"


def _kind(path: Path) -> str:
    """"export", "run" (a run folder or its checkpoints/ folder), or GenerationError naming what is wrong."""
    if not path.exists():
        raise GenerationError(f"--from: {str(path)!r} does not exist; {_HINT}")
    if not path.is_dir():
        raise GenerationError(f"--from: {str(path)!r} is a file; {_HINT}")
    if not os.access(path, os.R_OK | os.X_OK):
        raise GenerationError(f"--from: cannot read folder {str(path)!r} (permission denied); {_HINT}")
    if (path / "model.json").is_file() and (path / "params").is_dir():
        return "export"
    if (path / "checkpoints").is_dir() or any(p.is_dir() and p.name.isdigit() for p in path.iterdir()):
        return "run"
    raise GenerationError(f"--from: {str(path)!r} is neither a run folder (no checkpoints/ in it) nor an export "
                          f"folder (no model.json + params/); {_HINT}")


def _read_export(path: Path) -> dict:
    try:
        info = json.loads((path / "model.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GenerationError(f"--from: cannot read {str(path / 'model.json')!r} ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); export the run again") from None
    missing = [k for k in ("model", "config") if not info.get(k)]
    if missing:
        raise GenerationError(f"--from: {str(path / 'model.json')!r} lacks {missing}; it does not say which model "
                              "to rebuild (export the run again with this hxtrain)")
    return info


def _model(info: dict, where: str, seed: int):
    from hxtrain.core.model_registry import from_config

    if not isinstance(info.get("config"), dict):
        raise GenerationError(f"--from: {where} records model {info.get('model')!r} without its config; "
                              "it cannot be rebuilt for sampling")
    return from_config(info["model"], info["config"], seed=seed)


def load_model(path: str | os.PathLike, *, step: int | None = None, seed: int = 0):
    """(model, tokenizer, info) from a run folder or an export folder. `step`: a run's checkpoint (default the
    newest sealed and intact one). info: {"kind": "run" | "export", "model", "config", "step", "source"}.
    GenerationError (one line) for a missing, unreadable or unrecognised folder; CheckpointError for a run without
    a sealed checkpoint; CheckpointMismatch when the parameters do not fit the model they name."""
    from flax import nnx

    from hxtrain.checkpoints.checkpoint import check_shapes
    from hxtrain.data.tokenizer import check_vocab, for_run

    path = Path(path)
    kind = _kind(path)
    if kind == "export":
        import orbax.checkpoint as ocp

        info = _read_export(path)
        model = _model(info, str(path / "model.json"), seed)
        state = nnx.state(model, nnx.Param)
        expected = {"/".join(map(str, k)): (tuple(v.shape), str(v.dtype)) for k, v in nnx.to_flat_state(state)}
        saved = {k: (tuple(s), d) for k, (s, d) in info.get("shapes", {}).items()}
        check_shapes(saved, expected, f"export {path}")
        # Onto the model's own fp32 state, as the export's docstring loads it (a bf16 export is widened).
        params = ocp.StandardCheckpointer().restore((path / "params").absolute(), nnx.to_pure_dict(state))
        folder = path
    else:
        from hxtrain.checkpoints.export import read_run, run_folder

        params, info = read_run(path, step=step)
        model = _model(info, f"checkpoint step {info['step']} in {info['source']}", seed)
        folder = run_folder(path)
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    tokenizer = for_run(folder)
    check_vocab(tokenizer, model.cfg.vocab_size, where=f"--from {folder}")
    return model, tokenizer, {"kind": kind, "model": info["model"], "config": info["config"],
                              "step": info.get("step"), "source": str(path)}
