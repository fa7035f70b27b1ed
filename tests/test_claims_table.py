"""The claims table (`reproduce --protocol=cpu`): its preset, the remaining-runs report, the
table's figures, and the skip/resume of training and evaluation on a tiny budget."""

import json
import logging
import os

import pytest

from alignmix_jax.evaluation import command
from alignmix_jax.experiments import claims_table, reproduction_runs
from alignmix_jax.settings import config_checks
from alignmix_jax.training import train
from configs import cpu_protocol, methods
from tests.conftest import make_tiny_config, run_reproduce

# Slow (left out by -m "not slow"): trains and evaluates the claims protocol end to end.
pytestmark = pytest.mark.slow


def test_the_preset_is_the_claims_set_on_the_cifar10_network():
    assert cpu_protocol.METHODS == (
        'baseline', 'input_mixup', 'manifold_mixup', 'cutmix', 'alignmix',
        'alignmix_unaligned', 'alignmix_public', 'alignmix_ae')
    for name in cpu_protocol.METHODS:
        config = cpu_protocol.get_config(name)
        config_checks.validate(config, num_devices=1)
        assert (config.dataset.name, config.dataset.train_subset, config.model.width) == \
            ('image_folder', 2000, 0.25)
        assert (config.train.num_epochs, config.train.lr_decay_epochs,
                config.train.learning_rate, config.train.batch_size,
                config.train.eval_every_epochs) == (100, (50, 75), 0.1, 128, 25)
        # configs/cifar10.py's network: PyTorch's init and the public block's shortcut.
        assert config.model.init == 'pytorch'
        assert config.model.preact_resnet18.shortcut == 'preactivated'
        assert config.evals.robustness.num_examples == 1000
        assert config.evals.calibration.num_bins == 15
        assert config.evals.ood.datasets == claims_table.OOD_SETS
    unaligned = cpu_protocol.get_config('alignmix_unaligned')
    assert unaligned.mixup.align is False
    assert unaligned.mixup.modes == ('input', 'embedding', 'feature', 'feature_prime')
    assert unaligned.mixup.alpha == 2.0 and not unaligned.mixup.allow_inert_alignment
    assert methods.command_line('alignmix_unaligned') == '--config.mixup.align=False'
    assert cpu_protocol.get_config('input_mixup').mixup.modes == ('input',)
    assert cpu_protocol.get_config('alignmix_ae').train.decoder_learning_rate == 0.02
    assert cpu_protocol.get_config(None).mixup.align is True  # the default method: alignmix
    assert cpu_protocol.get_config('mobilenet_v2,cutmix').model.name == 'mobilenet_v2'


def _write(path, record):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as json_file:
        json.dump(record, json_file)


def _fake_run(workdir, method, seed, *, train_seconds, eval_seconds=None):
    """A run directory as the claims table leaves it: trained (results.json), and evaluated
    when `eval_seconds` is given."""
    directory = reproduction_runs.run_directory(str(workdir), method, seed)
    _write(os.path.join(directory, 'results.json'),
           {'final_test_accuracy': 0.5, 'steps': 1500, 'wall_seconds': train_seconds})
    if eval_seconds is not None:
        for kind in claims_table.EVAL_KINDS:
            _write(os.path.join(directory, 'eval', f'{kind}.json'),
                   {'kind': kind, 'step': 1500, 'results': {}})
        _write(os.path.join(directory, 'eval', claims_table.TIMING_FILE),
               {'robustness': eval_seconds - 30, 'calibration': 20, 'ood': 10})


