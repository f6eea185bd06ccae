"""e2s2-jax: pretraining T5-style encoder-decoders with encoder-enhanced objectives."""
