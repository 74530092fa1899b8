"""Topology files (TOML). Python logic lives in hxtrain.config.topology; this package only ships the files."""

from pathlib import Path

DIR = Path(__file__).parent