def test_remaining_runs_and_their_estimate(tmp_path):
    report = claims_table.remaining_report(str(tmp_path), ['a', 'b'], [0, 1])
    assert report == ('4 of 4 runs remain: a seeds 0, 1; b seeds 0, 1. No time estimate yet: '
                      'no run has finished training.')
    _fake_run(tmp_path, 'a', 0, train_seconds=600, eval_seconds=60)
    _fake_run(tmp_path, 'a', 1, train_seconds=900)  # trained, not evaluated
    # An evaluation of another step (e.g. a checkpoint before the last) does not count.
    _write(os.path.join(reproduction_runs.run_directory(str(tmp_path), 'a', 1), 'eval',
                        'robustness.json'), {'kind': 'robustness', 'step': 750, 'results': {}})
    # a seed 1: its evaluation, a's mean of 60 s; b (no finished run): the mean training time
    # of all finished runs, (600 + 900) / 2, and the evaluation time of all, 60 s, twice.
    assert claims_table.remaining_report(str(tmp_path), ['a', 'b'], [0, 1]) == (
        '3 of 4 runs remain: a seed 1 (evaluation only); b seeds 0, 1. Estimated time: 28 min '
        "(25 min training, 3 min evaluation; per run its method's mean over finished runs, "
        'else the mean over all of them).')
    _fake_run(tmp_path, 'b', 0, train_seconds=3000, eval_seconds=600)
    # b seed 1 now from b's own run: 3000 + 600 s; a seed 1: 60 s.
    assert claims_table.remaining_report(str(tmp_path), ['a', 'b'], [0, 1]).endswith(
        'Estimated time: 1 h 01 min (50 min training, 11 min evaluation; per run its method\'s '
        'mean over finished runs, else the mean over all of them).')
    assert claims_table.duration(3 * 3600 + 5 * 60) == '3 h 05 min'


def test_the_estimate_counts_finished_runs_not_asked_for(tmp_path):
    # Runs started one seed at a time: seed 1 is estimated from seed 0's 600 + 60 s.
    _fake_run(tmp_path, 'a', 0, train_seconds=600, eval_seconds=60)
    assert claims_table.remaining_report(str(tmp_path), ['a'], [1]) == (
        '1 of 1 runs remain: a seed 1. Estimated time: 11 min (10 min training, 1 min '
        "evaluation; per run its method's mean over finished runs, else the mean over all of "
        'them).')
    # Another method's runs stand in for a method without one; other folders are not runs.
    os.makedirs(tmp_path / 'jax_cache' / 'seedless')
    assert claims_table.remaining_report(str(tmp_path), ['b'], [0]).startswith(
        '1 of 1 runs remain: b seed 0. Estimated time: 11 min')


def test_evaluation_only_remaining_before_any_evaluation(tmp_path):
    _fake_run(tmp_path, 'a', 0, train_seconds=600)
    assert claims_table.remaining_report(str(tmp_path), ['a'], [0]) == (
        '1 of 1 runs remain: a seed 0 (evaluation only). No time estimate yet: no run has been '
        'evaluated.')
    assert claims_table.remaining_report(str(tmp_path), ['a'], [0, 1]).endswith(
        'Estimated training time: 10 min; no estimate of the evaluations yet: no run has been '
        'evaluated.')


def _run(method, seed, final, fgsm, pgd, ece, oe, curve, wall):
    # OOD figures: uniform noise from the final accuracy, Gaussian from FGSM, to tell apart.
    return {'method': method, 'seed': seed, 'final_test_accuracy': final,
            'fgsm_accuracy': fgsm, 'pgd_accuracy': pgd, 'ece': ece, 'oe': oe,
            'ood_uniform_detection': final, 'ood_uniform_auroc': final + 0.1,
            'ood_gaussian_detection': fgsm, 'ood_gaussian_auroc': fgsm + 0.1,
            'ood_examples': 10000,
            'curve': curve, 'wall_seconds': wall, 'calibration_examples': 10000,
            'calibration_bins': 15,
            'robustness_examples': 1000,
            'robustness_options': {'fgsm_epsilon': 8 / 255, 'pgd_epsilon': 4 / 255,
                                   'pgd_step_size': 2 / 255, 'pgd_steps': 20,
                                   'pgd_random_start': True}}


