"""WSOL end to end: train on a generated CUB-layout set and evaluate through the real commands;
and the evaluator's parts (CAMs of real models, the order of the gathered examples)."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from alignmix_jax import data
from alignmix_jax.evaluation import cam_localization
from alignmix_jax.evaluation import localization as localization_eval
from alignmix_jax.models import build_model
from configs import default
from tests import cub_fixture
from tests.conftest import REPO_ROOT, init_key

# Slow (left out by -m "not slow"): trains on a generated CUB set and runs the localization command.
pytestmark = pytest.mark.slow

# A 1/16-width ResNet-50 at 64x64 with the WSOL stride-1 last stage (4x4 maps), two epochs of
# aligned feature mixup (one mode: one compiled step).
OVERRIDES = (
    '--config.dataset.image_size=64', '--config.dataset.train_resize=72',
    '--config.model.width=0.0625', '--config.train.batch_size=6', '--config.train.num_epochs=2',
    '--config.train.lr_decay_epochs=(1,)', '--config.train.eval_batch_size=8',
    '--config.train.eval_every_epochs=1', '--config.train.log_every_steps=1',
    '--config.train.checkpoint_every_steps=3', "--config.mixup.modes=('feature',)")


def run(module, *args):
    result = subprocess.run([sys.executable, '-m', module, *args], capture_output=True,
                            text=True, cwd=REPO_ROOT, timeout=900)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    return result


def test_train_then_localization_command(tmp_path):
    data_dir, workdir = tmp_path / 'data', tmp_path / 'run'
    records = cub_fixture.write_archive(data_dir, images_per_class=10, test_per_class=4)
    common = ('--config=configs/cub_resnet50.py', f'--workdir={workdir}',
              f'--config.dataset.data_dir={data_dir}', *OVERRIDES)
    run('alignmix_jax.main', *common)
    result = run('alignmix_jax.evaluation.localization', *common)
    assert 'MaxBoxAcc-v2 (%)' in result.stdout and 'top-1 localization (%)' in result.stdout
    with open(workdir / 'eval' / 'localization.json') as json_file:
        record = json.load(json_file)
    assert record['kind'] == 'localization' and record['step'] == 6  # 18 images / 6, 2 epochs
    results = record['results']
    assert results['num_images'] == sum(not r[1] for r in records.values()) == 12
    fractions = ('top1_localization', 'gt_known_localization', 'top1_classification',
                 'max_box_acc_v2', 'max_box_acc_iou0.3', 'max_box_acc_iou0.5',
                 'max_box_acc_iou0.7')
    for name in fractions:
        # Fractions of the 12 images (MaxBoxAcc-v2: a mean of three of them).
        count = results[name] * (36 if name == 'max_box_acc_v2' else 12)
        assert 0.0 <= results[name] <= 1.0 and abs(count - round(count)) < 1e-9, name
    assert results['max_box_acc_iou0.3'] >= results['max_box_acc_iou0.5'] \
        >= results['max_box_acc_iou0.7']
    assert results['max_box_acc_v2'] == pytest.approx(np.mean(
        [results[f'max_box_acc_iou{level}'] for level in (0.3, 0.5, 0.7)]))
    assert results['top1_localization'] <= min(results['gt_known_localization'],
                                               results['top1_classification'])
    assert results['cam_threshold'] == 0.15


@pytest.mark.parametrize('head_norm,embedding_dim', [(False, 0), (True, 0), (False, 16)])
def test_cams_average_to_the_logits(head_norm, embedding_dim):
    """Zhou et al. (2016): the spatial mean of M_c is the logit of c less its bias (the head is
    pooling then linear maps), for each head variant the evaluator accepts."""
    config = default.get_config().model
    config.update(name='preact_resnet18', width=0.125, head_norm=head_norm,
                  embedding_dim=embedding_dim)
    model = build_model(config, num_classes=5)
    images = jax.random.normal(jax.random.PRNGKey(0), (3, 32, 32, 3))
    variables = model.init(init_key(0), images, train=False)
    if head_norm:  # non-trivial running statistics
        variables = jax.tree.map(lambda x: x, variables)
        stats = variables['batch_stats']['head_norm']
        stats['mean'] = stats['mean'] + 0.3
        stats['var'] = stats['var'] * 2.0
    features, logits = model.apply(variables, images, method=localization_eval._maps_and_logits)
    params = variables['params']
    bias = params['classifier']['bias']
    if embedding_dim:
        bias = params['embedding']['bias'] @ params['classifier']['kernel'] + bias
    for cls in range(5):
        maps = cam_localization.class_activation_maps(
            features, localization_eval.cam_weights(params), jnp.full((3,), cls))
        np.testing.assert_allclose(np.asarray(maps.mean(axis=(1, 2))) + bias[cls],
                                   logits[:, cls], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('num_examples,batch_size,process_count',
                         [(12, 8, 1), (13, 4, 2), (10, 6, 3), (2, 4, 4)])
def test_evaluation_order_follows_the_gathered_batches(num_examples, batch_size,
                                                       process_count):
    split = data.Split(images=np.zeros((num_examples, 1, 1, 3), np.uint8),
                                 labels=np.arange(num_examples, dtype=np.int32))
    per_process = [list(data.eval_batches(split, batch_size, process_index=p,
                                                    process_count=process_count))
                   for p in range(process_count)]
    gathered = []
    for batches in zip(*per_process, strict=True):  # one global batch: process after process
        for _, labels, mask in batches:
            gathered.extend(labels[mask])
    order = localization_eval.evaluation_order(num_examples, batch_size, process_count)
    np.testing.assert_array_equal(order, gathered)
    assert sorted(order) == list(range(num_examples))


def test_a_dataset_without_boxes_is_refused():
    context = ConfigDict()
    context.dataset = object()
    with pytest.raises(ValueError, match='test boxes'):
        localization_eval.Evaluator(context)
