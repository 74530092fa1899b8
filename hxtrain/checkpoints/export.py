"""The unsplit model as a plain orbax checkpoint, and starting a pipeline from one (`--init-from`).

    hxtrain export --checkpoint runs/a --out exported/a          # newest intact checkpoint of the run
    export("runs/a", "exported/a", dtype="bfloat16")             # the same from Python

An export folder holds
    params/      an orbax (StandardCheckpointer) checkpoint of a pure dict shaped like
                 `nnx.to_pure_dict(nnx.state(model, nnx.Param))` (block indices are string keys, as orbax stores them)
    model.json   model class, config, step and parameter shapes (informational; nothing needs it to load)

and loads with Flax and orbax alone, no hxtrain:

    import orbax.checkpoint as ocp
    from flax import nnx
    model = GPT(cfg, nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    pure = ocp.StandardCheckpointer().restore(path + "/params", nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import SingleDeviceSharding

from hxtrain.checkpoints import logical as _logical
from hxtrain.checkpoints.checkpoint import CheckpointError, Checkpoints, check_shapes

EXPORT_FORMAT = "hxtrain-export/1"


def _checkpoints(path: Path) -> Checkpoints:
    # A run's --out folder holds checkpoints/; accept either the run folder or the checkpoints folder itself.
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if not folder.is_dir():
        raise CheckpointError(f"--checkpoint: {str(path)!r} is not a folder; give a run's --out folder or its "
                              f"checkpoints/ folder")
    return Checkpoints(folder)


def _flat_shapes(shapes: dict) -> dict:
    return {k: (tuple(v[0]), v[1]) for k, v in shapes.items()}


def export(checkpoint: str | os.PathLike, out: str | os.PathLike, *, step: int | None = None,
           dtype: str | None = None) -> Path:
    """Write the newest intact checkpoint (or `step`) of a run as one unsplit plain orbax checkpoint in `out`
    (which must not exist yet). `dtype` (e.g. "bfloat16") casts floating-point parameters; default: as saved
    (fp32). The whole model is loaded on one device here: that is what an export is for. Returns `out`."""
    out = Path(out)
    if out.exists():
        raise ValueError(f"--out: {str(out)!r} already exists; export into a new folder")
    got, info = read_run(checkpoint, step=step, dtype=dtype)
    saver = ocp.StandardCheckpointer()
    saver.save((out / "params").absolute(), got)
    saver.wait_until_finished()
    shapes = {k: [list(np.shape(v)), str(v.dtype)] for k, v in _logical.flat(got)}
    info = {"format": EXPORT_FORMAT, **info, "shapes": shapes}
    (out / "model.json").write_text(json.dumps(info, indent=1))
    from hxtrain.data.tokenizer import for_run

    for_run(run_folder(checkpoint)).save(out)  # the run's tokenizer travels with its export (bytes: no file)
    return out


def run_folder(checkpoint: str | os.PathLike) -> Path:
    """The run folder of `checkpoint` (a run folder, or its checkpoints/ folder): where the run's tokenizer is."""
    path = Path(checkpoint)
    return path.parent if path.name == "checkpoints" and not (path / "checkpoints").is_dir() else path


def read_run(checkpoint: str | os.PathLike, *, step: int | None = None, dtype: str | None = None,
             device=None) -> tuple[dict, dict]:
    """The parameters of a run's newest intact checkpoint (or `step`), whole, on one device (`device`, default
    the first): a pure dict keyed like `nnx.to_pure_dict(nnx.state(model, nnx.Param))` with block indices as string
    keys, and what they are, {"model": class name, "config": dict, "step": int, "source": checkpoint folder}.
    `dtype` casts the floating-point parameters."""
    ckpts = _checkpoints(Path(checkpoint))
    chosen = ckpts.newest_intact(step)
    meta = ckpts.read_meta(chosen)
    placed = SingleDeviceSharding(device if device is not None else jax.devices()[0])
    cast = jnp.dtype(dtype) if dtype is not None else None

    def target(shape, dt):
        dt = jnp.dtype(dt)
        return jax.ShapeDtypeStruct(tuple(shape), cast if cast is not None and jnp.issubdtype(dt, jnp.floating)
                                    else dt, sharding=placed)

    tree: dict = {}
    for path, (shape, dt) in _flat_shapes(meta["shapes"]).items():
        _logical._set(tree, path.split("/"), target(shape, dt))
    got = ckpts.read_params(chosen, tree)
    ckpts.close()
    return got, {"model": meta["model"], "config": meta["config"], "step": chosen, "source": str(ckpts.directory)}


def load_params(pipeline, source: str | os.PathLike, *, step: int | None = None, dtype=None) -> str:
    """Load parameters into `pipeline`'s stages, placed for *its* topology, from an export folder (`export`)
    or a run's checkpoints (newest intact step, or `step`). Optimizer state is untouched. `dtype` casts the
    floating-point parameters (e.g. jnp.bfloat16 for evaluation; the stage programs then run in that dtype).
    Returns a one-line description of what was loaded."""
    source = Path(source)
    why = _logical.supported(pipeline)
    if why is not None:
        raise CheckpointError(f"init_from: cannot load parameters into this pipeline: {why}")
    tg = _logical.targets(pipeline, dtype=dtype)["params"]
    expected = _logical.shapes(pipeline)
    if (source / "model.json").is_file() and (source / "params").is_dir():
        info = json.loads((source / "model.json").read_text())
        check_shapes(_flat_shapes(info["shapes"]), expected, f"export {source}")
        got = ocp.StandardCheckpointer().restore((source / "params").absolute(), tg)
        what = f"export {source} (step {info.get('step')})"
    else:
        ckpts = _checkpoints(source)
        chosen = ckpts.newest_intact(step)
        check_shapes(_flat_shapes(ckpts.read_meta(chosen)["shapes"]), expected,
                     f"checkpoint step {chosen} in {ckpts.directory}")
        got = ckpts.read_params(chosen, tg)
        ckpts.close()
        what = f"checkpoint step {chosen} in {ckpts.directory}"
    pipeline.set_params(_logical.to_stages(pipeline, got, [s.params for s in pipeline.stages]))
    return what


# ---- CLI ------------------------------------------------------------------------------------------------------------


def _cmd_export(args) -> int:
    out = export(args.checkpoint, args.out, step=args.step, dtype=args.dtype)
    info = json.loads((out / "model.json").read_text())
    print(f"exported step {info['step']} of {info['source']} ({info['model']}, {len(info['shapes'])} parameters) "
          f"to {out}/params (plain orbax; load with nnx.replace_by_pure_dict)")
    return 0


def register(sub) -> None:
    """Add `hxtrain export` to the CLI's subparsers."""
    e = sub.add_parser("export", help="write a run's checkpoint as one unsplit plain orbax checkpoint")
    e.add_argument("--checkpoint", required=True, help="a run's --out folder (or its checkpoints/ folder)")
    e.add_argument("--out", required=True, help="new folder for the export")
    e.add_argument("--step", type=int, help="which step (default: the newest intact one)")
    e.add_argument("--dtype", help="cast floating-point parameters, e.g. bfloat16 (default: as saved, fp32)")
    e.set_defaults(func=_cmd_export)
