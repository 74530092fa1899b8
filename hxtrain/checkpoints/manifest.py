"""Sealing a checkpoint: a manifest of every file's size and sha256, written after orbax has finished the step.
(And `unwritable`: whether a run or checkpoint folder can be written at all, probed before a run starts.)

orbax makes a step atomic (it writes into a temporary folder and renames it when complete), but it does not
checksum array data, so a file truncated or altered later would restore garbage or fail deep inside tensorstore.
The manifest is written after `wait_until_finished`, itself atomically (temporary file + `os.replace`), so:

    no manifest       the run stopped between orbax's rename and the seal: not trusted, skipped
    manifest, match   complete and intact
    mismatch          damaged: `CheckpointDamaged` names the step and the first bad file
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

MANIFEST = "hxtrain_manifest.json"


class CheckpointDamaged(RuntimeError):
    """A checkpoint file is missing, truncated or altered since the checkpoint was sealed."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(step_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(step_dir)) for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST
                  and not p.name.startswith(MANIFEST))


def seal(step_dir: str | os.PathLike) -> Path:
    """Write `step_dir/hxtrain_manifest.json` ({"files": {relative path: {"size", "sha256"}}}) atomically."""
    step_dir = Path(step_dir)
    files = {rel: {"size": (step_dir / rel).stat().st_size, "sha256": _sha256(step_dir / rel)}
             for rel in _files(step_dir)}
    tmp = step_dir / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, step_dir / MANIFEST)
    return step_dir / MANIFEST


def unwritable(folder: str | os.PathLike) -> str | None:
    """Why `folder` cannot be written, e.g. 'Permission denied', or None when it can. Creates it (and its parents)
    if missing, then creates and deletes a probe file in it: `os.access` says yes to root on a read-only folder.
    No JAX here: `hxtrain site` probes its folders before JAX starts."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        return "it is a file"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".hxtrain-write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return e.strerror or type(e).__name__
    return None


def is_sealed(step_dir: str | os.PathLike) -> bool:
    return (Path(step_dir) / MANIFEST).is_file()


def verify(step_dir: str | os.PathLike, step: int) -> None:
    """Raise CheckpointDamaged naming the step and the first file that is missing, of another size or another
    sha256 than at save time."""
    step_dir = Path(step_dir)
    try:
        files = json.loads((step_dir / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointDamaged(f"checkpoint step {step}: manifest {step_dir / MANIFEST} is unreadable ({e})") from e
    for rel, want in files.items():
        path = step_dir / rel
        if not path.is_file():
            raise CheckpointDamaged(f"checkpoint step {step}: file {rel} is missing (in {step_dir})")
        size = path.stat().st_size
        if size != want["size"]:
            raise CheckpointDamaged(f"checkpoint step {step}: file {rel} has {size} bytes, {want['size']} at save "
                                    f"time (truncated or altered; in {step_dir})")
        if _sha256(path) != want["sha256"]:
            raise CheckpointDamaged(f"checkpoint step {step}: file {rel} has another sha256 than at save time "
                                    f"(altered; in {step_dir})")
