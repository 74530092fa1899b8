"""Running a step: the one MPMD step engine, the in-process transport, `Pipeline`, and the SPMD path."""
