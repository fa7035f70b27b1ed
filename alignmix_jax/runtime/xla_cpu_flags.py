"""The XLA:CPU settings this project trains with, put in XLA_FLAGS when the package is imported.

jaxlib 0.10 hands every convolution on the CPU to YNNPACK, one of XLA's kernel libraries
(the `individual_convolution` library fusion). For the convolutions of these networks XLA's
other CPU convolution, Eigen's, is much faster: on this project's 2-core x86_64 machine, one
3x3 convolution of a batch of 128 at 32x32 with 16 channels took 5 ms forward with either,
but its kernel gradient 25-28 ms with YNNPACK (run on one thread) against 13-15 ms with Eigen;
at 64 channels, forward 116 against 54 ms and kernel gradient 342 against 100 ms. Element-wise
work (BatchNorm's normalisation, ReLU and their gradients) runs in YNNPACK's kernels instead
(`+eltwise`, off by default). The demo's training step: 524 ms with jaxlib's defaults, 389 ms
with Eigen's convolutions, 357 ms with both changes; the full-width PreActResNet18's: 5,951 ->
3,687 ms (docs/performance.md, "The CPU settings", for the commands and the side-by-side
figures against PyTorch). Results change only by floating-point reassociation.

XLA reads XLA_FLAGS once, when JAX starts its CPU backend (the first computation), so this
must run before that: `alignmix_jax/__init__.py` runs it on import. Left alone: an XLA_FLAGS
that already sets the option (the user's choice wins); a jaxlib outside 0.10.x, whose XLA may
not know the option (XLA stops at an unknown flag: jax 0.11 must start as it is); and any
environment with an accelerator plugin of JAX installed (`jax_plugins.*`: CUDA, ROCm, TPU),
whose own copy of XLA reads XLA_FLAGS too, and whose runs do not train on the CPU anyway.
"""

import importlib.util
import os

YNN_FUSION_OPTION = '--xla_cpu_experimental_ynn_fusion_type'
# Removed from and added to jaxlib's default list of YNNPACK fusions (its incremental syntax).
YNN_FUSION_CHANGES = '-individual_convolution,+eltwise'
# The jaxlib releases whose XLA knows the option and was measured with it.
MEASURED_JAXLIB = '0.10.'


def accelerator_plugins() -> list[str]:
    """The names of the installed JAX accelerator plugins (`jax_plugins.xla_cuda13`, ...),
    found without importing them (or JAX)."""
    spec = importlib.util.find_spec('jax_plugins')
    if spec is None or not spec.submodule_search_locations:
        return []
    return sorted(name for location in spec.submodule_search_locations
                  if os.path.isdir(location) for name in os.listdir(location)
                  if not name.startswith(('_', '.')))


def set_xla_cpu_flags(environ=os.environ, plugins: list[str] | None = None) -> bool:
    """Adds the YNNPACK fusion changes to `environ['XLA_FLAGS']`; True if it did.
    `plugins`: the accelerator plugins installed (None: `accelerator_plugins()`)."""
    flags = environ.get('XLA_FLAGS', '')
    if YNN_FUSION_OPTION in flags:
        return False
    if accelerator_plugins() if plugins is None else plugins:
        return False
    try:
        from jaxlib import version  # a few ms; does not start JAX
    except ImportError:
        return False
    if not version.__version__.startswith(MEASURED_JAXLIB):
        return False
    environ['XLA_FLAGS'] = f'{flags} {YNN_FUSION_OPTION}={YNN_FUSION_CHANGES}'.strip()
    return True
