"""The reading of the paper's claims from the claims table: each comparison's Welch test and
verdict, the claims' verdicts from their comparisons, the protocol's separation criterion, and
the lines results.md gets."""

import json

import pytest

from alignmix_jax.experiments import claim_readings, claims_table


def _summary(**figures_by_method):
    """{method: {figure: seed values}} -> claims_table.summarize's shape (values, mean, std)."""
    runs = []
    for method, figures in figures_by_method.items():
        seeds = len(next(iter(figures.values())))
        for seed in range(seeds):
            run = {'method': method, 'seed': seed, 'curve': {}, 'wall_seconds': None}
            for figure in claims_table.FIGURES:
                run[figure] = figures.get(figure, [0.5] * seeds)[seed]
            runs.append(run)
    return claims_table.summarize(runs)


def test_a_comparison_is_welchs_test_at_five_percent():
    summary = _summary(alignmix={'final_test_accuracy': [0.60, 0.61, 0.62]},
                       baseline={'final_test_accuracy': [0.55, 0.56, 0.57]})
    comparison = claim_readings.compare(summary, 'alignmix', 'baseline', 'final_test_accuracy')
    # t = 0.05 / sqrt(2 x 0.01^2 / 3) = 6.124 on 4 degrees of freedom: p = 0.0036.
    assert comparison['difference'] == pytest.approx(0.05)
    assert comparison['p_value'] == pytest.approx(0.0036022, abs=1e-6)
    assert comparison['verdict'] == 'holds'
    reversed_comparison = claim_readings.compare(summary, 'baseline', 'alignmix',
                                                 'final_test_accuracy')
    assert reversed_comparison['verdict'] == 'does not hold'
    assert reversed_comparison['difference'] == pytest.approx(-0.05)


def test_overlapping_seeds_are_within_noise_and_one_seed_is_not_measured():
    summary = _summary(alignmix={'final_test_accuracy': [0.60, 0.58, 0.62]},
                       baseline={'final_test_accuracy': [0.59, 0.61, 0.57]},
                       cutmix={'final_test_accuracy': [0.70]})
    within = claim_readings.compare(summary, 'alignmix', 'baseline', 'final_test_accuracy')
    assert within['verdict'] == 'within noise' and within['p_value'] > 0.5
    single = claim_readings.compare(summary, 'cutmix', 'baseline', 'final_test_accuracy')
    assert single == {'better': 'cutmix', 'other': 'baseline', 'figure': 'final_test_accuracy',
                      'difference': pytest.approx(0.11), 'p_value': None,
                      'verdict': 'not measured'}


def test_lower_is_better_for_calibration_errors():
    summary = _summary(alignmix={'ece': [0.02, 0.03, 0.025]}, baseline={'ece': [0.20, 0.22,
                                                                                0.21]})
    assert claim_readings.compare(summary, 'alignmix', 'baseline', 'ece')['verdict'] == 'holds'
    assert claim_readings.compare(summary, 'baseline', 'alignmix', 'ece')['verdict'] == \
        'does not hold'


def test_a_claim_holds_only_when_every_comparison_does():
    clear = [0.70, 0.71, 0.72]
    summary = _summary(alignmix={'final_test_accuracy': clear},
                       baseline={'final_test_accuracy': [0.60, 0.61, 0.62]},
                       input_mixup={'final_test_accuracy': [0.62, 0.63, 0.64]})
    accuracy = claim_readings.read_claims(summary)[0]
    assert accuracy['verdict'] == 'holds'
    assert [(c['other'], c['verdict']) for c in accuracy['comparisons']] == [
        ('baseline', 'holds'), ('input_mixup', 'holds')]
    # Manifold mixup and CutMix are not trained: named, and the claim is read on the rest.
    assert accuracy['missing_methods'] == ['manifold_mixup', 'cutmix']
    # One competitor within noise: the claim is within noise, not holds.
    summary = _summary(alignmix={'final_test_accuracy': clear},
                       baseline={'final_test_accuracy': [0.60, 0.61, 0.62]},
                       input_mixup={'final_test_accuracy': [0.69, 0.73, 0.71]})
    assert claim_readings.read_claims(summary)[0]['verdict'] == 'within noise'
    # One competitor significantly above: the claim does not hold.
    summary = _summary(alignmix={'final_test_accuracy': clear},
                       baseline={'final_test_accuracy': [0.60, 0.61, 0.62]},
                       input_mixup={'final_test_accuracy': [0.80, 0.81, 0.82]})
    assert claim_readings.read_claims(summary)[0]['verdict'] == 'does not hold'


def test_each_claim_compares_the_papers_methods():
    names = ('baseline', 'input_mixup', 'manifold_mixup', 'cutmix', 'alignmix',
             'alignmix_unaligned', 'alignmix_public', 'alignmix_ae')
    summary = _summary(**{name: {'final_test_accuracy': [0.5, 0.6]} for name in names})
    readings = claim_readings.read_claims(summary)
    pairs = [sorted({(c['better'], c['other'], c['figure']) for c in reading['comparisons']})
             for reading in readings]
    competitors = ('baseline', 'cutmix', 'input_mixup', 'manifold_mixup')
    assert pairs[0] == [('alignmix', other, 'final_test_accuracy') for other in competitors]
    assert pairs[1] == [('alignmix', 'alignmix_unaligned', 'final_test_accuracy')]
    assert pairs[2] == sorted((method, 'baseline', figure)
                              for method in ('input_mixup', 'manifold_mixup', 'cutmix',
                                             'alignmix')
                              for figure in ('fgsm_accuracy', 'pgd_accuracy'))
    assert pairs[3] == sorted(('alignmix', other, figure) for other in competitors
                              for figure in ('fgsm_accuracy', 'pgd_accuracy'))
    assert pairs[4] == sorted(('alignmix', other, figure) for other in competitors
                              for figure in ('ece', 'oe'))
    assert pairs[5] == sorted(('alignmix', other, f'ood_{noise}_{figure}')
                              for other in competitors for noise in ('uniform', 'gaussian')
                              for figure in ('detection', 'auroc'))
    assert len(readings) == 6
    # Identical seeds everywhere: every comparison within noise, no claim holds.
    assert {reading['verdict'] for reading in readings} == {'within noise'}
    assert all(reading['missing_methods'] == [] for reading in readings)


