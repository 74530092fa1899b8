"""Choosing how to split a model over sites: the cost model, the planner, plan files, profiling."""
