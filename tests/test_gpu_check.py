"""The GPU check rehearsed on this CPU at its tiny size, with TensorFlow, tfds, clu and dm-pix
impossible to import (the GPU machine has none of them): every step runs, and the summary
holds the figures the GPU run is read for."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT, environment_without

# Slow (left out by -m "not slow"): runs the GPU check at its tiny size.
pytestmark = pytest.mark.slow

MODES = ['none', 'input', 'feature']


@pytest.fixture(scope='module')
def tiny_check(tmp_path_factory):
    out = tmp_path_factory.mktemp('out')
    environment = environment_without(tmp_path_factory.mktemp('blocked'))
    environment.update(OUT=str(out), PYTHON=sys.executable)
    result = subprocess.run(['bash', 'launch/gpu_check.sh', '--tiny'], cwd=REPO_ROOT,
                            env=environment, capture_output=True, text=True, timeout=3000)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return json.loads((out / 'summary.json').read_text()), (out / 'log.txt').read_text()


def test_the_tiny_check_runs_every_step(tiny_check):
    summary, log = tiny_check
    assert 'errors' not in summary, summary['errors']
    assert summary['tiny'] and summary['bench_batches'] == [8, 16]
    environment = summary['environment']
    assert environment['jax_backend'] == 'cpu'
    # Every module the runs import, imported on its own (TensorFlow's absence is no failure).
    assert set(environment['imports'].values()) == {'ok'}, environment['imports']
    assert {'jax', 'jaxlib', 'flax', 'ott-jax', 'ml-collections', 'torch'} \
        <= set(environment['versions'])
    assert summary['data']['images'] == {'train': 80, 'test': 40}
    for batch in (8, 16):
        bench = summary[f'bench_batch{batch}']
        assert sorted(bench) == ['bfloat16', 'float32']
        for dtype, figures in bench.items():
            assert figures['dtype'] == dtype and figures['batch_size'] == batch
            assert figures['width'] == 0.0625
            assert list(figures['step_ms']) == MODES == list(figures['torch_step_ms'])
            assert list(figures['first_step_ms']) == MODES
            assert all(figures['first_step_ms'][mode] > figures['step_ms'][mode]
                       for mode in MODES)  # the first step compiles
            assert list(figures['alignment_share']) == ['feature']
            assert figures['torch']['device'] == 'cpu'
            assert figures['input_images_per_second'] > 0
    training = summary['training']
    assert training['epochs'] == summary['training_plan']['epochs'] == 1
    assert training['dtype'] == 'bfloat16' and training['train_images'] == 80
    assert list(training['runs']) == ['baseline', 'input_mixup', 'alignmix']
    for run in training['runs'].values():
        assert run['steps'] == 5  # 80 images, batches of 16, one epoch
        assert 0 <= run['final_test_accuracy'] <= 1 and run['steps_per_sec'] > 0
        assert run['images_per_sec'] == pytest.approx(16 * run['steps_per_sec'])
    assert training['runs']['alignmix']['modes'] == ['input', 'embedding', 'feature',
                                                     'feature_prime']
    # The targets, computed from the figures above.
    targets = summary['targets']
    small, large = summary['bench_batch8'], summary['bench_batch16']
    for dtype in ('float32', 'bfloat16'):
        ratio = small[dtype]['step_ms']['feature'] / small[dtype]['step_ms']['input']
        assert targets[f'feature_over_input_b8_{dtype}'] == {
            'value': ratio, 'max': 1.05, 'met': ratio <= 1.05}
        for batch, bench in ((8, small), (16, large)):
            for mode in MODES:
                assert targets[f'ours_over_torch_b{batch}_{dtype}_{mode}']['value'] == \
                    bench[dtype]['ratio_to_torch'][mode]
    for mode in MODES:
        speedup = (large['bfloat16']['images_per_second'][mode]
                   / large['float32']['images_per_second'][mode])
        assert targets[f'bfloat16_over_float32_b16_{mode}']['value'] == speedup
    pipeline = training['input_images_per_sec']
    assert pipeline > 0
    assert targets['pipeline_over_training_alignmix']['value'] == pytest.approx(
        pipeline / training['runs']['alignmix']['images_per_sec'])
    # The log ends with the table a `run` call returns.
    assert 'target pipeline_over_training_alignmix' in log.splitlines()[-1]
    assert any(line.split()[:3] == ['b16', 'bfloat16', 'feature'] for line in log.splitlines())
