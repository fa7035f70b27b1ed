"""End to end: each evaluation command on a tiny checkpoint trained here, and its errors."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from sklearn import metrics as sk_metrics

from alignmix_jax.data import augmentation
from alignmix_jax.evaluation import command, common, ood
from alignmix_jax.method import alignment
from alignmix_jax.runtime import checkpointing
from alignmix_jax.training import train
from tests.conftest import ABSL_PREFIX, REPO_ROOT, make_tiny_config

# Slow (left out by -m "not slow"): trains a run, then runs every evaluation command on it.
pytestmark = pytest.mark.slow

# The tiny config as command-line overrides of configs/demo.py (the fields evaluation reads).
TINY_OVERRIDES = ('--config.model.width=0.125', '--config.train.eval_batch_size=250')


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp('tiny_run'))
    result = train.train_and_evaluate(make_tiny_config(), workdir)
    return workdir, result


def run_command(kind, workdir, *overrides):
    environment = dict(os.environ)  # with conftest's compilation cache
    completed = subprocess.run(
        [sys.executable, '-m', f'alignmix_jax.evaluation.{kind}', '--config=configs/demo.py',
         f'--workdir={workdir}', *TINY_OVERRIDES, *overrides],
        cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    # A quiet console: the table only, no absl line (orbax's notes on the read-only restore,
    # jax's search for accelerators) unless asked for with -v.
    assert not ABSL_PREFIX.search(completed.stderr), completed.stderr[-2000:]
    with open(os.path.join(workdir, 'eval', f'{kind}.json')) as json_file:
        record = json.load(json_file)
    assert record['kind'] == kind and record['step'] == 8  # the latest checkpoint
    return record['results'], completed.stdout


def test_classification_command_matches_the_trainers_evaluation(trained):
    workdir, result = trained
    results, printed = run_command('classification', workdir)
    assert results['num_examples'] == 1000  # every demo test image once
    assert results['top1_error'] == pytest.approx(1 - result['final_test_accuracy'], abs=1e-6)
    assert 0 <= results['top5_error'] <= results['top1_error'] <= 1
    assert 'top-1 error (%)' in printed and f'{100 * results["top1_error"]:.2f}' in printed


def test_robustness_command(trained):
    workdir, _ = trained
    results, printed = run_command('robustness', workdir,
                                   '--config.evals.robustness.num_examples=100',
                                   '--config.evals.robustness.batch_size=100')
    assert results['num_examples'] == 100
    assert results['fgsm_top1_error'] >= results['clean_top1_error']
    assert results['pgd_top1_error'] >= results['clean_top1_error']
    assert results['pgd_steps'] == 20 and results['fgsm_epsilon'] == pytest.approx(8 / 255)
    assert 'PGD, eps 4/255, 20 steps of 2/255' in printed
    # The paper gives only PGD's radius and step size: the JSON and table say the rest is ours.
    assert results['pgd_random_start'] is True
    assert "project's choices" in results['pgd_protocol_choices']
    assert 'our choices, the paper gives only the radius and step size' in printed


def test_calibration_command(trained):
    workdir, _ = trained
    results, printed = run_command('calibration', workdir)
    counts = np.array(results['bin_counts'])
    assert len(counts) == 15 and counts.sum() == 1000
    filled = counts > 0
    gaps = np.abs(np.array(results['bin_accuracy'], float)[filled]
                  - np.array(results['bin_confidence'], float)[filled])
    assert results['ece'] == pytest.approx(np.sum(counts[filled] / 1000 * gaps))
    assert 0 <= results['oe'] <= results['ece'] <= 1
    with open(os.path.join(workdir, 'eval', 'calibration_reliability.png'), 'rb') as png:
        assert png.read(8) == b'\x89PNG\r\n\x1a\n'
    assert 'ECE (%)' in printed


def test_ood_command_against_scores_computed_here(trained):
    workdir, _ = trained
    results, printed = run_command('ood', workdir)
    assert set(results) == {'uniform', 'gaussian'}
    # The same scores, computed without the evaluation's batching: the model on whole sets.
    config = make_tiny_config()
    context, variables, _ = common.load(config, workdir)

    def max_softmax(images):
        normalized = augmentation.normalize(images, config.dataset.mean, config.dataset.std)
        logits = context.model.apply(variables, normalized, train=False)
        return np.asarray(jax.nn.softmax(logits).max(-1))

    in_scores = max_softmax(context.dataset.test.images)
    for name in ('uniform', 'gaussian'):
        figures = results[name]
        assert figures['num_in'] == 1000 and figures['num_out'] == 1000
        out_scores = max_softmax(ood.noise_images(name, 1000, (32, 32, 3), seed=0))
        is_in = np.r_[np.ones(1000), np.zeros(1000)]
        assert figures['auroc'] == pytest.approx(
            sk_metrics.roc_auc_score(is_in, np.r_[in_scores, out_scores]), abs=1e-4)
        assert 0.5 <= figures['best_threshold_detection_accuracy'] <= 1
        assert figures['detection_accuracy'] == pytest.approx(
            0.5 * (np.mean(in_scores >= 0.5) + np.mean(out_scores < 0.5)), abs=1e-3)
        assert 0 <= figures['aupr_in'] <= 1 and 0 <= figures['aupr_out'] <= 1
    assert 'AUROC' in printed and 'gaussian' in printed


def test_correspondence_command(trained):
    workdir, _ = trained
    results, printed = run_command('correspondence', workdir,
                                   '--config.evals.correspondence.num_examples=100')
    assert results['num_examples'] == 100 and results['num_cells'] == 16
    assert results['chance'] == pytest.approx(1 / 16)
    for name in ('flip', 'shift'):
        assert 0 <= results[f'{name}_share'] <= 1
        assert 0 <= results[f'{name}_same_cell_share'] <= 1
        assert results[f'{name}_marginal_error'] >= 0
    # Against an independent computation here: the plans of the same 100 images' A.
    context, variables, _ = common.load(make_tiny_config(), workdir)
    test = common.subset(context.dataset.test, 100)
    inputs = context.normalize(test.images)
    features = context.model.apply(variables, inputs, train=False, method=context.model.features)
    flipped = context.model.apply(variables, inputs[:, :, ::-1], train=False,
                                  method=context.model.features)
    plan = np.asarray(alignment.transport_plan(features, flipped))
    mirrored = np.arange(16).reshape(4, 4)[:, ::-1].reshape(-1)
    # Each cell's share of the mass it sends (its row of the plan).
    expected = np.mean(plan[:, np.arange(16), mirrored] / plan.sum(axis=-1))
    assert results['flip_share'] == pytest.approx(expected, abs=1e-4)
    assert 'x vs flip(x)' in printed and 'chance (1/r)' in printed


def test_held_out_classes_protocol(tmp_path):
    config = make_tiny_config()
    config.dataset.held_out_classes = ('cat', 'dog')
    config.train.num_epochs = 1
    config.mixup.modes = ('input',)  # one compiled step is enough here
    train.train_and_evaluate(config, str(tmp_path))
    context, variables, _ = common.load(config, str(tmp_path))
    assert context.num_classes == 8
    evaluator = ood.Evaluator(context, datasets=('held_out',))
    figures = evaluator.run(variables)['held_out']
    # The demo test set has 100 images per class: 8 classes in, 2 out.
    assert (figures['num_in'], figures['num_out']) == (800, 200)
    assert 0.5 <= figures['best_threshold_detection_accuracy'] <= 1
    assert 0 <= figures['detection_accuracy'] <= 1


def test_errors_are_one_line(trained, tmp_path):
    workdir, _ = trained
    config = make_tiny_config()
    with pytest.raises(checkpointing.CheckpointError, match='train first'):
        command.evaluate_workdir('classification', config, str(tmp_path))
    with pytest.raises(checkpointing.CheckpointError, match=r'available steps: \[4, 6, 8\]'):
        command.evaluate_workdir('classification', config, workdir, step=5)
    record, _ = command.evaluate_workdir('classification', config, workdir, step=6)
    assert record['step'] == 6
    config.model.width = 0.25
    with pytest.raises(checkpointing.CheckpointError, match='does not fit the model'):
        command.evaluate_workdir('classification', config, workdir)
    completed = subprocess.run([sys.executable, '-m', 'alignmix_jax.evaluation', 'foo'],
                               cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert completed.returncode != 0
    assert completed.stderr.strip().splitlines()[-1].startswith(
        "error: unknown evaluation kind 'foo'; the kinds are classification")


def test_initial_evaluates_the_variables_training_starts_from(tmp_path):
    """--initial needs no checkpoint: its figures are those of the train state's initial
    variables (pytorch init included), and its file does not replace a checkpoint's."""
    from alignmix_jax.evaluation import classification
    from alignmix_jax.training import train_step

    config = make_tiny_config()
    config.model.init = 'pytorch'
    record, printed = command.evaluate_workdir('classification', config, str(tmp_path),
                                               initial=True)
    assert record['step'] == 'initial' and 'at step initial' in printed
    assert os.listdir(tmp_path / 'eval') == ['classification_initial.json']
    context, _ = common.initial(config)
    state = train_step.create_train_state(config, context.model, context.image_shape, 4,
                                          context.mesh)
    expected = classification.Evaluator(context).run(
        {'params': state.params, 'batch_stats': state.batch_stats})
    assert record['results'] == expected
    with pytest.raises(ValueError, match='leave out --step'):
        command.evaluate_workdir('classification', config, str(tmp_path), step=3, initial=True)


