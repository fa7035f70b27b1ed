"""Classification: top-1 and top-5 error over the whole test split (paper Table 1), the
accuracy and the cross-entropy loss, and with a decoder (AlignMixup/AE) its reconstruction
error. The training loop's periodic test evaluation is this evaluator too.

    python -m alignmix_jax.evaluation.classification --config=configs/demo.py --workdir=DIR

Padded, masked batches: every test image counts exactly once.
"""

import functools

import jax
import numpy as np
import optax

from alignmix_jax.evaluation import common
from alignmix_jax.method import losses


def top_k_error(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of examples whose label is not among the k largest logits.

    Ties are broken towards the lower class index (a stable sort of -logits). With fewer than
    k classes every label is among the top k.
    """
    top_k = np.argsort(-logits, axis=-1, kind='stable')[:, :k]
    return float(np.mean(~np.any(top_k == labels[:, None], axis=-1)))


def _classify_and_reconstruct(module, images):
    embedding = module.embed(module.features(images, train=False), train=False)
    return module.classify(embedding), module.decode(embedding, train=False)


def _outputs(context, variables, batch_index, images, labels):
    del batch_index
    if context.model.decoder_type == 'none':
        logits = context.logits(variables, images)
        outputs = {'logits': logits}
    else:
        # A VAE reconstructs from mu (no sampling noise at evaluation).
        normalized = context.normalize(images)
        logits, reconstructions = context.model.apply(variables, normalized,
                                                      method=_classify_and_reconstruct)
        # The mean squared error per pixel value of D(f(F(x))) against the normalised image.
        outputs = {'logits': logits,
                   'reconstruction_error': losses.reconstruction_loss(normalized,
                                                                      reconstructions)}
    outputs['loss'] = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return outputs


class Evaluator:
    """Top-1 and top-5 error, accuracy, loss (and reconstruction error) on the test split."""

    name = 'classification'

    def __init__(self, context: common.EvalContext, *, batch_size: int = 0):
        self.context = context
        self.batch_size = batch_size or context.batch_size
        self._outputs_fn = jax.jit(functools.partial(_outputs, context))

    def run(self, variables: dict) -> dict:
        outputs = common.map_batches(self._outputs_fn, variables,
                                     self.context.test_batches(self.batch_size),
                                     self.context.mesh)
        logits, labels = outputs['logits'], outputs['labels']
        results = {'top1_error': top_k_error(logits, labels, 1),
                   'top5_error': top_k_error(logits, labels, 5),
                   'accuracy': float(np.mean(np.argmax(logits, -1) == labels)),
                   'loss': float(np.mean(outputs['loss'])), 'num_examples': len(labels)}
        if 'reconstruction_error' in outputs:
            results['reconstruction_error'] = float(np.mean(outputs['reconstruction_error']))
        return results

    def table(self, results: dict) -> str:
        return common.format_table(
            ('metric', 'value'),
            [('top-1 error (%)', 100 * results['top1_error']),
             ('top-5 error (%)', 100 * results['top5_error']),
             ('loss', results['loss']),
             *([('reconstruction error', results['reconstruction_error'])]
               if 'reconstruction_error' in results else []),
             ('test images', results['num_examples'])])

    def write_files(self, results: dict, directory: str, name: str) -> list:
        del results, directory, name
        return []


if __name__ == '__main__':
    from alignmix_jax.evaluation import command

    command.run_command('classification')
