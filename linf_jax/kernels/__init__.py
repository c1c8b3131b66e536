"""Pallas kernels (GPU/TPU) for the ops in linf_jax.ops (issue 5)."""
