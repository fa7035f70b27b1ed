"""Shared fixtures: a persistent compilation cache, a tiny training config, image folders built
from the embedded demo images, and the opt-in checks on the full CIFAR-10 JPEG copy."""

import functools
import os
import pathlib
import re
import subprocess
import sys

# Tests train the same tiny networks many times; compiling each program once saves minutes.
# Set in the environment before JAX is imported, so that the commands the tests start as
# subprocesses (the two-process run, the 8-device step, the command-line tests: 26 in all,
# most of them the same tiny run) read and fill the same cache as the test processes.
os.environ['JAX_COMPILATION_CACHE_DIR'] = os.environ.get('ALIGNMIX_TEST_JAX_CACHE',
                                                         '/tmp/alignmix_jax_test_cache')
os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import alignmix_jax  # noqa: E402, F401  (sets XLA's CPU flags before JAX starts its backend)
from configs import demo  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# The start of an absl log line (level, date, time, thread id): kept off a quiet console.
ABSL_PREFIX = re.compile(r'^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d{6} +\d+ ', re.MULTILINE)
CIFAR10_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse',
                   'ship', 'truck')

# The checks that need more CIFAR-10 JPEGs than the embedded demo holds (its 6,000 against the
# full copy's 60,000) are opt-in: marked `shared_data`, they run only when this variable names
# the full copy (DIR/{train,test}/<class>/NNNN.jpg), and are otherwise deselected, counted in
# pytest's summary line; .ci/run sets it. Named but missing, they fail.
SHARED_DATA_VARIABLE = 'ALIGNMIX_SHARED_DATA'

# If a plugin imported JAX before this file, it read the environment too early.
jax.config.update('jax_compilation_cache_dir', os.environ['JAX_COMPILATION_CACHE_DIR'])
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


def init_key(seed: int) -> jax.Array:
    """A key for model.init in tests: threefry takes ~10 s here to compile the draws of a
    ResNet's parameter tensors; the rbg bit generator compiles in ~3 s, same initialisers."""
    return jax.random.key(seed, impl='rbg')


