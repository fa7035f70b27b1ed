"""`pip install .` into a fresh virtual environment gives a working alignmix_jax: the API, the
demo data, every command's `--help` from another directory, and one `error:` line where a
command needs the repository's configs/ (deliberately not installed: see CONFIGS_HINT).

Nothing is downloaded: the environment sees the running one's packages (the heavy
dependencies), pip runs with --no-index, so every declared dependency must already be there,
and the build uses the running environment's setuptools (--no-build-isolation).
"""

import importlib.util
import os
import pathlib
import shutil
import site
import subprocess
import sys
import sysconfig

import pytest

# Slow (left out by -m "not slow"): installs the package into a fresh virtual environment.
pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run(command, cwd, **kwargs):
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, 'PYTHONPATH': ''}, **kwargs)


def test_pip_install_into_a_fresh_venv(tmp_path):
    # A copy, so that the build's files (build/, *.egg-info) never land in the checkout.
    source = tmp_path / 'source'
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        '.git', '.venv', 'runs', '__pycache__', '*.egg-info', 'build', '.pytest_cache',
        '.ruff_cache'))
    venv = tmp_path / 'venv'
    # --system-site-packages reaches the base interpreter's packages. When the tests run in
    # a virtual environment themselves, its packages are one more site directory, added with
    # a .pth file (listed after the new environment's own site-packages, so what pip installs
    # there comes first). --without-pip: pip and setuptools come from the running environment.
    subprocess.run([sys.executable, '-m', 'venv', '--system-site-packages', '--without-pip',
                    str(venv)], check=True, timeout=120)
    python = venv / 'bin' / 'python'
    venv_site = pathlib.Path(run([str(python), '-c', 'import sysconfig; '
                                  'print(sysconfig.get_path("purelib"))'], tmp_path).stdout.strip())
    running_sites = [*site.getsitepackages(), sysconfig.get_path('purelib')]
    (venv_site / 'running_environment.pth').write_text('\n'.join(dict.fromkeys(running_sites)))

    # With the optional PyTorch extra where the running environment has PyTorch (the tested
    # set installs it for the converter's tests; without it those tests skip, saying so).
    extra = '[torch]' if importlib.util.find_spec('torch') else ''
    install = run([str(python), '-m', 'pip', 'install', '--no-index', '--no-build-isolation',
                   '--quiet', f'{source}{extra}'], tmp_path)
    assert install.returncode == 0, install.stdout + install.stderr

    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    check = run([str(python), '-c', '\n'.join([
        'import importlib.metadata, importlib.resources, alignmix_jax',
        'from alignmix_jax.method import api, mixup',  # the public API imports
        'print(alignmix_jax.__file__)',
        'print(sorted(path.name for path in importlib.resources.files("alignmix_jax")'
        '.rglob("*.npz")))',
        'print(importlib.metadata.requires("alignmix_jax"))',
    ])], elsewhere)
    assert check.returncode == 0, check.stderr
    location, data_files, requirements = check.stdout.splitlines()
    assert location.startswith(str(venv_site)), location  # the installed copy, not the checkout
    assert data_files == "['cifar10_demo.npz']"  # the embedded demo data came along
    # jax 0.11 too (the GPU machines'); clu no longer (its writers import TensorFlow).
    assert "'jax<0.12,>=0.10.2'" in requirements and "extra == \"torch\"" in requirements
    assert not any(name.startswith("'clu") for name in requirements.split(', '))

    check_every_command_prints_its_help(python, elsewhere)
    check_the_configs_are_named_where_a_command_needs_them(python, elsewhere)


# Every `python -m` command: (module, exit status after --help, text its help shows). absl
# prints the usage and exits with status 1 after --help, argparse with 0; the evaluation
# package's dispatcher answers any option with its usage line (stderr) naming the kinds.
COMMAND_HELP = [
    ('alignmix_jax.main', 1, '--workdir'),
    ('alignmix_jax.evaluation', 1, 'the kinds are classification, robustness'),
    *[(f'alignmix_jax.evaluation.{kind}', 1, f'python -m alignmix_jax.evaluation.{kind}')
      for kind in ('classification', 'robustness', 'calibration', 'ood', 'localization',
                   'correspondence')],
    ('alignmix_jax.experiments.reproduce', 1, '--ablation'),
    ('alignmix_jax.experiments.bench', 1, '--torch_threads'),
    ('alignmix_jax.experiments.visualize', 1, '--workdir'),
    ('alignmix_jax.pytorch.parity_run', 1, '--side'),
    ('alignmix_jax.pytorch.convert_torchvision', 1, '--arch'),
    ('alignmix_jax.data.prepare_tiny_imagenet', 0, '--source SOURCE'),
    ('alignmix_jax.data.demo.build', 0, '--train_per_class'),
]


def check_every_command_prints_its_help(python, elsewhere):
    """`--help` of each command works from the installed copy, outside any checkout: no
    command imports the repository's configs/ (or PyTorch) before it runs."""
    for module, status, shown in COMMAND_HELP:
        result = run([str(python), '-m', module, '--help'], elsewhere)
        assert result.returncode == status, (module, result.stderr[-2000:])
        assert shown in result.stdout + result.stderr, (module, result.stdout[-2000:])
        assert 'Traceback' not in result.stderr, (module, result.stderr[-2000:])


def check_the_configs_are_named_where_a_command_needs_them(python, elsewhere):
    """The configs are the repository's: outside it, one `error:` line says where they are,
    for the commands given a config file and those that build their own configs."""
    no_config = run([str(python), '-m', 'alignmix_jax.main', '--config=configs/demo.py',
                     '--workdir=runs/demo'], elsewhere)
    assert no_config.returncode != 0
    assert no_config.stderr.strip().splitlines()[-1].startswith(
        'error: no config file configs/demo.py'), no_config.stderr
    assert 'configs/ folder of the alignmix_jax repository' in no_config.stderr

    builders = {
        'configs.backbones': ['alignmix_jax.experiments.reproduce', '--data_dir=images',
                              '--workdir=runs/mini'],
        'configs.mini_reproduction': ['alignmix_jax.pytorch.parity_run', '--side=ours',
                                      '--data_dir=images'],
    }
    for name, command in builders.items():
        result = run([str(python), '-m', *command], elsewhere)
        assert result.returncode == 1, (command, result.stderr[-2000:])
        assert result.stderr.strip().splitlines() == [
            f'error: cannot import {name} (from {elsewhere}); the config files are in the '
            f'configs/ folder of the alignmix_jax repository, not in the installed package: '
            f'run the command from the root of a checkout'], (command, result.stderr[-2000:])
    assert not (elsewhere / 'runs').exists()  # refused before writing anything
