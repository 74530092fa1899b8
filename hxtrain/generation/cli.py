"""`hxtrain sample`: text from a trained run or an export, on one device or pipelined across a topology's sites.

    hxtrain sample --from runs/a --prompt "Once upon a time" --tokens 100 [--temperature 0.8 --top-k 40
                   --top-p 0.95 --seed 1 --mesh local --compute-dtype bfloat16 --no-cache]

Prints the prompt and its continuation (the tokenizer's decoding) on stdout; what was loaded and how fast it ran
go to stderr.
"""

from __future__ import annotations

import argparse
import sys
import time


def register(sub) -> None:
    """Add `hxtrain sample` to the CLI's subparsers."""
    from hxtrain.config.checks import COMPUTE_DTYPES

    s = sub.add_parser("sample", help="generate text from a run folder or an export (KV cache, jit; --mesh: "
                                      "pipelined across a topology's sites)")
    s.add_argument("--from", dest="source", required=True, metavar="RUN_OR_EXPORT",
                   help="a run folder (hxtrain train --out; its newest sealed checkpoint) or an export folder")
    s.add_argument("--prompt", required=True, help="the text to continue")
    s.add_argument("--tokens", type=int, required=True, metavar="N", help="how many tokens to generate")
    s.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    s.add_argument("--top-k", type=int, help="sample among the K most likely tokens only")
    s.add_argument("--top-p", type=float, help="sample among the most likely tokens holding probability P")
    s.add_argument("--seed", type=int, default=0, help="sampling seed (default 0): a seed gives the same text")
    s.add_argument("--step", type=int, help="a run's checkpoint step (default: the newest sealed, intact one)")
    s.add_argument("--mesh", help="sample pipelined across this topology's sites (TOML file or shipped name); "
                                  "default: one device")
    # Not argparse `choices`: a bad value is the one-line GenerationError that `generate` raises for it too.
    s.add_argument("--compute-dtype", metavar="|".join(COMPUTE_DTYPES),
                   help="what the forward computes (and keeps its KV cache) in; params stay float32 and sampling "
                        "is float32 (default: each site's policy with --mesh, as training uses it; else float32)")
    s.add_argument("--no-cache", action="store_true",
                   help="recompute the whole sequence for every token instead of keeping a KV cache (slow)")
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    topology = None
    if args.mesh is not None:
        from hxtrain import backends
        from hxtrain.config.topology import load_topology

        topology = load_topology(args.mesh)
        backends.register_plugins(topology)  # before anything below starts JAX's backends
    from hxtrain.core.parts import ProtocolError
    from hxtrain.generation.load import load_model
    from hxtrain.generation.sampling import GenerationError, forward_for, generate

    model, tokenizer, info = load_model(args.source, step=args.step)
    try:
        forward = forward_for(model, topology, cache=not args.no_cache, compute_dtype=args.compute_dtype)
    except ProtocolError as e:  # a TypeError: the command line reports input errors in one line
        raise GenerationError(f"--from: {e}") from None
    print(f"hxtrain sample: {info['model']} from {info['kind']} {info['source']} (step {info['step']})\n"
          f"{forward.describe()}", file=sys.stderr)
    ids = list(tokenizer.encode(args.prompt))
    began = time.perf_counter()
    new = generate(forward, ids, args.tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   seed=args.seed, cache=not args.no_cache)[0]
    took = time.perf_counter() - began
    print(tokenizer.decode(ids + [int(t) for t in new]))
    print(f"hxtrain sample: {len(new)} tokens in {took:.2f} s (compile included; "
          f"{'no cache' if args.no_cache else 'KV cache'})", file=sys.stderr)
    return 0
