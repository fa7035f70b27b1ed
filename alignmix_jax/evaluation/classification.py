"""Classification: top-1 and top-5 error over the whole test split (paper Table 1).

    python -m alignmix_jax.evaluation.classification --config=configs/demo.py --workdir=DIR

Padded, masked batches: every test image counts exactly once.
"""

import functools

import jax
import numpy as np

from alignmix_jax.evaluation import common


def top_k_error(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of examples whose label is not among the k largest logits.

    Ties are broken towards the lower class index (a stable sort of -logits). With fewer than
    k classes every label is among the top k.
    """
    top_k = np.argsort(-logits, axis=-1, kind='stable')[:, :k]
    return float(np.mean(~np.any(top_k == labels[:, None], axis=-1)))


def _logits(context, variables, batch_index, images, labels):
    del batch_index, labels
    return {'logits': context.logits(variables, images)}


class Evaluator:
    """Top-1 and top-5 error of the model on the test split."""

    name = 'classification'

    def __init__(self, context: common.EvalContext, *, batch_size: int = 0):
        self.context = context
        self.batch_size = batch_size or context.batch_size
        self._logits_fn = jax.jit(functools.partial(_logits, context))

    def run(self, variables: dict) -> dict:
        outputs = common.map_batches(self._logits_fn, variables,
                                     self.context.test_batches(self.batch_size),
                                     self.context.mesh)
        logits, labels = outputs['logits'], outputs['labels']
        return {'top1_error': top_k_error(logits, labels, 1),
                'top5_error': top_k_error(logits, labels, 5),
                'num_examples': len(labels)}

    def table(self, results: dict) -> str:
        return common.format_table(
            ('metric', 'value'),
            [('top-1 error (%)', 100 * results['top1_error']),
             ('top-5 error (%)', 100 * results['top5_error']),
             ('test images', results['num_examples'])])

    def write_files(self, results: dict, directory: str) -> list:
        del results, directory
        return []


if __name__ == '__main__':
    common.run_command('classification')