def test_table_columns_from_known_runs(tmp_path):
    runs = [_run('baseline', 0, 0.50, 0.10, 0.02, 0.30, 0.25, {'25': 0.4, '50': 0.5}, 600),
            _run('baseline', 1, 0.60, 0.20, 0.04, 0.20, 0.15, {'25': 0.5, '50': 0.6}, 720),
            _run('baseline', 2, 0.70, 0.30, 0.06, 0.10, 0.05, {'25': 0.6, '50': 0.7}, 780),
            _run('alignmix', 0, 0.62, 0.25, 0.05, 0.05, 0.01, {'25': 0.45, '50': 0.62}, 900)]
    summary = claims_table.write_results(str(tmp_path), runs, command='the command',
                                         remaining='2 of 6 runs remain: alignmix seeds 1, 2.')
    assert summary['baseline']['final_test_accuracy']['mean'] == pytest.approx(0.6)
    assert summary['baseline']['final_test_accuracy']['std'] == pytest.approx(0.1)  # n - 1
    assert summary['alignmix']['ece']['std'] == 0.0  # one seed
    table = (tmp_path / 'results.md').read_text().splitlines()
    assert table[0] == (
        '| method | seeds | test accuracy at epoch 25 / 50, % (mean) | final test accuracy, % | '
        'FGSM accuracy, % | PGD accuracy, % | ECE, % | OE, % | wall time per run (training + '
        'evaluation) |')
    assert table[2] == ('| baseline | 0, 1, 2 | 50.00 / 60.00 | 60.00 ± 10.00 | 20.00 ± 10.00 | '
                        '4.00 ± 2.00 | 20.00 ± 10.00 | 15.00 ± 10.00 | 12 min |')
    assert table[3] == ('| alignmix | 0 | 45.00 / 62.00 | 62.00 ± 0.00 | 25.00 ± 0.00 | '
                        '5.00 ± 0.00 | 5.00 ± 0.00 | 1.00 ± 0.00 | 15 min |')
    note = table[5]
    assert note.startswith('4 runs trained and evaluated; mean ± sample standard deviation')
    assert 'on the 10000 test images' in note
    assert ('PGD (eps 4/255, 20 steps of 2/255, random start) accuracy on 1000 test images'
            in note)
    assert 'Wall time: 50 min for these runs together' in note
    assert note.endswith('2 of 6 runs remain: alignmix seeds 1, 2.')
    assert table[7:13] == [
        "Out-of-distribution detection by the maximum softmax probability (Table 6's noise "
        'sets, 10000 images each, against the test images):',
        '',
        '| method | Uniform noise: detection accuracy (t = 0.5), % | Uniform noise: AUROC, % | '
        'Gaussian noise: detection accuracy (t = 0.5), % | Gaussian noise: AUROC, % |',
        '|---|---|---|---|---|',
        '| baseline | 60.00 ± 10.00 | 70.00 ± 10.00 | 20.00 ± 10.00 | 30.00 ± 10.00 |',
        '| alignmix | 62.00 ± 0.00 | 72.00 ± 0.00 | 25.00 ± 0.00 | 35.00 ± 0.00 |']
    saved = json.loads((tmp_path / 'results.json').read_text())
    assert saved['summary']['baseline']['curve'] == pytest.approx({'25': 0.5, '50': 0.6})
    assert len(saved['runs']) == 4 and saved['command'] == 'the command'


def tiny_claims_config(method):
    config = methods.apply_method(make_tiny_config(), method)
    config.train.num_epochs = 2  # 4 steps an epoch, evaluated after each
    config.evals.robustness.num_examples = 100
    config.evals.robustness.batch_size = 100
    config.evals.robustness.pgd_steps = 2
    return config


