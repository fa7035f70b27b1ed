"""Robustness: top-1 error under FGSM and PGD attacks (paper Table 2).

    python -m alignmix_jax.evaluation.robustness --config=configs/demo.py --workdir=DIR

The paper follows the protocol of Kim et al. (2020, Puzzle Mix): FGSM (Goodfellow et al. 2015)
in an l-inf ball of 8/255, one step of the full radius and no random start; PGD (Madry et al.
2018) in a ball of 4/255 with steps of 2/255. The paper gives only that radius and step size:
the 20 steps and the uniform random start are this project's choices (`pgd_steps`,
`pgd_random_start`; the JSON records them under `pgd_protocol_choices`). Pixels are attacked in
[0, 1]: the normalisation is part of the attacked function, and every iterate is clipped to
[0, 1]. The loss is the cross-entropy on the true label; the model is in eval mode (BatchNorm
running averages), so an example's attack does not depend on the rest of its batch.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from alignmix_jax.evaluation import common


def cross_entropy_loss(logits_fn: Callable, labels: jax.Array) -> Callable:
    """pixels -> summed cross-entropy on the true labels.

    Summed, not averaged, so that each example's gradient is its own loss's gradient whatever
    the batch size (the attacks use only its sign, but a mean would underflow in large batches).
    """
    def loss(images):
        return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits_fn(images),
                                                                       labels))
    return loss


def fgsm(loss_fn: Callable, images: jax.Array, *, epsilon: float) -> jax.Array:
    """FGSM (Goodfellow et al. 2015, Eq. 3): x + eps * sign(grad_x loss), clipped to [0, 1]."""
    gradient = jax.grad(loss_fn)(images)
    return jnp.clip(images + epsilon * jnp.sign(gradient), 0.0, 1.0)


def pgd(loss_fn: Callable, images: jax.Array, key: jax.Array, *, epsilon: float,
        step_size: float, num_steps: int, random_start: bool = True) -> jax.Array:
    """PGD (Madry et al. 2018, Eq. 2): signed gradient ascent projected on the ball and [0, 1].

    Starts from x + U(-eps, eps) (clipped to [0, 1]), or from x itself without `random_start`;
    each of `num_steps` steps adds step_size * sign(grad), then projects onto
    {|x' - x|_inf <= eps} and clips to [0, 1].
    """
    lower = jnp.clip(images - epsilon, 0.0, 1.0)
    upper = jnp.clip(images + epsilon, 0.0, 1.0)
    noise = jax.random.uniform(key, images.shape, images.dtype, -epsilon, epsilon)
    start = jnp.clip(images + noise, 0.0, 1.0) if random_start else images

    def ascent_step(_, adversarial):
        gradient = jax.grad(loss_fn)(adversarial)
        # Clipping to [x - eps, x + eps] intersected with [0, 1] is the projection on the
        # intersection, as both are boxes.
        return jnp.clip(adversarial + step_size * jnp.sign(gradient), lower, upper)

    return jax.lax.fori_loop(0, num_steps, ascent_step, start)


def _attacked_predictions(context, options, key, variables, batch_index, images, labels):
    pixels = images.astype(jnp.float32) / 255.0

    def logits_fn(unit_images):
        return context.logits(variables, unit_images)

    loss_fn = cross_entropy_loss(logits_fn, labels)
    fgsm_images = fgsm(loss_fn, pixels, epsilon=options['fgsm_epsilon'])
    pgd_images = pgd(loss_fn, pixels, jax.random.fold_in(key, batch_index),
                     epsilon=options['pgd_epsilon'], step_size=options['pgd_step_size'],
                     num_steps=options['pgd_steps'],
                     random_start=options['pgd_random_start'])
    return {name: jnp.argmax(logits_fn(attacked), axis=-1)
            for name, attacked in (('clean', pixels), ('fgsm', fgsm_images),
                                   ('pgd', pgd_images))}


class Evaluator:
    """Top-1 error on clean, FGSM-attacked and PGD-attacked test images."""

    name = 'robustness'

    def __init__(self, context: common.EvalContext, *, batch_size: int = 0,
                 fgsm_epsilon: float = 8 / 255, pgd_epsilon: float = 4 / 255,
                 pgd_step_size: float = 2 / 255, pgd_steps: int = 20, num_examples: int = 0,
                 seed: int = 0, pgd_random_start: bool = True):
        self.context = context
        self.batch_size = batch_size or context.batch_size
        self.num_examples = num_examples
        self.options = dict(fgsm_epsilon=fgsm_epsilon, pgd_epsilon=pgd_epsilon,
                            pgd_step_size=pgd_step_size, pgd_steps=pgd_steps,
                            pgd_random_start=bool(pgd_random_start))
        self._predict_fn = jax.jit(functools.partial(
            _attacked_predictions, context, self.options, jax.random.PRNGKey(seed)))

    def run(self, variables: dict) -> dict:
        batches = self.context.test_batches(self.batch_size, self.num_examples)
        outputs = common.map_batches(self._predict_fn, variables, batches, self.context.mesh)
        labels = outputs['labels']
        results = {f'{name}_top1_error': float(np.mean(outputs[name] != labels))
                   for name in ('clean', 'fgsm', 'pgd')}
        results['num_examples'] = len(labels)
        results.update(self.options)
        # The paper states the radius and step size only; these two are ours.
        results['pgd_protocol_choices'] = ('pgd_steps and pgd_random_start are this '
                                           "project's choices; the paper gives only "
                                           'pgd_epsilon 4/255 and pgd_step_size 2/255')
        return results

    def table(self, results: dict) -> str:
        return common.format_table(
            ('attack', 'top-1 error (%)'),
            [('none (clean)', 100 * results['clean_top1_error']),
             (f'FGSM, eps {255 * results["fgsm_epsilon"]:g}/255',
              100 * results['fgsm_top1_error']),
             (f'PGD, eps {255 * results["pgd_epsilon"]:g}/255, {results["pgd_steps"]} steps of '
              f'{255 * results["pgd_step_size"]:g}/255', 100 * results['pgd_top1_error'])]
        ) + (f'\n({results["num_examples"]} test images; PGD steps and '
             f'{"random" if results["pgd_random_start"] else "clean"} start: our choices, the '
             'paper gives only the radius and step size)')

    def write_files(self, results: dict, directory: str, name: str) -> list:
        del results, directory, name
        return []


if __name__ == '__main__':
    from alignmix_jax.evaluation import command

    command.run_command('robustness')
