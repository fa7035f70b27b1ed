"""AlignMixup in JAX/Flax."""

from alignmix_jax.runtime import xla_cpu_flags

# Before JAX starts its CPU backend, which reads XLA_FLAGS once (see xla_cpu_flags).
xla_cpu_flags.set_xla_cpu_flags()
