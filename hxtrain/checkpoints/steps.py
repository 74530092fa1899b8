"""Which step a run of site processes can continue from, whatever topology saved it; no JAX (the launcher reads it).

A site process saves its own stages under DIR/<site>/<step>/ with a `meta` item naming the sites of the topology it
ran with and every stage's block range (`hxtrain.checkpoints.site`). When a run continues on fewer sites (an
elastic re-plan) or on more again (a rejoin), the sites of one topology save the same step numbers into folders
that may also hold steps of another topology: site b's folder keeps its steps from before it was lost.

A step is **complete** when every site its meta names has sealed that step (`manifest`) with the same sites and
block ranges: the union of those folders is then the whole model, its optimizer state and the data position at
that step. `newest_complete` is the step to continue from; `complete` the folders to read it from.
"""

from __future__ import annotations

import json
from pathlib import Path

from hxtrain.checkpoints import manifest as _manifest


def read_json(folder: Path, step: int, item: str) -> dict:
    """A JSON item ("meta", "data") of a sealed step folder, as orbax's JsonSave wrote it."""
    return json.loads((Path(folder) / str(step) / item / "metadata").read_text())


def sealed(root: Path) -> dict[str, dict[int, dict]]:
    """{site folder name: {step: its meta}} of every sealed step under `root` (DIR of `--checkpoint-dir`)."""
    out: dict[str, dict[int, dict]] = {}
    root = Path(root)
    for folder in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else ():
        steps = {}
        for sub in folder.iterdir():
            if sub.name.isdigit() and _manifest.is_sealed(sub):
                try:
                    steps[int(sub.name)] = read_json(folder, int(sub.name), "meta")
                except (OSError, ValueError):  # sealed but unreadable: the sha256 check at restore names it
                    continue
        if steps:
            out[folder.name] = steps
    return out


def _generation(meta: dict) -> tuple:
    return json.dumps(meta.get("sites")), json.dumps(meta.get("ranges"))


def complete(root: Path, step: int, table: dict | None = None) -> dict[str, dict] | None:
    """{site: meta} of the folders that make `step` complete (see the module doc), or None when it is not."""
    table = sealed(root) if table is None else table
    for name, steps in table.items():
        meta = steps.get(step)
        if meta is None or meta.get("site") != name:
            continue
        names = [s[0] for s in meta.get("sites", ())]
        got = {n: table.get(n, {}).get(step) for n in names}
        if all(m is not None and m.get("site") == n and _generation(m) == _generation(meta) for n, m in got.items()):
            return got
    return None


def newest_complete(root: Path, at_most: int | None = None) -> tuple[int, dict[str, dict]] | None:
    """(step, {site: meta}) of the newest complete step under `root` (at or before `at_most`), or None."""
    table = sealed(root)
    for step in sorted({s for steps in table.values() for s in steps}, reverse=True):
        if at_most is not None and step > at_most:
            continue
        got = complete(root, step, table)
        if got is not None:
            return step, got
    return None


__all__ = ["complete", "newest_complete", "read_json", "sealed"]
