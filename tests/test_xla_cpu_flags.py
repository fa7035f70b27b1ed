"""The XLA:CPU settings the package puts in XLA_FLAGS, and that XLA compiles with them."""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp

from alignmix_jax.runtime import xla_cpu_flags
from tests.conftest import REPO_ROOT

OPTION = xla_cpu_flags.YNN_FUSION_OPTION


def test_the_option_is_added_to_the_flags_already_there():
    environ = {'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
    assert xla_cpu_flags.set_xla_cpu_flags(environ)
    assert environ['XLA_FLAGS'] == ('--xla_force_host_platform_device_count=8 '
                                    f'{OPTION}=-individual_convolution,+eltwise')
    environ = {}
    assert xla_cpu_flags.set_xla_cpu_flags(environ)
    assert environ['XLA_FLAGS'] == f'{OPTION}=-individual_convolution,+eltwise'


def test_a_users_own_setting_of_the_option_is_kept():
    environ = {'XLA_FLAGS': f'{OPTION}=+individual_convolution'}
    assert not xla_cpu_flags.set_xla_cpu_flags(environ)
    assert environ['XLA_FLAGS'] == f'{OPTION}=+individual_convolution'


def test_an_accelerator_plugin_or_another_jaxlib_leaves_the_flags_alone(tmp_path, monkeypatch):
    # A CUDA plugin carries its own XLA, which reads XLA_FLAGS too: nothing is added.
    environ = {'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
    assert not xla_cpu_flags.set_xla_cpu_flags(environ, plugins=['xla_cuda13'])
    assert environ == {'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
    # The plugins are found as the folders of the jax_plugins namespace package.
    assert xla_cpu_flags.accelerator_plugins() == []
    (tmp_path / 'jax_plugins' / 'xla_cuda13').mkdir(parents=True)
    (tmp_path / 'jax_plugins' / 'xla_cuda13' / '__init__.py').write_text('')
    monkeypatch.syspath_prepend(str(tmp_path))
    assert xla_cpu_flags.accelerator_plugins() == ['xla_cuda13']
    environ = {}
    assert not xla_cpu_flags.set_xla_cpu_flags(environ)
    assert environ == {}
    # jaxlib 0.11's XLA may not know the option: it is not added there.
    monkeypatch.setattr('jaxlib.version.__version__', '0.11.2')
    assert not xla_cpu_flags.set_xla_cpu_flags(environ, plugins=[])
    assert environ == {}


def convolutions(compiled_text: str) -> tuple[int, int]:
    """(convolutions in the optimised HLO, those of them inside a YNNPACK fusion)."""
    bodies = dict(re.findall(r'\n%([\w.\-]+) [^\n]*\{\n(.*?)\n\}', compiled_text, re.S))
    ynn_called = re.findall(r'calls=%([\w.\-]+)[^\n]*"kind":"__ynn_fusion"', compiled_text)
    in_ynn = sum(bodies[name].count(' convolution(') for name in ynn_called)
    return compiled_text.count(' convolution('), in_ynn


def compiled_convolution_gradient() -> str:
    """The optimised HLO of a 3x3 convolution's kernel gradient on this process's CPU, at a
    size where jaxlib's default picks YNNPACK for it (below some size it does not)."""
    def kernel_gradient(images, output_gradient):
        def convolve(kernel):
            return jax.lax.conv_general_dilated(images, kernel, (1, 1), 'SAME',
                                                dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
        return jax.vjp(convolve, jnp.zeros((3, 3, 64, 64)))[1](output_gradient)[0]

    batch = jnp.ones((128, 8, 8, 64))
    return jax.jit(kernel_gradient).lower(batch, batch).compile().as_text()


def test_convolutions_compile_to_eigens_not_ynnpacks():
    # conftest imports the package before JAX starts its backend, as the commands do.
    total, in_ynn = convolutions(compiled_convolution_gradient())
    assert total == 1 and in_ynn == 0
    # jaxlib's default, in a process whose XLA_FLAGS name the option themselves.
    environ = dict(os.environ, XLA_FLAGS=f'{OPTION}=+individual_convolution')
    default = subprocess.run(
        [sys.executable, '-c', 'from tests.test_xla_cpu_flags import '
         'compiled_convolution_gradient as compiled; print(compiled())'],
        env=environ, cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    total, in_ynn = convolutions(default)
    assert total == 1 and in_ynn == 1