def test_tiny_claims_skip_and_resume_training_and_evaluation(tmp_path, monkeypatch, caplog):
    workdir = str(tmp_path)
    # A killed run: one epoch trained and checkpointed, no results.json yet.
    killed = tiny_claims_config('baseline')
    killed.train.num_epochs = 1  # the rest as the full run's: the workdir remembers its config
    killed.seed = 1
    train.train_and_evaluate(killed, reproduction_runs.run_directory(workdir, 'baseline', 1))
    reports = []
    evaluated = []
    evaluate_workdir = command.evaluate_workdir

    def counting_evaluate(kind, config, directory, *args, **kwargs):
        evaluated.append((kind, os.path.basename(directory)))
        return evaluate_workdir(kind, config, directory, *args, **kwargs)

    monkeypatch.setattr(command, 'evaluate_workdir', counting_evaluate)
    caplog.set_level(logging.INFO)
    summary = claims_table.run_claims(tiny_claims_config, ['baseline'], [0, 1], workdir,
                                      command='tiny', report=reports.append)
    assert reports[0] == ('2 of 2 runs remain: baseline seeds 0, 1. No time estimate yet: no '
                          'run has finished training.')
    assert reports[1].startswith('1 of 2 runs remain: baseline seed 1. Estimated time: ')
    assert reports[2] == 'All 2 runs are trained and evaluated.'
    assert 'Resumed from' in caplog.text  # seed 1 went on from its checkpoint at step 4
    assert evaluated == [(kind, seed) for seed in ('seed0', 'seed1')
                         for kind in ('robustness', 'calibration', 'ood')]
    for seed in (0, 1):
        directory = reproduction_runs.run_directory(workdir, 'baseline', seed)
        robustness = json.loads(open(f'{directory}/eval/robustness.json').read())
        calibration = json.loads(open(f'{directory}/eval/calibration.json').read())
        assert robustness['step'] == calibration['step'] == 8  # the final checkpoint
        assert robustness['results']['num_examples'] == 100
        assert calibration['results']['num_examples'] == 1000
        saved = json.loads((tmp_path / 'results.json').read_text())['runs'][seed]
        assert saved['fgsm_accuracy'] == pytest.approx(
            1 - robustness['results']['fgsm_top1_error'])
        assert saved['pgd_accuracy'] == pytest.approx(1 - robustness['results']['pgd_top1_error'])
        assert saved['ece'] == calibration['results']['ece']
        ood = json.loads(open(f'{directory}/eval/ood.json').read())
        assert ood['step'] == 8
        assert saved['ood_gaussian_auroc'] == ood['results']['gaussian']['auroc']
        assert saved['ood_uniform_detection'] == ood['results']['uniform']['detection_accuracy']
        assert saved['ood_examples'] == 1000  # as many noise images as test images
        assert list(saved['curve']) == ['1', '2']  # the evaluations after epochs 1 and 2
        assert saved['curve']['2'] == pytest.approx(saved['final_test_accuracy'])
        timing = json.loads(open(f'{directory}/eval/wall_seconds.json').read())
        assert set(timing) == {'robustness', 'calibration', 'ood'}
        # Seed 1's training time includes the killed call's first epoch.
        result = json.loads(open(f'{directory}/results.json').read())
        assert (result['train_seconds_before_resume'] > 0) == (seed == 1)
        assert result['wall_seconds'] > result['train_seconds'] > \
            result['train_seconds_before_resume']
        assert saved['wall_seconds'] == pytest.approx(saved['train_seconds'] + sum(
            timing.values()))
    finals = [run['final_test_accuracy'] for run in
              json.loads((tmp_path / 'results.json').read_text())['runs']]
    assert summary['baseline']['final_test_accuracy']['values'] == finals
    assert (tmp_path / 'results.md').read_text().startswith('| method | seeds | test accuracy '
                                                            'at epoch 1 / 2, % (mean) |')

    # Killed between the two evaluations of seed 0: only the missing one runs again, and
    # nothing trains.
    os.remove(os.path.join(reproduction_runs.run_directory(workdir, 'baseline', 0), 'eval',
                           'calibration.json'))

    def no_training(*args, **kwargs):
        raise AssertionError('a finished run was trained again')

    monkeypatch.setattr(train, 'train_and_evaluate', no_training)
    evaluated.clear()
    reports.clear()
    again = claims_table.run_claims(tiny_claims_config, ['baseline'], [0, 1], workdir,
                                    command='tiny', report=reports.append)
    assert evaluated == [('calibration', 'seed0')]
    assert reports[0].startswith('1 of 2 runs remain: baseline seed 0 (evaluation only). '
                                 'Estimated time: ')
    assert reports[1:] == ['All 2 runs are trained and evaluated.']
    assert again['baseline']['final_test_accuracy'] == summary['baseline']['final_test_accuracy']
    # Everything done: nothing is trained or evaluated, the report says so once.
    evaluated.clear()
    reports.clear()
    claims_table.run_claims(tiny_claims_config, ['baseline'], [0, 1], workdir, command='tiny',
                            report=reports.append)
    assert evaluated == [] and reports == ['All 2 runs are trained and evaluated.']


