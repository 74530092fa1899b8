"""Checkpoints that restore onto other hardware: the run's checkpoints, a site's, the manifest,
the logical (hardware-free) layout, and exports."""
