"""The paper's claims read from the claims table: each holds, does not hold, or is within noise.

`read_claims(summary)` takes `claims_table.summarize`'s per-method figures (each seed's value)
and reads the claims that the CPU protocol can test:

- AlignMix is more accurate than the baseline and every other mixup method (Table 1);
- aligned feature mixing is more accurate than the same mixing without alignment (Table 8's
  'unaligned' row);
- every mixup method is more robust to FGSM and to PGD than the baseline (Table 2);
- AlignMix is the most robust to FGSM and to PGD (Table 2);
- AlignMix is the best calibrated: the lowest ECE and OE (Table 7);
- AlignMix detects out-of-distribution images best: the highest detection accuracy and AUROC
  on uniform and Gaussian noise (Table 6's noise sets).

Each claim is a set of comparisons of two methods on one figure. A comparison is Welch's
t-test (`scipy.stats.ttest_ind` with unequal variances) on the two methods' per-seed values,
two-sided at the 5% level: 'holds' when the difference is in the claimed direction and
significant, 'does not hold' when it is significant the other way, 'within noise' otherwise,
and 'not measured' when a method has fewer than two seeds (no spread to test against); when
every seed of both methods gives the same value there is no t statistic, and a difference
counts as beyond noise. A claim holds when every one of its comparisons holds, does not hold
when any of them goes significantly the other way, and is within noise otherwise; its line
gives every comparison's difference and p-value, so a claim that holds against some methods
and not others says so. Welch's test rather than a fixed multiple of the standard deviation:
with three seeds a side the spread itself is uncertain, which the t distribution accounts for.

`separation` is the protocol's own criterion (configs/cpu_protocol.py): the baseline and input
mixup differ by at least three times the larger of their seed standard deviations.
"""

import warnings
from collections.abc import Sequence

from scipy import stats

SIGNIFICANCE = 0.05
# Table 1's competitors that the claims table trains; AlignMix with the public code's algorithm
# and AlignMixup/AE are variants of the method, and the unaligned row is claim 2's.
COMPETITORS = ('baseline', 'input_mixup', 'manifold_mixup', 'cutmix')
MIXUP_METHODS = ('input_mixup', 'manifold_mixup', 'cutmix', 'alignmix')
# The protocol's criterion: baseline and input mixup apart by this many seed stds.
SEPARATION_FACTOR = 3.0
# figure -> (name in the text, True when higher is better)
FIGURES = {
    'final_test_accuracy': ('accuracy', True),
    'fgsm_accuracy': ('FGSM accuracy', True),
    'pgd_accuracy': ('PGD accuracy', True),
    'ece': ('ECE', False),
    'oe': ('OE', False),
    'ood_uniform_detection': ('uniform-noise detection accuracy', True),
    'ood_uniform_auroc': ('uniform-noise AUROC', True),
    'ood_gaussian_detection': ('Gaussian-noise detection accuracy', True),
    'ood_gaussian_auroc': ('Gaussian-noise AUROC', True),
}
# (claim, [(better method, other methods, figures)]), in the paper's order.
CLAIMS = (
    ('AlignMix is more accurate than the baseline and every other mixup method (Table 1)',
     [('alignmix', COMPETITORS, ('final_test_accuracy',))]),
    ('Aligned feature mixing is more accurate than unaligned (Table 8)',
     [('alignmix', ('alignmix_unaligned',), ('final_test_accuracy',))]),
    ('Every mixup method is more robust to FGSM and PGD than the baseline (Table 2)',
     [(method, ('baseline',), ('fgsm_accuracy', 'pgd_accuracy')) for method in MIXUP_METHODS]),
    ('AlignMix is the most robust to FGSM and PGD (Table 2)',
     [('alignmix', COMPETITORS, ('fgsm_accuracy', 'pgd_accuracy'))]),
    ('AlignMix is the best calibrated: the lowest ECE and OE (Table 7)',
     [('alignmix', COMPETITORS, ('ece', 'oe'))]),
    ('AlignMix detects out-of-distribution noise best: the highest detection accuracy and '
     'AUROC on uniform and Gaussian noise (Table 6)',
     [('alignmix', COMPETITORS, ('ood_uniform_detection', 'ood_uniform_auroc',
                                 'ood_gaussian_detection', 'ood_gaussian_auroc'))]),
)