def test_initial_and_step_evaluations_keep_the_latest_checkpoints_files(trained, tmp_path):
    """Each evaluation's files are named by what it evaluated: the untrained model's
    reliability diagram does not replace the trained one's."""
    source, _ = trained
    workdir = str(tmp_path / 'run')
    shutil.copytree(source, workdir)
    config = make_tiny_config()
    latest, _ = command.evaluate_workdir('calibration', config, workdir)
    diagram = os.path.join(workdir, 'eval', 'calibration_reliability.png')
    with open(diagram, 'rb') as png:
        latest_picture = png.read()
    initial, printed = command.evaluate_workdir('calibration', config, workdir, initial=True)
    step_six, _ = command.evaluate_workdir('calibration', config, workdir, step=6)
    assert sorted(name for name in os.listdir(os.path.join(workdir, 'eval'))
                  if name.startswith('calibration')) == [
        'calibration.json', 'calibration_initial.json', 'calibration_initial_reliability.png',
        'calibration_reliability.png', 'calibration_step6.json',
        'calibration_step6_reliability.png']
    assert 'calibration_initial_reliability.png' in printed
    with open(diagram, 'rb') as png:
        assert png.read() == latest_picture
    for name, record in (('calibration', latest), ('calibration_initial', initial),
                         ('calibration_step6', step_six)):
        with open(os.path.join(workdir, 'eval', f'{name}.json')) as json_file:
            assert json.load(json_file)['step'] == record['step']
    assert (latest['step'], initial['step'], step_six['step']) == (8, 'initial', 6)
    assert latest['results']['ece'] != initial['results']['ece']


