"""`pip install .` into a fresh virtual environment gives a working alignmix_jax.

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

    help_run = run([str(python), '-m', 'alignmix_jax.main', '--help'], elsewhere)
    # absl prints the usage and exits with status 1 after --help.
    assert help_run.returncode == 1, help_run.stderr
    assert 'Trains AlignMix' in help_run.stdout and '--workdir' in help_run.stdout

    # The configs are the repository's: outside it, one line says where they are.
    no_config = run([str(python), '-m', 'alignmix_jax.main', '--config=configs/demo.py',
                     '--workdir=runs/demo'], elsewhere)
    assert no_config.returncode != 0
    assert no_config.stderr.strip().splitlines()[-1].startswith(
        'error: no config file configs/demo.py'), no_config.stderr
    assert 'configs/ folder of the alignmix_jax repository' in no_config.stderr