def compare(summary: dict, better: str, other: str, figure: str) -> dict:
    """The comparison 'better is better than other on figure' (see the module docstring)."""
    a, b = summary[better][figure], summary[other][figure]
    values_a, values_b = a['values'], b['values']
    difference = a['mean'] - b['mean']
    higher_is_better = FIGURES[figure][1]
    record = {'better': better, 'other': other, 'figure': figure, 'difference': difference,
              'p_value': None}
    if min(len(values_a), len(values_b)) < 2:
        return {**record, 'verdict': 'not measured'}
    if a['std'] == b['std'] == 0:
        # Every seed alike on both sides: no t statistic, and any difference is beyond noise.
        p_value = None
        significant = difference != 0
    else:
        with warnings.catch_warnings():
            # scipy warns of precision loss when one side's seeds are all alike (e.g. the
            # same count of 1,000 attacked images); its t statistic is still the right one.
            warnings.simplefilter('ignore', RuntimeWarning)
            p_value = float(stats.ttest_ind(values_a, values_b, equal_var=False).pvalue)
        significant = p_value < SIGNIFICANCE
    if not significant:
        verdict = 'within noise'
    elif (difference > 0) == higher_is_better:
        verdict = 'holds'
    else:
        verdict = 'does not hold'
    return {**record, 'p_value': p_value, 'verdict': verdict}


def read_claims(summary: dict) -> list[dict]:
    """Each claim with the comparisons whose methods are in `summary` (a claim with none is
    'not measured', naming what it needs) and its verdict."""
    readings = []
    for claim, groups in CLAIMS:
        comparisons, missing = [], []
        for better, others, figures in groups:
            for other in others:
                if better not in summary or other not in summary:
                    missing += [name for name in (better, other)
                                if name not in summary and name not in missing]
                    continue
                comparisons += [compare(summary, better, other, figure) for figure in figures]
        verdicts = {comparison['verdict'] for comparison in comparisons}
        if not comparisons or verdicts == {'not measured'}:
            verdict = 'not measured'
        elif 'does not hold' in verdicts:
            verdict = 'does not hold'
        elif verdicts == {'holds'}:
            verdict = 'holds'
        else:
            verdict = 'within noise'
        readings.append({'claim': claim, 'verdict': verdict, 'comparisons': comparisons,
                         'missing_methods': missing})
    return readings


def separation(summary: dict, first: str = 'baseline', second: str = 'input_mixup') -> dict | None:
    """The protocol's criterion on two methods' final test accuracy, or None when either is
    missing: |difference of means| >= SEPARATION_FACTOR x the larger seed std."""
    if first not in summary or second not in summary:
        return None
    a, b = (summary[name]['final_test_accuracy'] for name in (first, second))
    difference = b['mean'] - a['mean']
    threshold = SEPARATION_FACTOR * max(a['std'], b['std'])
    seeds = min(len(a['values']), len(b['values']))
    return {'first': first, 'second': second, 'difference': difference,
            'threshold': threshold, 'seeds': seeds,
            'separated': seeds >= 2 and abs(difference) >= threshold}


def _comparison_text(comparison: dict) -> str:
    name = FIGURES[comparison['figure']][0]
    p_value = comparison['p_value']
    tail = (f'p = {p_value:.3f}' if p_value is not None
            else 'one seed' if comparison['verdict'] == 'not measured' else 'no spread')
    return (f'{comparison["better"]} - {comparison["other"]} {name} '
            f'{100 * comparison["difference"]:+.2f} ({tail}, '
            f'{comparison["verdict"]})')


def format_markdown(readings: Sequence[dict], separation_record: dict | None) -> str:
    """One line a claim (its verdict, then every comparison), then the protocol's criterion."""
    lines = ['Reading (Welch\'s t-test on the seeds, two-sided at 5%; differences in points):', '']
    for reading in readings:
        details = '; '.join(_comparison_text(comparison)
                            for comparison in reading['comparisons'])
        if reading['missing_methods']:
            details += ('; ' if details else '') + (
                'not trained yet: ' + ', '.join(reading['missing_methods']))
        lines.append(f'- **{reading["claim"]}: {reading["verdict"]}.** {details}.')
    if separation_record is not None:
        record = separation_record
        lines += ['', (
            f'The protocol\'s criterion ({record["second"]} - {record["first"]} final accuracy '
            f'at least {SEPARATION_FACTOR:g} x the larger seed std): '
            f'{100 * record["difference"]:+.2f} against {100 * record["threshold"]:.2f} over '
            f'{record["seeds"]} seed(s): '
            f'{"separated" if record["separated"] else "not separated"}.')]
    return '\n'.join(lines) + '\n'
