"""Model zoo: plain Flax NNX models that speak logical axis names only (no mesh, no site, no hxtrain)."""
