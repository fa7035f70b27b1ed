"""The comparison methods of Table 1: baseline, CutMix, manifold mixup, as modes of one step."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from alignmix_jax import data
from alignmix_jax.experiments import reproduction_runs
from alignmix_jax.method import mixup
from alignmix_jax.models import Classifier, build_model
from alignmix_jax.runtime import sharding
from alignmix_jax.training import mode_forward, train, train_step
from configs import cifar10, methods, mini_reproduction
from tests.conftest import fit_one_batch, init_key, make_tiny_config, run_reproduce

HEIGHT, WIDTH = 32, 32


def distinct_images(batch_size=4):
    """Images whose pixels all differ from every other image's: a pasted pixel is visible."""
    values = jnp.arange(batch_size, dtype=jnp.float32)[:, None, None, None]
    return jnp.broadcast_to(values, (batch_size, HEIGHT, WIDTH, 3))


@pytest.mark.parametrize('lam', [0.0, 0.1, 0.37, 0.5, 0.81, 0.99, 1.0])
def test_cutmix_pasted_area_is_the_label_weight(lam):
    images = distinct_images()
    permutation = jnp.array([1, 2, 3, 0])
    clipped = 0
    for seed in range(40):
        mixed, kept_share = mixup.cutmix(jax.random.PRNGKey(seed), images, permutation, lam)
        pasted = np.asarray(mixed != images)[..., 0]  # (b, h, w)
        # The partner's own pixels, in one box that is the same for every example.
        np.testing.assert_array_equal(np.asarray(mixed)[pasted],
                                      np.asarray(images[permutation])[pasted])
        assert (pasted == pasted[0]).all()
        rows, columns = np.flatnonzero(pasted[0].any(1)), np.flatnonzero(pasted[0].any(0))
        area = int(pasted[0].sum())
        if area:
            assert area == len(rows) * len(columns)  # a rectangle
            assert np.array_equal(rows, np.arange(rows[0], rows[-1] + 1))
        # The label weight of x' is exactly the pasted share of the image...
        assert float(1 - kept_share) == pytest.approx(area / (HEIGHT * WIDTH), abs=1e-7)
        # ... and, unless the border cut the box, (1 - lambda) of it within one pixel row.
        box_side = round(HEIGHT * np.sqrt(1 - lam))
        if area == box_side * box_side:
            assert abs(area - (1 - lam) * HEIGHT * WIDTH) <= WIDTH
        else:
            clipped += 1
            assert area < box_side * box_side
    if 0 < lam < 1:
        assert clipped > 0  # the border case was exercised


def test_cutmix_is_traceable_and_reproducible():
    images = distinct_images()
    permutation = jnp.array([3, 2, 1, 0])
    jitted = jax.jit(mixup.cutmix)
    first = jitted(jax.random.PRNGKey(5), images, permutation, jnp.float32(0.4))
    again = mixup.cutmix(jax.random.PRNGKey(5), images, permutation, 0.4)
    np.testing.assert_array_equal(first[0], again[0])
    assert float(first[1]) == float(again[1])


@pytest.fixture(scope='module')
def tiny_model_and_batch():
    model = Classifier(num_classes=10, width=0.125)
    images = jax.random.normal(jax.random.PRNGKey(0), (8, HEIGHT, WIDTH, 3))
    variables = model.init(init_key(1), images, train=False)
    labels = jnp.array([0, 1, 2, 3, 4, 5, 6, 7])
    return model, variables, images, jax.nn.one_hot(labels, 10)


def clean_forward(model, variables, images):
    return model.apply(variables, images, train=True, mutable=['batch_stats'])


def forward(mode, model, variables, images, one_hot, lam=0.3):
    config = make_tiny_config().mixup
    permutation = jnp.array([7, 0, 1, 2, 3, 4, 5, 6])
    return mode_forward.mixed_forward(mode, model, variables['params'], variables['batch_stats'],
                                images, one_hot, permutation, jnp.float32(lam), config,
                                jax.random.PRNGKey(3))


