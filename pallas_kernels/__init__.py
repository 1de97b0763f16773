"""Pallas GPU kernels (Triton lowering) with plain-jnp references; imports jax only."""
