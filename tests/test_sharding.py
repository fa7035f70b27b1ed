"""Data parallelism: the sharded step on 8 fake devices, and runs over several processes."""

import json
import math
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

# Slow (left out by -m "not slow"): trains on 8 devices and in two processes.
pytestmark = pytest.mark.slow


def run_python(*args, env=None, timeout=900):
    environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3', **(env or {}))
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout, env=environment)


def test_sharded_step_equals_the_per_shard_computation_on_8_devices():
    result = run_python('tests/sharded_step_check.py')
    assert result.returncode == 0, result.stderr[-3000:]
    differences = json.loads(result.stdout.strip().splitlines()[-1])
    sync_batch_norm = differences.pop('sync_batch_norm')
    assert sorted(differences) == sorted(('input', 'embedding', 'feature', 'feature_prime',
                                          'none', 'cutmix', 'hidden2'))
    for mode, difference in differences.items():
        # The same float32 arithmetic per shard; only the 8-way mean of the gradients is summed
        # in another order (a cross-device reduction vs numpy), which moves a parameter by a
        # few ulps of the gradient times the learning rate: ~1e-8, against a step of ~1e-2.
        assert difference['params'] < 1e-6, (mode, difference)
        assert difference['batch_stats'] < 1e-6, (mode, difference)
        assert difference['param_change'] > 1e-3, (mode, difference)

    # model.sync_batch_norm: BatchNorm over 8 slices of 4 normalises exactly as over the whole
    # batch of 32 (up to the order of float32 sums); per-device BatchNorm does not.
    assert sync_batch_norm['synced']['logits'] < 1e-4, sync_batch_norm
    assert sync_batch_norm['synced']['batch_stats'] < 1e-5, sync_batch_norm
    assert sync_batch_norm['per_device']['logits'] > 1e-2, sync_batch_norm
    assert sync_batch_norm['per_device']['batch_stats'] > 1e-3, sync_batch_norm


def demo_run_args(workdir, num_epochs):
    # Two of the demo's modes: each one drawn is compiled in every process (and again for
    # one device when resuming); with seed 0, steps 1-8 draw both (feature at step 5), so the
    # processes must agree on a mode that changes from step to step; steps 9-12 draw both too.
    # -v 0: absl's log on the terminal, every process's, with each step's metrics.
    return ['--config=configs/demo.py', f'--workdir={workdir}', '-v', '0',
            '--config.dataset.train_subset=64', '--config.model.width=0.125',
            '--config.train.batch_size=16', f'--config.train.num_epochs={num_epochs}',
            '--config.train.lr_decay_epochs=()', '--config.train.eval_batch_size=250',
            '--config.train.eval_every_epochs=1', '--config.train.log_every_steps=1',
            "--config.mixup.modes=('input','feature')"]


def logged_losses(output: str) -> dict[int, float]:
    """{step: loss} from absl's lines '...] [step] train/accuracy=..., train/loss=...'."""
    pattern = re.compile(r'\] \[(\d+)\] train/.*train/loss=([^,\s]+)')
    return {int(match[1]): float(match[2]) for match in pattern.finditer(output)}


def feature_steps(output: str) -> set[int]:
    """The steps that drew the feature mode (one step per line: its fraction is 1)."""
    pattern = re.compile(r'\] \[(\d+)\] train/.*train/mode_fraction/feature=1\b')
    return {int(match[1]) for match in pattern.finditer(output)}


def read_results(workdir):
    with open(os.path.join(workdir, 'results.json')) as results_file:
        return json.load(results_file)


def test_two_processes_train_and_one_process_resumes_their_checkpoint(tmp_path):
    workdir = str(tmp_path / 'run')
    two = run_python('launch/local.py', '--num_processes=2', '--',
                     *demo_run_args(workdir, num_epochs=2))
    assert two.returncode == 0, two.stdout[-3000:]
    assert 'Process 1 of 2; 2 devices in all' in two.stdout
    two_process_results = read_results(workdir)
    two_process_losses = logged_losses(two.stdout)
    assert sorted(two_process_losses) == list(range(1, 9))
    assert feature_steps(two.stdout) == {5}

    # The same checkpoint evaluated by one process on one device: every test image counted
    # once either way, so the accuracy is identical (the loss differs only by summation order).
    evaluated = run_python('-m', 'alignmix_jax.main', *demo_run_args(workdir, num_epochs=2))
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    single_process_results = read_results(workdir)
    assert (single_process_results['final_test_accuracy']
            == two_process_results['final_test_accuracy'])
    assert abs(single_process_results['final_test_loss']
               - two_process_results['final_test_loss']) < 1e-5

    # One process continues the two-process run: steps 9.. follow on from step 8.
    resumed = run_python('-m', 'alignmix_jax.main', *demo_run_args(workdir, num_epochs=3))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert 'Resumed from' in resumed.stderr and 'at step 8.' in resumed.stderr
    resumed_losses = logged_losses(resumed.stderr)
    assert sorted(resumed_losses) == list(range(9, 13))
    assert feature_steps(resumed.stderr) == {10, 12}
    assert all(math.isfinite(loss) for loss in [*two_process_losses.values(),
                                                 *resumed_losses.values()])


def test_prefetch_to_mesh_yields_the_same_batches_reading_two_ahead():
    import numpy as np  # this module's other tests run JAX in subprocesses only

    from alignmix_jax.runtime import sharding

    mesh = sharding.make_mesh()
    host = [(np.full((4, 2), k, np.float32), np.arange(4) + k) for k in range(5)]
    read = []

    def batches():
        for k, batch in enumerate(host):
            read.append(k)
            yield batch

    prefetched = sharding.prefetch_to_mesh(batches(), mesh, size=2)
    first = next(prefetched)
    assert read == [0, 1, 2]  # the current batch and the two after it are on the devices
    got = [first, *prefetched]
    assert len(got) == 5 and read == [0, 1, 2, 3, 4]
    for (images, labels), (host_images, host_labels) in zip(got, host, strict=True):
        assert images.sharding == sharding.batch_sharded(mesh)
        np.testing.assert_array_equal(np.asarray(images), host_images)
        np.testing.assert_array_equal(np.asarray(labels), host_labels)