def test_baseline_mode_leaves_inputs_and_labels_untouched(tiny_model_and_batch):
    model, variables, images, one_hot = tiny_model_and_batch
    clean = forward('none', model, variables, images, one_hot)
    np.testing.assert_array_equal(clean.targets, one_hot)  # hard labels, not mixed
    assert clean.plan is None and clean.lam is None
    clean_logits, clean_updates = clean_forward(model, variables, images)
    np.testing.assert_allclose(clean.logits, clean_logits, rtol=1e-5, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 clean.batch_stats, clean_updates['batch_stats'])
    # Any mixing mode would change the logits of the same batch.
    mixed_logits = forward('input', model, variables, images, one_hot).logits
    assert float(jnp.max(jnp.abs(mixed_logits - clean_logits))) > 1e-3


def stage_of(path) -> int:
    """The encoder stage a BatchNorm statistic belongs to (0: the stem; 5: f's head)."""
    names = [getattr(key, 'key', '') for key in path]
    if names[0] != 'encoder':
        return 5
    block = names[1]
    return 0 if block == 'stem_norm' else int(block[len('stage')])


@pytest.mark.parametrize('level', [1, 2, 3])
def test_manifold_mixup_mixes_at_the_chosen_stage_only(tiny_model_and_batch, level):
    model, variables, images, one_hot = tiny_model_and_batch
    lam = 0.3
    mixed = forward(f'hidden{level}', model, variables, images, one_hot, lam)
    logits, targets, batch_stats, used_lam = (mixed.logits, mixed.targets, mixed.batch_stats,
                                              mixed.lam)
    permutation = jnp.array([7, 0, 1, 2, 3, 4, 5, 6])
    np.testing.assert_allclose(targets, lam * one_hot + (1 - lam) * one_hot[permutation],
                               rtol=1e-6)
    assert float(used_lam) == pytest.approx(lam)
    # Reference: the output of stage `level` of the clean batch, read from a full forward
    # pass, mixed, then the rest of the network.
    _, clean_updates = model.apply(
        variables, images, train=True, mutable=['batch_stats', 'intermediates'],
        capture_intermediates=lambda module, _: module.name == f'stage{level}_block2')
    hidden = clean_updates['intermediates']['encoder'][f'stage{level}_block2']['__call__'][0]
    mixed_hidden = lam * hidden + (1 - lam) * hidden[permutation]
    after = {'params': variables['params'], 'batch_stats': clean_updates['batch_stats']}
    features, updates = model.apply(after, mixed_hidden, train=True, method='features',
                                    start=level, mutable=['batch_stats'])
    after['batch_stats'] = updates['batch_stats']
    embedding, updates = model.apply(after, features, train=True, method='embed',
                                     mutable=['batch_stats'])
    expected_logits = model.apply(after, embedding, method='classify')
    np.testing.assert_allclose(logits, expected_logits, rtol=1e-4, atol=1e-5)
    # Stages up to `level` saw the clean batch, the later ones the mixed one. (Mixing with a
    # permutation of the batch keeps the batch mean of the first later layer's input, so the
    # variances tell.)
    clean_stats = dict(jax.tree_util.tree_leaves_with_path(clean_updates['batch_stats']))
    for path, value in jax.tree_util.tree_leaves_with_path(batch_stats):
        if stage_of(path) <= level:
            np.testing.assert_allclose(value, clean_stats[path], rtol=1e-5, atol=1e-7)
        elif getattr(path[-1], 'key', '') == 'var':
            assert float(jnp.max(jnp.abs(value - clean_stats[path]))) > 1e-6, path


