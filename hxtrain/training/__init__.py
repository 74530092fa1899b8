"""The training loop and what is around it: `Trainer`, the data, metrics."""