def test_the_protocols_separation_criterion():
    summary = _summary(baseline={'final_test_accuracy': [0.55, 0.56, 0.57]},
                       input_mixup={'final_test_accuracy': [0.58, 0.60, 0.62]})
    record = claim_readings.separation(summary)
    # input mixup's std is 0.02, so the threshold is 0.06; the means differ by 0.04.
    assert record['difference'] == pytest.approx(0.04)
    assert record['threshold'] == pytest.approx(0.06)
    assert record['seeds'] == 3 and record['separated'] is False
    summary = _summary(baseline={'final_test_accuracy': [0.55, 0.56, 0.57]},
                       input_mixup={'final_test_accuracy': [0.60, 0.61, 0.62]})
    assert claim_readings.separation(summary)['separated'] is True
    assert claim_readings.separation(_summary(baseline={'final_test_accuracy': [0.5]})) is None


def test_results_md_ends_with_the_reading(tmp_path):
    runs = []
    for method, accuracies in (('baseline', [0.55, 0.56, 0.57]),
                               ('input_mixup', [0.60, 0.61, 0.62]),
                               ('alignmix', [0.63, 0.64, 0.65])):
        for seed, accuracy in enumerate(accuracies):
            runs.append({'method': method, 'seed': seed, 'final_test_accuracy': accuracy,
                         'fgsm_accuracy': 0.1, 'pgd_accuracy': 0.05, 'ece': 0.1, 'oe': 0.05,
                         'ood_uniform_detection': 0.6, 'ood_uniform_auroc': 0.7,
                         'ood_gaussian_detection': 0.5, 'ood_gaussian_auroc': 0.6,
                         'ood_examples': 10000,
                         'curve': {}, 'wall_seconds': 600, 'calibration_examples': 10000,
                         'calibration_bins': 15, 'robustness_examples': 1000,
                         'robustness_options': {'fgsm_epsilon': 8 / 255,
                                                'pgd_epsilon': 4 / 255,
                                                'pgd_step_size': 2 / 255, 'pgd_steps': 20,
                                                'pgd_random_start': True}})
    claims_table.write_results(str(tmp_path), runs, command='c', remaining='r')
    text = (tmp_path / 'results.md').read_text()
    reading = text[text.index('Reading'):].splitlines()
    assert reading[0] == ("Reading (Welch's t-test on the seeds, two-sided at 5%; differences "
                          'in points):')
    assert reading[2].startswith(
        '- **AlignMix is more accurate than the baseline and every other mixup method '
        '(Table 1): holds.** alignmix - baseline accuracy +8.00 (p = 0.')
    assert 'alignmix - input_mixup accuracy +3.00 (p = 0.0' in reading[2]
    assert reading[2].endswith('not trained yet: manifold_mixup, cutmix.')
    assert reading[3] == ('- **Aligned feature mixing is more accurate than unaligned (Table 8): '
                          'not measured.** not trained yet: alignmix_unaligned.')
    # Identical robustness, calibration and OOD detection on every seed: no spread to test.
    assert '(no spread, within noise)' in reading[4]
    assert reading[7].startswith(
        '- **AlignMix detects out-of-distribution noise best: the highest detection accuracy '
        'and AUROC on uniform and Gaussian noise (Table 6): within noise.** alignmix - baseline '
        'uniform-noise detection accuracy +0.00 (no spread, within noise); ')
    assert reading[-1] == ("The protocol's criterion (input_mixup - baseline final accuracy at "
                           'least 3 x the larger seed std): +5.00 against 3.00 over 3 seed(s): '
                           'separated.')
    saved = json.loads((tmp_path / 'results.json').read_text())
    assert [reading['verdict'] for reading in saved['claims']] == [
        'holds', 'not measured', 'within noise', 'within noise', 'within noise', 'within noise']
    assert saved['separation']['separated'] is True


def test_one_side_without_spread_is_still_tested_quietly(recwarn):
    # The baseline's PGD count the same on both seeds: Welch's test on the other side's spread.
    summary = _summary(baseline={'pgd_accuracy': [0.046, 0.046]},
                       input_mixup={'pgd_accuracy': [0.030, 0.024, 0.036]})
    comparison = claim_readings.compare(summary, 'input_mixup', 'baseline', 'pgd_accuracy')
    # t = 0.016 / sqrt(0.006^2 / 3) = 4.62 on 2 degrees of freedom: p = 0.0438.
    assert comparison['p_value'] == pytest.approx(0.04382, abs=1e-5)
    assert comparison['verdict'] == 'does not hold'
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_every_figure_of_the_table_has_a_name_and_a_direction():
    # The readings name each figure the table records, and no other.
    assert set(claim_readings.FIGURES) == set(claims_table.FIGURES)
    for _, comparisons in claim_readings.CLAIMS:
        for _, _, figures in comparisons:
            assert set(figures) <= set(claims_table.FIGURES)