@pytest.mark.parametrize('name, stages, size', [('wide_resnet16_8', 3, 32), ('resnet50', 4, 64)])
def test_other_encoders_split_at_their_stages(name, stages, size):
    model = Classifier(num_classes=10, width=0.0625, encoder_name=name,
                       use_head_norm=name != 'resnet50')
    images = jax.random.normal(jax.random.PRNGKey(0), (2, size, size, 3))
    variables = model.init(init_key(2), images, train=False)
    features = model.apply(variables, images, train=False, method='features')
    for level in range(1, stages):
        hidden = model.apply(variables, images, train=False, method='features', stop=level)
        rest = model.apply(variables, hidden, train=False, method='features', start=level)
        np.testing.assert_allclose(rest, features, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=f'0 <= start <= stop <= {stages}'):
        model.apply(variables, images, train=False, method='features', stop=stages + 1)


def test_modes_are_validated_against_the_encoder():
    assert mixup.validate_modes(('none', 'cutmix', 'hidden3')) == ('none', 'cutmix', 'hidden3')
    with pytest.raises(ValueError, match=r"'hidden3' needs an encoder with more than 3 stages; "
                                         r"this one has 3 \(hidden modes: \('hidden1', "
                                         r"'hidden2'\)\)"):
        mixup.validate_modes(('input', 'hidden3'), encoder_stages=3)
    with pytest.raises(ValueError, match=r"list of \(.*'cutmix'.*\); got \('puzzlemix',\)"):
        mixup.validate_modes(('puzzlemix',))
    config = make_tiny_config()
    config.model.name = 'vgg16_gap'
    config.mixup.modes = ('hidden1',)
    with pytest.raises(ValueError, match='has 1 '):
        train.training_modes(config)


@pytest.mark.slow  # compiles or trains for many seconds (see docs/testing.md)
def test_each_baseline_mode_trains_through_the_step_and_compiles_once():
    config = make_tiny_config()
    dataset = data.load_dataset(config.dataset)
    model = build_model(config.model, dataset.num_classes)
    images, labels = dataset.train.images[:16], dataset.train.labels[:16]
    mesh = sharding.make_mesh()
    step_fn = train_step.make_train_step(model, config, mesh)
    modes = ('none', 'cutmix', 'hidden1', 'hidden2')
    for mode in modes:
        first_metrics, later_metrics, _, _ = fit_one_batch(step_fn, config, model, images,
                                                           labels, mesh, mode, updates=6)
        assert float(later_metrics['loss']) < 0.9 * float(first_metrics['loss']), mode
        assert ('lambda' in first_metrics) == (mode != 'none')
        assert 'marginal_error' not in first_metrics
    assert step_fn._cache_size() == len(modes)


def test_methods_are_config_overrides():
    config = methods.apply_method(make_tiny_config(), 'manifold_mixup')
    assert config.mixup.modes == ('input', 'hidden1', 'hidden2') and config.mixup.alpha == 2.0
    assert methods.command_line('cutmix') == (
        """--config.mixup.modes="('none',)" --config.mixup.alpha=1.0 """
        '--config.mixup.cutmix_probability=0.5 --config.mixup.cutmix_alpha=1.0')
    assert methods.command_line('cutmix_every_batch') == \
        """--config.mixup.modes="('cutmix',)" --config.mixup.alpha=1.0"""
    assert methods.command_line('alignmix') == ''
    with pytest.raises(ValueError, match='unknown method .*valid methods: baseline, '):
        methods.apply_method(make_tiny_config(), 'mixmix')
    for name in methods.METHODS:  # every method is a valid run of the mini reproduction
        config = mini_reproduction.get_config(name)
        assert train.training_modes(config)
        assert (config.model.decoder == 'ae') == (name == 'alignmix_ae')