def test_cpu_protocol_refuses_the_ablation_in_one_line(tmp_path):
    result = run_reproduce(tmp_path, tmp_path / 'runs', '--protocol=cpu',
                           '--ablation=alignment')
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        'error: --ablation runs on the mini-reproduction budget; leave out --protocol=cpu (or '
        '--ablation)')
    assert not (tmp_path / 'runs').exists()


def test_cpu_protocol_command_tabulates_finished_runs_without_training(tmp_path):
    """The command's wiring: the runs of --methods/--seeds under WORKDIR, all finished (as
    written by training and the evaluation commands), are tabulated, not trained again."""
    workdir = tmp_path / 'runs'
    directory = reproduction_runs.run_directory(str(workdir), 'baseline', 0)
    _write(os.path.join(directory, 'results.json'),
           {'final_test_accuracy': 0.6, 'final_test_loss': 1.2, 'best_test_accuracy': 0.6,
            'best_epoch': 100, 'steps': 1500, 'wall_seconds': 720.0})
    _write(os.path.join(directory, 'eval', 'robustness.json'), {
        'kind': 'robustness', 'step': 1500,
        'results': {'clean_top1_error': 0.4, 'fgsm_top1_error': 0.8, 'pgd_top1_error': 0.9,
                    'num_examples': 1000, 'fgsm_epsilon': 8 / 255, 'pgd_epsilon': 4 / 255,
                    'pgd_step_size': 2 / 255, 'pgd_steps': 20, 'pgd_random_start': True}})
    _write(os.path.join(directory, 'eval', 'calibration.json'), {
        'kind': 'calibration', 'step': 1500,
        'results': {'ece': 0.05, 'oe': 0.02, 'num_examples': 10000, 'bin_counts': [0] * 15}})
    _write(os.path.join(directory, 'eval', 'ood.json'), {
        'kind': 'ood', 'step': 1500,
        'results': {name: {'detection_accuracy': 0.55, 'auroc': 0.6, 'num_out': 10000}
                    for name in ('uniform', 'gaussian')}})
    _write(os.path.join(directory, 'eval', claims_table.TIMING_FILE),
           {'robustness': 150.0, 'calibration': 10.0, 'ood': 20.0})
    result = run_reproduce(tmp_path, workdir, '--protocol=cpu', '--methods=baseline',
                           '--seeds=0')
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0] == 'All 1 runs are trained and evaluated.'
    assert '| method | seeds | test accuracy during training (not logged) | ' in result.stdout
    assert '| baseline | 0 | - | ' in result.stdout
    assert ('| 60.00 ± 0.00 | 20.00 ± 0.00 | 10.00 ± 0.00 | 5.00 ± 0.00 | 2.00 ± 0.00 | 15 min |'
            in result.stdout)
    assert (f'Command: `python -m alignmix_jax.experiments.reproduce --protocol=cpu '
            f'--data_dir={tmp_path} --workdir={workdir} --methods=baseline --seeds=0`'
            ) in result.stdout
    # --table_only: the same table from the finished runs of a larger set, with what remains;
    # nothing trains (the missing runs' directories are not created).
    result = run_reproduce(tmp_path, workdir, '--protocol=cpu', '--methods=baseline,alignmix',
                           '--seeds=0,1', '--table_only')
    assert result.returncode == 0, result.stderr[-2000:]
    assert '| baseline | 0 | - | 60.00 ± 0.00 | ' in result.stdout
    assert '3 of 4 runs remain: baseline seed 1; alignmix seeds 0, 1.' in result.stdout
    assert ('- **AlignMix is more accurate than the baseline and every other mixup method '
            '(Table 1): not measured.** not trained yet: alignmix, input_mixup, manifold_mixup, '
            'cutmix.') in result.stdout
    assert not (workdir / 'alignmix').exists() and not (workdir / 'baseline' / 'seed1').exists()


def test_table_only_needs_the_cpu_protocol_in_one_line(tmp_path):
    result = run_reproduce(tmp_path, tmp_path / 'runs', '--table_only')
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        'error: --table_only reads the claims table of --protocol=cpu; add --protocol=cpu')
