"""AlignMixup in JAX/Flax."""