def test_config_variants_combine_a_backbone_and_a_method():
    config = cifar10.get_config('mobilenet_v2,alignmix_cutmix')
    assert config.model.name == 'mobilenet_v2' and config.model.head_norm is True
    assert config.model.mobilenet_v2.small_input is True
    assert config.mixup.cutmix_probability == 0.5 and config.mixup.cutmix_alpha == 1.0
    assert config.mixup.modes == ('input', 'embedding', 'feature', 'feature_prime')
    vit = mini_reproduction.get_config('vit_small')  # the method defaults to AlignMix
    assert (vit.model.name, vit.model.vit.patch_size, vit.model.width) == ('vit_small', 4, 0.25)
    assert cifar10.get_config('swin_tiny,cutmix_every_batch').mixup.modes == ('cutmix',)
    cutmix = cifar10.get_config('swin_tiny,cutmix').mixup
    assert (cutmix.modes, cutmix.cutmix_probability, cutmix.cutmix_alpha) == (('none',), 0.5, 1.0)
    assert methods.command_line('alignmix_cutmix') == \
        '--config.mixup.cutmix_probability=0.5 --config.mixup.cutmix_alpha=1.0'
    with pytest.raises(ValueError, match="unknown config variant 'vit'; valid: methods "):
        cifar10.get_config('vit,cutmix')
    with pytest.raises(ValueError, match='names more than one method'):
        cifar10.get_config('cutmix,baseline')


def tiny_method_config(method: str) -> ml_collections.ConfigDict:
    config = methods.apply_method(make_tiny_config(), method)
    config.train.num_epochs = 1
    config.train.eval_every_epochs = 1
    return config


@pytest.mark.slow  # trains (left out by -m "not slow")
def test_reproduction_trains_each_run_once_and_writes_the_table(tmp_path, monkeypatch):
    loads = []
    load_dataset = data.load_dataset

    def counting_load(dataset_config):
        loads.append(dataset_config.name)
        return load_dataset(dataset_config)

    monkeypatch.setattr(data, 'load_dataset', counting_load)
    workdir = str(tmp_path)
    summary = reproduction_runs.run_all(tiny_method_config, ['baseline', 'cutmix'], [0, 1], workdir,
                                command='the command')
    assert loads == ['demo']  # one dataset, shared by the four runs
    for method in ('baseline', 'cutmix'):
        finals = []
        for seed in (0, 1):
            run_directory = reproduction_runs.run_directory(workdir, method, seed)
            with open(f'{run_directory}/results.json') as f:
                run = json.load(f)
            finals.append(run['final_test_accuracy'])
            assert run['wall_seconds'] > 0
        assert summary[method]['final_mean'] == pytest.approx(np.mean(finals))
        assert summary[method]['final_std'] == pytest.approx(np.std(finals, ddof=1))
    # CutMix on half the batches, clean ones otherwise (the official recipe).
    assert summary['cutmix']['modes'] == ['none'] and summary['cutmix']['alpha'] == 1.0
    table = (tmp_path / 'results.md').read_text()
    assert table.splitlines()[0].startswith('| method | modes (alpha) | final test accuracy')
    baseline_row = next(line for line in table.splitlines() if line.startswith('| baseline '))
    assert f'{100 * summary["baseline"]["final_mean"]:.2f} ± ' in baseline_row
    assert '4 runs' in table and 'the command' in table
    written = json.loads((tmp_path / 'results.json').read_text())
    assert len(written['runs']) == 4 and set(written['summary']) == {'baseline', 'cutmix'}

    # Started again: every run has its results, so nothing trains and the table is the same.
    def no_training(*args, **kwargs):
        raise AssertionError('a finished run was trained again')

    monkeypatch.setattr(train, 'train_and_evaluate', no_training)
    again = reproduction_runs.run_all(tiny_method_config, ['baseline', 'cutmix'], [0, 1], workdir,
                              command='the command')
    assert again == summary


def test_reproduction_command_rejects_an_unknown_method_in_one_line(tmp_path):
    result = run_reproduce(tmp_path, tmp_path / 'runs', '--methods=cutmix,mixmix')
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        "error: unknown method 'mixmix'; valid methods: baseline, input_mixup, manifold_mixup, "
        'cutmix, cutmix_every_batch, alignmix, alignmix_unaligned, alignmix_ae, alignmix_cutmix, '
        'alignmix_public')
    assert not (tmp_path / 'runs').exists()
