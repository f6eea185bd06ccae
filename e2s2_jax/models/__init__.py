"""Pure Flax modules: no data, no training code."""
