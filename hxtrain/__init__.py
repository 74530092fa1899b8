"""hxtrain: train one Flax NNX model across sites whose accelerators differ in brand and speed.

Public API:
    load_topology(path) -> Topology        sites, links and the default run, from meshes/*.toml
    register_plugins(topology)             the PJRT plugins its sites name, before the first JAX array
    Pipeline(model, topology, schedule=, microbatches=, partition=)   .loss_and_grads(tokens)
    Trainer(model, topology, ...).fit(steps)   and   train(RunConfig(...))
    generate(model, prompt_ids, n_tokens, ...) / sample_text(model, tokenizer, prompt, n_tokens, ...)
    load_tokenizer(path)                   a tokenizer.json, a SentencePiece .model, or "byte"
"""

from hxtrain.backends import register_plugins
from hxtrain.core.optim import OptimizerConfig
from hxtrain.core.parts import ProtocolError, split_model
from hxtrain.engine.pipeline import Pipeline
from hxtrain.core.placement import PlacementError
from hxtrain.schedules.tables import (ZBH1, GPipe, Interleaved, OneFOneB, ScheduleError, Task, UserTable, analytic_bubble,
                               get_schedule)
from hxtrain.engine.spmd import SpmdPipeline
from hxtrain.config.topology import Link, RunDefaults, Site, Topology, TopologyError, load_topology, shipped, uniform
from hxtrain.training.trainer import NonFiniteLoss, RunConfig, Trainer, train
from hxtrain.generation.sampling import generate, sample_text
from hxtrain.data.tokenizer import ByteTokenizer, load as load_tokenizer

__all__ = [
    "GPipe", "Interleaved", "Link", "SpmdPipeline", "UserTable", "ZBH1", "analytic_bubble", "NonFiniteLoss", "OneFOneB", "OptimizerConfig", "Pipeline", "PlacementError",
    "ProtocolError", "RunConfig", "RunDefaults", "ScheduleError", "Site", "Task", "Topology", "TopologyError",
    "Trainer", "get_schedule", "load_topology", "register_plugins", "shipped", "split_model", "train", "uniform",
    "ByteTokenizer", "generate", "load_tokenizer", "sample_text",
]
