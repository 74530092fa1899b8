"""The model registry: preset names ('tiny', 'small', '7b', ...) -> model configs and built models.

The one hxtrain module that imports the `models` package (a layering test enforces it), and only inside its
functions, so importing hxtrain starts neither Flax nor JAX for a model nobody asked for. `train`, `plan` and
`profile` all look presets up here, so they accept the same names and refuse others with the same message.
"""

from __future__ import annotations

import dataclasses


def find(name):
    """The config of preset `name` (case and surrounding spaces ignored), or None when there is no such preset."""
    from models import gpt

    key = name.strip().lower() if isinstance(name, str) else name
    return gpt.PRESETS.get(key)


def preset(name):
    """The config of preset `name` (case and surrounding spaces ignored); ValueError naming the presets otherwise."""
    from models import gpt

    cfg = find(name)
    if cfg is None:
        raise ValueError(f"--model: unknown model {name!r}; choose one of {', '.join(gpt.PRESETS)}")
    return cfg


def build(name, seed: int = 0, **changes):
    """The model of preset `name`, its parameters drawn from `seed`; `changes` replace config fields
    (e.g. `n_layers=2`)."""
    from models import gpt

    cfg = preset(name)
    return gpt.build(dataclasses.replace(cfg, **changes) if changes else cfg, seed=seed)