def test_a_checkpoint_rotated_away_while_loading_is_retried_or_named(trained, tmp_path,
                                                                    monkeypatch):
    """A training run's rotation deletes the checkpoint an evaluation is reading: the latest
    is read again (the newest left), a --step asked for is one line naming the steps left."""
    source, _ = trained
    workdir = str(tmp_path / 'run')
    shutil.copytree(source, workdir)
    config = make_tiny_config()
    check_fit = checkpointing._check_variables_fit

    def rotated_while_reading(state_directory, abstract_variables):
        step_directory = state_directory.parent
        if step_directory.name == '8':  # deleted between listing the steps and reading it
            shutil.rmtree(step_directory)
        return check_fit(state_directory, abstract_variables)

    monkeypatch.setattr(checkpointing, '_check_variables_fit', rotated_while_reading)
    record, _ = command.evaluate_workdir('classification', config, workdir)
    assert record['step'] == 6
    shutil.copytree(os.path.join(source, 'checkpoints', '8'),
                    os.path.join(workdir, 'checkpoints', '8'))
    with pytest.raises(checkpointing.CheckpointError) as raised:
        command.evaluate_workdir('classification', config, workdir, step=8)
    assert str(raised.value) == (
        f'the checkpoint of step 8 in {workdir}/checkpoints was deleted while it was read (a '
        f'training run keeps only its newest keep_checkpoints); available steps: [4, 6]')
