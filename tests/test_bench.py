"""The benchmark command on a tiny config: it runs, and its last lines are the JSON it promises;
`--torch` times torch_reference's step beside ours; `--dtypes` measures each dtype in turn."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import REPO_ROOT

# Slow (left out by -m "not slow"): runs the benchmark command, with PyTorch beside it.
pytestmark = pytest.mark.slow

# The subprocesses share the tests' compilation cache: conftest.py puts it in os.environ.
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
# The smallest network: a sixteenth-width PreActResNet18 (4 to 32 channels), batch 8.
TINY = ['--config=configs/demo.py', '--config.dataset.train_subset=64',
        '--config.model.width=0.0625', '--config.train.batch_size=8', '--steps=1',
        '--warmup=1', '--input_batches=4']


def run_bench(arguments, env=ENV):
    return subprocess.run([sys.executable, '-m', 'alignmix_jax.experiments.bench', *arguments],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=900, env=env)


def json_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith('{')]


def test_bench_command_prints_a_table_and_a_json_last_line():
    command = ['--config=configs/demo.py', '--config.dataset.train_subset=64',
               '--config.model.width=0.125', '--config.train.batch_size=16',
               "--config.mixup.modes=('input','feature')", '--steps=2', '--warmup=1',
               '--input_batches=8']
    result = run_bench(command)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[1].split() == ['what', 'median', 'ms', 'x', 'input', 'step', 'images/s',
                                'align', 'share', 'peak', 'MiB']
    figures = json.loads(lines[-1])
    assert sorted(figures['step_ms']) == ['feature', 'input']
    assert all(ms > 0 for ms in figures['step_ms'].values())
    assert figures['step_ratio_to_input']['input'] == 1.0
    assert figures['step_ratio_to_input']['feature'] == (figures['step_ms']['feature']
                                                         / figures['step_ms']['input'])
    # F of an eighth-width PreActResNet18 on 32x32 images: A is 4x4 with 64 channels.
    assert figures['feature_shape'] == [16, 4, 4, 64]
    assert figures['alignment_ms'] > 0 and figures['input_images_per_second'] > 0
    assert figures['batch_size'] == 16 and figures['devices'] == 1
    # train/alignment_effect's measurement runs inside the feature step: a part of its time.
    assert 0 < figures['alignment_effect_ms'] < figures['step_ms']['feature']
    assert figures['alignment_effect_share'] == (figures['alignment_effect_ms']
                                                 / figures['step_ms']['feature'])
    for mode, ms in figures['step_ms'].items():
        assert figures['images_per_second'][mode] == 16 / (ms / 1000)
    # The alignment's share of a step, for the feature modes only.
    assert figures['alignment_share'] == {
        'feature': figures['alignment_ms'] / figures['step_ms']['feature']}
    # JAX's CPU backend reports no memory figures ('-' in the table); a GPU's would be bytes.
    assert all(value is None or value > 0 for value in figures['peak_bytes'].values())
    assert sorted(figures['peak_bytes']) == ['feature', 'input']
    assert 'torch_step_ms' not in figures


@pytest.fixture(scope='module')
def torch_and_dtypes_run():
    """One run of both options: torch beside ours, in float32 and then bfloat16."""
    pytest.importorskip('torch', reason='--torch runs the PyTorch transcription')
    result = run_bench([*TINY, '--torch', '--dtypes=float32,bfloat16'])
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_torch_option_times_both_sides_for_each_mode(torch_and_dtypes_run):
    import torch
    for figures in json_lines(torch_and_dtypes_run):
        # Exactly the three modes torch_reference runs as the public code, whatever the
        # config lists (the demo's are input, embedding, feature, feature_prime).
        assert list(figures['step_ms']) == ['none', 'input', 'feature']
        assert list(figures['torch_step_ms']) == ['none', 'input', 'feature']
        for mode, torch_ms in figures['torch_step_ms'].items():
            assert torch_ms > 0
            assert figures['ratio_to_torch'][mode] == figures['step_ms'][mode] / torch_ms
        assert figures['torch']['threads'] == torch.get_num_threads()
        assert figures['torch']['dtype'] == 'float32'
        # Our side was set to the public head and Sinkhorn loop, and says so.
        overrides = ' '.join(figures['torch']['overrides'])
        assert 'model.head_norm=False' in overrides and "mixup.sinkhorn='public'" in overrides
        iterations = figures['sinkhorn_iterations']['feature']
        assert 1 <= iterations['ours'] <= 100 and 1 <= iterations['torch'] <= 100
    assert 'torch.get_num_threads() = ' in torch_and_dtypes_run
    assert "torch's Sinkhorn reads its stopping test back to the host" in torch_and_dtypes_run


def test_dtypes_option_measures_each_dtype(torch_and_dtypes_run):
    runs = json_lines(torch_and_dtypes_run)
    assert [figures['dtype'] for figures in runs] == ['float32', 'bfloat16']
    for figures in runs:
        assert all(ms > 0 for ms in figures['step_ms'].values())
        assert figures['feature_shape'] == [8, 4, 4, 32]
    # The side-by-side table: one line per mode and dtype.
    table = torch_and_dtypes_run.split('by dtype\n', 1)[1].splitlines()
    assert table[0].split()[:3] == ['mode', 'dtype', 'step']
    assert [line.split()[:2] for line in table[1:7]] == [
        [mode, dtype] for mode in ('none', 'input', 'feature')
        for dtype in ('float32', 'bfloat16')]


def test_torch_option_without_torch_is_one_error_line(tmp_path):
    # A `torch` module that fails to import stands in for a missing PyTorch.
    (tmp_path / 'torch.py').write_text("raise ImportError('no torch here')\n")
    result = run_bench([*TINY, '--torch'],
                       env=dict(ENV, PYTHONPATH=f'{tmp_path}{os.pathsep}{REPO_ROOT}'))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith('error: --torch ')
    assert 'pip install torch==2.13.0' in result.stderr


@pytest.mark.parametrize('mode', ['none', 'input', 'feature'])
def test_timed_torch_step_computes_our_loss(mode):
    """The setup --torch times (our step under bench_torch.torch_comparison_config,
    loaded with our initial weights) gives the same loss on the same batch and draws.
    tests/test_step_parity.py checks gradients, parameters and statistics of such steps; this
    checks that the bench's overrides of a config (the demo's, sixteenth width) get there."""
    torch = pytest.importorskip('torch', reason='the torch side of the benchmark')
    from alignmix_jax.data import augmentation
    from alignmix_jax.method import mixup
    from alignmix_jax.models import build_model
    from alignmix_jax.pytorch import bench_torch
    from alignmix_jax.runtime import sharding
    from alignmix_jax.training import train_step
    from configs import demo

    config = demo.get_config()
    config.model.width = 0.0625
    config, _ = bench_torch.torch_comparison_config(config)
    batch = 8
    model = build_model(config.model, 10)
    mesh = sharding.make_mesh(jax.devices()[:1])
    state = train_step.create_train_state(config, model, (32, 32, 3), 10, mesh)
    torch_step = bench_torch.make_torch_step(
        config, jax.device_get({'params': state.params, 'batch_stats': state.batch_stats}), 10)
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, batch).astype(np.int32)
    # The draws our step makes on device 0 (as test_step_parity.test_real_step_matches_pytorch).
    augment_key, pairing_key = jax.random.split(
        jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 0))
    images = augmentation.normalize(augmentation.augment(augment_key, jnp.asarray(raw)),
                                    config.dataset.mean, config.dataset.std)
    permutation, lam = mixup.sample_pairing(pairing_key, batch, config.mixup.alpha)
    from alignmix_jax.pytorch import torch_reference
    expected = torch_step(torch_reference.to_torch_images(images),
                          torch.from_numpy(labels.astype(np.int64)),
                          torch.from_numpy(np.asarray(permutation).astype(np.int64)),
                          float(lam), mode)
    step_fn = train_step.make_train_step(model, config, mesh)
    _, metrics = step_fn(state, *sharding.global_batch((raw, labels), mesh), mode=mode)
    np.testing.assert_allclose(float(metrics['loss']), expected['loss'], rtol=1e-5)
    if mode == 'feature':
        assert float(metrics['sinkhorn_iterations']) == expected['iterations']


def test_torch_settings_and_the_gpu_style_step_on_the_cpu():
    """The step --torch times on a GPU (bfloat16 autocast, channels-last, float32 Sinkhorn),
    run here on the CPU: the loss of the float32 step to bfloat16 precision, the same
    Sinkhorn iterations."""
    torch = pytest.importorskip('torch', reason='the torch side of the benchmark')
    from alignmix_jax.models import build_model
    from alignmix_jax.pytorch import bench_torch, torch_reference
    from configs import demo

    assert bench_torch.torch_settings('cuda', 'bfloat16') == {
        'device': 'cuda', 'autocast_bfloat16': True, 'channels_last': True,
        'cudnn_benchmark': True}
    assert bench_torch.torch_settings('cuda', 'float32')['autocast_bfloat16'] is False
    assert bench_torch.torch_settings('cpu', 'bfloat16') == {
        'device': 'cpu', 'autocast_bfloat16': False, 'channels_last': False,
        'cudnn_benchmark': False}
    assert bench_torch.torch_device('cpu') == 'cpu'

    config = demo.get_config()
    config.model.width = 0.0625
    config, _ = bench_torch.torch_comparison_config(config)
    model = build_model(config.model, 10)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
    rng = np.random.default_rng(0)
    images = torch_reference.to_torch_images(rng.normal(size=(8, 32, 32, 3)))
    labels = torch.from_numpy(rng.integers(0, 10, 8))
    permutation = torch.from_numpy(rng.permutation(8))
    losses, iterations = {}, {}
    for gpu_style in (False, True):
        step = bench_torch.make_torch_step(config, jax.device_get(variables), 10,
                                           autocast_bfloat16=gpu_style, channels_last=gpu_style)
        batch = images.to(memory_format=torch.channels_last) if gpu_style else images
        result = step(batch, labels, permutation, 0.3, 'feature')
        losses[gpu_style], iterations[gpu_style] = result['loss'], result['iterations']
    assert losses[True] == pytest.approx(losses[False], rel=3e-2)
    assert losses[True] != losses[False]  # bfloat16 arithmetic did run
    assert iterations[True] == iterations[False]