def run_reproduce(data_dir, workdir, *flags) -> subprocess.CompletedProcess:
    """`python -m alignmix_jax.experiments.reproduce --data_dir=... --workdir=... FLAGS` from
    the checkout, as a user starts it; its output is captured as text."""
    return subprocess.run(
        [sys.executable, '-m', 'alignmix_jax.experiments.reproduce', f'--data_dir={data_dir}',
         f'--workdir={workdir}', *flags],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3'))


def make_tiny_config():
    """A seconds-long run: 64 demo training images, an eighth-width PreActResNet18."""
    config = demo.get_config()
    config.dataset.train_subset = 64
    config.model.width = 0.125
    config.train.batch_size = 16
    config.train.num_epochs = 2
    config.train.lr_decay_epochs = (1,)
    config.train.eval_batch_size = 250
    config.train.eval_every_epochs = 1
    config.train.log_every_steps = 2
    config.train.checkpoint_every_steps = 2
    return config


def fit_one_batch(step_fn, config, model, images, labels, mesh, mode: str, updates: int):
    """Trains a fresh state `updates` steps of `mode` on one batch with `step_fn` (the training
    loop's `train_step.make_train_step`), then runs step 0's draw (augmentation, permutation,
    lambda) again with the trained parameters.

    Returns the first step's metrics, those of step 0's draw again, and the parameters before
    and after training, on the host (the step donates its input state).
    """
    from alignmix_jax.runtime import sharding
    from alignmix_jax.training import train_step

    # The step donates its input state, so each call starts from a fresh one.
    initial = train_step.create_train_state(config, model, images.shape[1:], 4, mesh)
    initial_params = jax.device_get(initial.params)
    state, first_metrics = step_fn(initial, images, labels, mode=mode)
    for _ in range(updates - 1):
        state, _ = step_fn(state, images, labels, mode=mode)
    trained_params = jax.device_get(state.params)
    step_zero = jax.device_put(jnp.zeros((), jnp.int32), sharding.replicated(mesh))
    _, later_metrics = step_fn(state.replace(step=step_zero), images, labels, mode=mode)
    return first_metrics, later_metrics, initial_params, trained_params


@pytest.fixture
def tiny_config():
    return make_tiny_config()


# What the GPU machine lacks and no code path for in-memory data may import (ott-jax and
# ml-collections travel there as wheels: launch/gpu_wheels.sh).
MISSING_ON_GPU_MACHINE = ('tensorflow', 'tensorflow_datasets', 'clu', 'dm_pix')


def environment_without(folder: pathlib.Path, modules=MISSING_ON_GPU_MACHINE) -> dict:
    """os.environ for a subprocess in which importing each of `modules` fails: a package of
    that name whose import raises ImportError, in `folder`, first on PYTHONPATH."""
    for name in modules:
        package = folder / name
        package.mkdir(parents=True, exist_ok=True)
        (package / '__init__.py').write_text(
            f'raise ImportError("{name} is not installed here (blocked by the test)")\n')
    python_path = os.pathsep.join([str(folder), str(REPO_ROOT)])
    return dict(os.environ, PYTHONPATH=python_path, TF_CPP_MIN_LOG_LEVEL='3')


@functools.cache
def _demo_archive() -> dict[str, np.ndarray]:
    from alignmix_jax.data import in_memory
    with np.load(in_memory.DEMO_DATA_PATH) as archive:
        return {name: archive[name] for name in archive.files}


def demo_jpegs(split: str, class_name: str, count: int) -> list[bytes]:
    """The first `count` JPEG files of `class_name` in `split` ('train': up to 500, 'test': up
    to 100) of the embedded demo: CIFAR-10 JPEGs, stored byte for byte as the files
    0000.jpg, 0001.jpg, ... of that class in the full copy."""
    archive = _demo_archive()
    label = list(archive['class_names']).index(class_name)
    offsets = archive[f'{split}_offsets']
    indices = np.flatnonzero(archive[f'{split}_labels'] == label)[:count]
    assert len(indices) == count, f'the demo has {len(indices)} {split} images of {class_name}'
    jpeg_bytes = archive[f'{split}_jpeg_bytes']
    return [jpeg_bytes[offsets[index]:offsets[index + 1]].tobytes() for index in indices]


def write_demo_image_folder(root: pathlib.Path, per_split: dict[str, int],
                            classes=CIFAR10_CLASSES) -> pathlib.Path:
    """An image folder root/{split}/<class>/NNNN.jpg of the demo's JPEGs, `per_split[split]`
    files of each of `classes`, named as in the full copy. Returns `root`."""
    for split, count in per_split.items():
        for class_name in classes:
            class_dir = root / split / class_name
            class_dir.mkdir(parents=True)
            for index, encoded in enumerate(demo_jpegs(split, class_name, count)):
                (class_dir / f'{index:04d}.jpg').write_bytes(encoded)
    return root


def pytest_report_header(config):
    folder = os.environ.get(SHARED_DATA_VARIABLE)
    if folder:
        return f'shared-data checks: on, on {folder}'
    return (f'shared-data checks: off (deselected; {SHARED_DATA_VARIABLE}=PATH of the full '
            f'CIFAR-10 JPEG copy runs them, see docs/testing.md)')


def pytest_collection_modifyitems(config, items):
    if os.environ.get(SHARED_DATA_VARIABLE):
        return
    opt_in = [item for item in items if item.get_closest_marker('shared_data')]
    if opt_in:
        config.hook.pytest_deselected(items=opt_in)
        items[:] = [item for item in items if not item.get_closest_marker('shared_data')]


@pytest.fixture(scope='session')
def shared_cifar10() -> pathlib.Path:
    """The full CIFAR-10 JPEG copy named by ALIGNMIX_SHARED_DATA (for `shared_data` tests)."""
    folder = pathlib.Path(os.environ[SHARED_DATA_VARIABLE])
    if not (folder / 'train').is_dir() or not (folder / 'test').is_dir():
        pytest.fail(f'{SHARED_DATA_VARIABLE}={folder} has no train/ and test/ folders: name the '
                    f'full CIFAR-10 JPEG copy (e.g. ../shared/data/cifar10-jpeg) or unset it')
    return folder
