"""Generation: sampling from a model with a KV cache, on one device or pipelined across a topology's sites.

    from hxtrain.generation import generate, load_model, sample_text
    model, tokenizer, info = load_model("runs/a")                  # a run folder or an export folder
    print(sample_text(model, tokenizer, "Once upon a time", 100, temperature=0.8, top_k=40))

Modules: `forward` (`Stages`: the model as per-site stage programs with their caches), `sampling` (`generate`,
the one sampling loop; `sample_text`), `load` (`load_model`), `cli` (`hxtrain sample`). The model must follow the
generation protocol of `hxtrain.core.parts`.
"""

from hxtrain.generation.forward import Stages
from hxtrain.generation.load import load_model
from hxtrain.generation.sampling import GenerationError, generate, sample_text

__all__ = ["GenerationError", "Stages", "generate", "load_model", "sample_text"]
