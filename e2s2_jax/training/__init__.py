"""Training: mesh and partitioning rules, optimizers, train state and the jitted train step."""
