"""Calibration: expected calibration error, overconfidence error, a reliability diagram.

    python -m alignmix_jax.evaluation.calibration --config=configs/demo.py --workdir=DIR

Paper Table 7 and Figure 4, following Thulasidasan et al. (2019). The confidence of a
prediction is its largest softmax probability. Confidences are put into M equal-width bins,
bin m holding those in ((m - 1) / M, m / M] (a confidence of 0 goes to the first bin); for the
examples B_m of bin m, acc(B_m) is the fraction predicted correctly and conf(B_m) their mean
confidence. With n examples in all:

    ECE = sum_m |B_m| / n * |acc(B_m) - conf(B_m)|                 (Guo et al. 2017, Eq. 3)
    OE  = sum_m |B_m| / n * conf(B_m) * max(conf(B_m) - acc(B_m), 0)
                                                        (Thulasidasan et al. 2019)

OE counts only bins where the network is more confident than accurate, weighted by confidence.
The reliability diagram plots acc(B_m) against the bin's confidence range.
"""

import functools
import os

import jax
import numpy as np

from alignmix_jax.evaluation import common


def confidence_bins(confidences: np.ndarray, correct: np.ndarray, num_bins: int):
    """(count, mean confidence, accuracy) of each bin; the means are NaN for empty bins."""
    confidences = np.asarray(confidences, np.float64)
    correct = np.asarray(correct, np.float64)
    # ceil(c * M) - 1 is the m - 1 with (m - 1) / M < c <= m / M.
    bins = np.clip(np.ceil(confidences * num_bins).astype(int) - 1, 0, num_bins - 1)
    counts = np.bincount(bins, minlength=num_bins)
    with np.errstate(invalid='ignore'):
        mean_confidence = np.bincount(bins, confidences, num_bins) / counts
        accuracy = np.bincount(bins, correct, num_bins) / counts
    return counts, mean_confidence, accuracy


def expected_calibration_error(confidences, correct, num_bins: int = 15) -> float:
    """ECE (Guo et al. 2017, Eq. 3); see the module docstring."""
    counts, mean_confidence, accuracy = confidence_bins(confidences, correct, num_bins)
    filled = counts > 0
    return float(np.sum(counts[filled] / counts.sum()
                        * np.abs(accuracy[filled] - mean_confidence[filled])))


def overconfidence_error(confidences, correct, num_bins: int = 15) -> float:
    """OE (Thulasidasan et al. 2019); see the module docstring."""
    counts, mean_confidence, accuracy = confidence_bins(confidences, correct, num_bins)
    filled = counts > 0
    return float(np.sum(counts[filled] / counts.sum() * mean_confidence[filled]
                        * np.maximum(mean_confidence[filled] - accuracy[filled], 0.0)))


def save_reliability_diagram(results: dict, path: str) -> None:
    """Accuracy per confidence bin as bars against the diagonal of perfect calibration."""
    import matplotlib

    matplotlib.use('Agg')
    from matplotlib import pyplot

    num_bins = len(results['bin_counts'])
    lower_edges = np.arange(num_bins) / num_bins
    accuracy = np.array([np.nan if value is None else value for value in results['bin_accuracy']])
    figure, axes = pyplot.subplots(figsize=(4.5, 4.5))
    axes.bar(lower_edges, np.nan_to_num(accuracy), width=1 / num_bins, align='edge',
             edgecolor='black', color='tab:blue', label='accuracy')
    axes.plot([0, 1], [0, 1], linestyle='--', color='gray', label='perfect calibration')
    axes.set(xlim=(0, 1), ylim=(0, 1), xlabel='confidence', ylabel='accuracy',
             title=f'ECE {100 * results["ece"]:.2f}%, OE {100 * results["oe"]:.2f}%')
    axes.legend(loc='upper left')
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)


def _confidences(context, variables, batch_index, images, labels):
    del batch_index
    probabilities = jax.nn.softmax(context.logits(variables, images), axis=-1)
    return {'confidence': probabilities.max(axis=-1),
            'correct': probabilities.argmax(axis=-1) == labels}


class Evaluator:
    """ECE and OE of the test split's predictions, and the data of the reliability diagram."""

    name = 'calibration'

    def __init__(self, context: common.EvalContext, *, batch_size: int = 0, num_bins: int = 15):
        self.context = context
        self.batch_size = batch_size or context.batch_size
        self.num_bins = num_bins
        self._confidence_fn = jax.jit(functools.partial(_confidences, context))

    def run(self, variables: dict) -> dict:
        outputs = common.map_batches(self._confidence_fn, variables,
                                     self.context.test_batches(self.batch_size),
                                     self.context.mesh)
        confidence, correct = outputs['confidence'], outputs['correct']
        counts, mean_confidence, accuracy = confidence_bins(confidence, correct, self.num_bins)

        def listed(values):  # JSON has no NaN: empty bins are None
            return [None if np.isnan(value) else float(value) for value in values]

        return {'ece': expected_calibration_error(confidence, correct, self.num_bins),
                'oe': overconfidence_error(confidence, correct, self.num_bins),
                'accuracy': float(np.mean(correct)),
                'mean_confidence': float(np.mean(confidence)),
                'num_examples': len(confidence),
                'bin_counts': counts.tolist(),
                'bin_confidence': listed(mean_confidence),
                'bin_accuracy': listed(accuracy)}

    def table(self, results: dict) -> str:
        summary = common.format_table(('metric', 'value'), [
            ('ECE (%)', 100 * results['ece']), ('OE (%)', 100 * results['oe']),
            ('accuracy (%)', 100 * results['accuracy']),
            ('mean confidence (%)', 100 * results['mean_confidence']),
            ('test images', results['num_examples'])])
        num_bins = len(results['bin_counts'])
        bins = common.format_table(
            ('confidence bin (%)', 'images', 'mean confidence (%)', 'accuracy (%)'), [
                (f'({100 * m / num_bins:.1f}, {100 * (m + 1) / num_bins:.1f}]', count,
                 '-' if confidence is None else 100 * confidence,
                 '-' if accuracy is None else 100 * accuracy)
            for m, (count, confidence, accuracy) in enumerate(zip(
                results['bin_counts'], results['bin_confidence'], results['bin_accuracy'],
                strict=True))])
        return f'{summary}\n\n{bins}'

    def write_files(self, results: dict, directory: str, name: str) -> list:
        path = os.path.join(directory, f'{name}_reliability.png')
        save_reliability_diagram(results, path)
        return [path]


if __name__ == '__main__':
    from alignmix_jax.evaluation import command

    command.run_command('calibration')
