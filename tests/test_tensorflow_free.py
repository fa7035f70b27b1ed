"""Training, resuming and the benchmark on in-memory data with TensorFlow (and tfds, clu,
dm-pix) impossible to import, as on the GPU machine; PIL decodes the pixels TensorFlow did."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from alignmix_jax.data import common, in_memory
from alignmix_jax.runtime import metric_log
from tests.conftest import REPO_ROOT, environment_without, write_demo_image_folder

# The demo, as small as conftest.make_tiny_config, with two modes (fewer programs to compile).
TINY_DEMO = ['--config=configs/demo.py', '--config.dataset.train_subset=64',
             '--config.model.width=0.125', '--config.train.batch_size=16',
             '--config.train.num_epochs=2', '--config.train.lr_decay_epochs=(1,)',
             '--config.train.eval_batch_size=250', '--config.train.eval_every_epochs=1',
             '--config.train.log_every_steps=2', '--config.train.checkpoint_every_steps=2',
             "--config.mixup.modes=('input','feature')"]


def tensorflow_decode(encoded: list[bytes]) -> np.ndarray:
    """The pixels of the tf.data decoder the in-memory datasets used before PIL."""
    tf = common.import_tensorflow()
    return np.stack([common.decode_image(tf, tf.constant(data)).numpy() for data in encoded])


def assert_pil_decodes_the_files_as_tensorflow(paths: list[str]) -> None:
    encoded = [open(path, 'rb').read() for path in paths]
    decoded = common.decode_images(paths, paths, 'the JPEG files', from_files=True)
    assert decoded.shape == (len(paths), 32, 32, 3)
    np.testing.assert_array_equal(decoded, tensorflow_decode(encoded))


def test_pil_gives_tensorflows_pixels_on_jpeg_files_and_the_demo(tmp_path):
    # Files of the image-folder path: every demo training JPEG of 10 classes, 40 each.
    folder = write_demo_image_folder(tmp_path, {'train': 40})
    paths = sorted(str(path) for path in folder.glob('train/*/*.jpg'))
    assert len(paths) == 400
    assert_pil_decodes_the_files_as_tensorflow(paths)
    with np.load(in_memory.DEMO_DATA_PATH) as archive:
        jpeg_bytes, offsets = archive['test_jpeg_bytes'], archive['test_offsets']
    demo = [jpeg_bytes[start:end].tobytes()
            for start, end in zip(offsets[:-1], offsets[1:], strict=True)]
    decoded = common.decode_images(demo, [str(i) for i in range(len(demo))], 'the demo',
                                   from_files=False)
    assert decoded.shape == (1000, 32, 32, 3)
    np.testing.assert_array_equal(decoded, tensorflow_decode(demo))


@pytest.mark.shared_data
def test_pil_gives_tensorflows_pixels_across_the_full_cifar10_copy(shared_cifar10):
    # A sample over all 60,000 files, most of them beyond the demo's (the first 500 training
    # and 100 test files of each class).
    paths = sorted(str(path) for path in (shared_cifar10 / 'train').glob('*/*.jpg'))[::167]
    paths += sorted(str(path) for path in (shared_cifar10 / 'test').glob('*/*.jpg'))[::100]
    assert len(paths) == 400
    assert_pil_decodes_the_files_as_tensorflow(paths)


def run_module(module, arguments, environment):
    return subprocess.run([sys.executable, '-m', module, *arguments], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=900, env=environment)


@pytest.fixture(scope='module')
def blocked_environment(tmp_path_factory):
    environment = environment_without(tmp_path_factory.mktemp('blocked'))
    # The blocker works: TensorFlow cannot be imported in such a process.
    check = subprocess.run([sys.executable, '-c', 'import tensorflow'], env=environment,
                           cwd=REPO_ROOT, capture_output=True, text=True)
    assert check.returncode == 1 and 'blocked by the test' in check.stderr
    return environment


@pytest.mark.slow  # trains (left out by -m "not slow")
def test_demo_trains_checkpoints_and_resumes_without_tensorflow(tmp_path, blocked_environment):
    workdir = tmp_path / 'run'
    first = run_module('alignmix_jax.main', [*TINY_DEMO, f'--workdir={workdir}'],
                       blocked_environment)
    assert first.returncode == 0, first.stderr[-3000:]
    result = json.loads(first.stdout.strip().splitlines()[-1])
    assert result['steps'] == 8 and 0 <= result['final_test_accuracy'] <= 1
    checkpoints = workdir / 'checkpoints'
    assert sorted(int(path.name) for path in checkpoints.iterdir() if path.name.isdigit()) \
        == [4, 6, 8]
    records = metric_log.read_metrics(str(workdir))
    losses = [record['step'] for record in records if 'train/loss' in record]
    assert losses == [2, 4, 6, 8]
    assert [record['step'] for record in records if 'test/accuracy' in record] == [4, 8]
    assert records[-1]['test/accuracy'] == result['final_test_accuracy']
    assert [record['step'] for record in records if 'steps_per_sec' in record] == [2, 4, 6, 8]
    # A TensorBoard event file, written without TensorFlow, holds the same scalars.
    event_files = list(workdir.glob('events.out.tfevents.*'))
    assert len(event_files) == 1 and event_files[0].stat().st_size > 1000

    # As if the run had stopped after step 4: it resumes there and ends where the first did.
    shutil.rmtree(checkpoints / '6')
    shutil.rmtree(checkpoints / '8')
    (workdir / 'results.json').unlink()
    second = run_module('alignmix_jax.main', [*TINY_DEMO, f'--workdir={workdir}'],
                        blocked_environment)
    assert second.returncode == 0, second.stderr[-3000:]
    assert 'at step 4' in second.stderr and 'Resumed from' in second.stderr
    resumed = json.loads(second.stdout.strip().splitlines()[-1])
    assert resumed['final_test_accuracy'] == result['final_test_accuracy']
    assert resumed['final_test_loss'] == pytest.approx(result['final_test_loss'], rel=1e-6)
    # The record has one line per logged step: those after step 4 were dropped, then redone.
    records = metric_log.read_metrics(str(workdir))
    assert [record['step'] for record in records if 'train/loss' in record] == [2, 4, 6, 8]
    assert len(list(workdir.glob('events.out.tfevents.*'))) == 2


def test_event_file_reads_back_in_tensorboard_form(tmp_path):
    """The scalars as TensorBoard's reader (and tf.summary's form) has them."""
    from tensorboard.backend.event_processing import event_accumulator
    writer = metric_log.MetricWriter(str(tmp_path))
    writer.write_hparams({'train.learning_rate': 0.1, 'model.name': 'preact_resnet18'})
    writer.write_scalars(3, {'train/loss': 2.5, 'test/accuracy': 0.25})
    writer.write_scalars(5, {'train/loss': 1.5})
    writer.close()
    accumulator = event_accumulator.EventAccumulator(str(tmp_path), size_guidance={
        event_accumulator.TENSORS: 0})
    accumulator.Reload()
    loss = accumulator.Tensors('train/loss')
    assert [event.step for event in loss] == [3, 5]
    assert [float(np.asarray(event.tensor_proto.float_val)[0]) for event in loss] == [2.5, 1.5]
    assert accumulator.Tensors('test/accuracy')[0].tensor_proto.float_val == [0.25]
    assert [record['step'] for record in metric_log.read_metrics(str(tmp_path))] == [3, 5]


@pytest.mark.slow  # trains (left out by -m "not slow")
def test_bench_runs_without_tensorflow(blocked_environment):
    result = run_module('alignmix_jax.experiments.bench', [
        '--config=configs/demo.py', '--config.dataset.train_subset=64',
        '--config.model.width=0.0625', '--config.train.batch_size=8',
        "--config.mixup.modes=('feature',)", '--steps=1', '--warmup=1',
        '--input_batches=4'], blocked_environment)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert list(figures['step_ms']) == ['feature'] and figures['step_ms']['feature'] > 0
    assert figures['alignment_ms'] > 0 and figures['input_images_per_second'] > 0


@pytest.mark.slow  # trains (left out by -m "not slow")
def test_a_tensorflow_dataset_without_tensorflow_is_one_error_line(tmp_path, blocked_environment):
    result = run_module('alignmix_jax.main', [
        '--config=configs/cifar10.py', f'--workdir={tmp_path}',
        f'--config.dataset.data_dir={tmp_path}'], blocked_environment)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        'error: this dataset is read with TensorFlow (tf.data, tfds), which cannot be imported '
        '(ImportError: tensorflow is not installed here (blocked by the test)): '
        f'{common.TENSORFLOW_PIN}; the demo and local image folders need no TensorFlow')
