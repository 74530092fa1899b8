"""Topologies: the dataclasses, the TOML loader and every field's validation. No JAX."""
