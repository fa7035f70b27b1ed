"""The benchmark command on a tiny config: it runs, and its last line is the JSON it promises."""

import json
import os
import subprocess
import sys

from tests.conftest import REPO_ROOT


def test_bench_command_prints_a_table_and_a_json_last_line():
    command = [sys.executable, '-m', 'alignmix_jax.bench', '--config=configs/demo.py',
               '--config.dataset.train_subset=64', '--config.model.width=0.125',
               '--config.train.batch_size=16', "--config.mixup.modes=('input','feature')",
               '--steps=2', '--warmup=1', '--input_batches=8']
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3'))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[1].split() == ['what', 'median', 'ms', 'x', 'input', 'step']
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
