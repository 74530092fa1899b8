"""The model registry: preset names ('tiny', 'small', '7b', 'llama-tiny', 'llama-8b', ...) -> model configs and
built models, for every model family in `models/` (GPT and Llama).

The one hxtrain module that imports the `models` package (a layering test enforces it), and only inside its
functions, so importing hxtrain starts neither Flax nor JAX for a model nobody asked for. `train`, `plan` and
`profile` all look presets up here, so they accept the same names and refuse others with the same message. A
checkpoint records a model as its class name and config (`checkpoints.checkpoint.run_meta`); `from_config` turns
that record back into a model.
"""

from __future__ import annotations

import dataclasses


def _families():
    """{model class name: (config class, module)}; each module has `PRESETS`, `build(cfg, seed)` and `loss`."""
    from models import gpt, llama

    return {"GPT": (gpt.GPTConfig, gpt), "Llama": (llama.LlamaConfig, llama)}


def presets() -> dict:
    """Every preset name -> its config, all families (names are unique across families)."""
    return {name: cfg for _, module in _families().values() for name, cfg in module.PRESETS.items()}


def find(name):
    """The config of preset `name` (case and surrounding spaces ignored), or None when there is no such preset."""
    key = name.strip().lower() if isinstance(name, str) else name
    return presets().get(key)


def preset(name):
    """The config of preset `name` (case and surrounding spaces ignored); ValueError naming the presets otherwise."""
    cfg = find(name)
    if cfg is None:
        raise ValueError(f"--model: unknown model {name!r}; choose one of {', '.join(presets())}")
    return cfg


def _module_of_config(cfg):
    for config_cls, module in _families().values():
        if isinstance(cfg, config_cls):
            return module
    raise ValueError(f"model config {type(cfg).__name__}: not a config of a known model family "
                     f"({', '.join(c.__name__ for c, _ in _families().values())})")


def build(name, seed: int = 0, **changes):
    """The model of preset `name`, its parameters drawn from `seed`; `changes` replace config fields
    (e.g. `n_layers=2`). The config's type picks the family (GPTConfig -> GPT, LlamaConfig -> Llama)."""
    cfg = preset(name)
    cfg = dataclasses.replace(cfg, **changes) if changes else cfg
    return _module_of_config(cfg).build(cfg, seed=seed)


def from_config(class_name: str, config: dict, seed: int = 0):
    """The model a checkpoint's metadata describes: its class name (`type(model).__name__`) and its config as
    `dataclasses.asdict` wrote it (JSON: tuples may have come back as lists, which no config field holds)."""
    families = _families()
    if class_name not in families:
        raise ValueError(f"model {class_name!r}: unknown model class; known: {', '.join(families)}")
    config_cls, module = families[class_name]
    try:
        cfg = config_cls(**config)
    except TypeError as e:  # a field the config class does not have (or lacks a required one)
        raise ValueError(f"model {class_name!r}: config {config} does not fit {config_cls.__name__}: {e}") from None
    return module.build(cfg, seed=seed)


def reference_loss(model):
    """The single-device reference loss `loss(model, tokens [B, T+1]) -> mean nats per token` of `model`'s
    family (every family's is embed -> blocks -> head)."""
    families = _families()
    name = type(model).__name__
    if name not in families:
        raise ValueError(f"model {name!r}: unknown model class; known: {', '.join(families)}")
    return families[name][1].loss
