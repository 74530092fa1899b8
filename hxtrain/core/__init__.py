"""The model protocol, placement on a site's mesh, the stage programs and the optimizer rule: what one
stage is and computes, for every way of running."""
