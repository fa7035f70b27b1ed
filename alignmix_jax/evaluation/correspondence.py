"""Correspondences that can be checked: does the plan send each cell of A to its true partner?

    python -m alignmix_jax.evaluation.correspondence --config=configs/demo.py --workdir=DIR

For a pair whose true correspondence is known, the transport plan (Eq. 9) should put the mass
of each cell of A on the cell of A' that shows the same part of the image:

- 'flip': x' is x flipped left-right; cell (i, j) of an h x w grid shows what cell
  (i, w - 1 - j) of x' shows;
- 'shift': x' is x moved right by `shift_cells` cells of A (image_width / w pixels each),
  the uncovered strip on the left zero in the network's normalised input (the dataset's mean
  colour, as a convolution's zero padding sees it, rather than a black bar with strong edges);
  cell (i, j) corresponds to cell (i, j + shift_cells), and the cells that leave the frame
  have no partner and are not counted.

Reported over a fixed subset of the test set (`num_examples`): the share of R's mass on the true
partner cell, averaged over cells and images (`alignment.partner_share`: a share of the mass
each cell sends, so that unconverged plans, whose rows carry more or less than 1/r, give shares
in [0, 1] too), the share it leaves on the same cell (where an alignment that ignored content,
R = I, would put all of it), the mean marginal error of the plans, and chance, 1/r: a plan
that knew nothing (uniform R). The plans
use the run's own `mixup.epsilon`, `mixup.sinkhorn_iters` and `mixup.cost_scale`, on the
feature tensor A = F(x) of the model in eval mode, as the training step aligns it.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from alignmix_jax.evaluation import common
from alignmix_jax.method import alignment

TRANSFORMS = ('flip', 'shift')


def flip_partners(height: int, width: int) -> np.ndarray:
    """(h w,) int32: the partner of each cell (row-major) when x' is x flipped left-right."""
    rows, columns = np.divmod(np.arange(height * width), width)
    return (rows * width + (width - 1 - columns)).astype(np.int32)


def shift_partners(height: int, width: int, cells: int = 1) -> np.ndarray:
    """(h w,) int32: the partner of each cell when x' is x moved right by `cells` cells, -1
    for the cells that leave the frame."""
    rows, columns = np.divmod(np.arange(height * width), width)
    moved = columns + cells
    return np.where(moved < width, rows * width + moved, -1).astype(np.int32)


def shift_right(images: jax.Array, pixels: int) -> jax.Array:
    """(b, h, w, c) images moved right by `pixels`, the uncovered columns zero."""
    if not 0 < pixels < images.shape[2]:
        raise ValueError(f'the shift must be between 1 and {images.shape[2] - 1} pixels, '
                         f'got {pixels}: lower evals.correspondence.shift_cells')
    return jnp.pad(images[:, :, :-pixels], ((0, 0), (0, 0), (pixels, 0), (0, 0)))


def _grid(features):
    # A transformer's A is its tokens (patch grid, class token): the plan aligns the grid.
    return features[0] if isinstance(features, tuple) else features


def _shares(context, shift_cells, variables, batch_index, images, labels):
    del batch_index, labels
    mixup_config = context.config.mixup
    solve = functools.partial(alignment.transport_plan, epsilon=mixup_config.epsilon,
                              num_iters=mixup_config.sinkhorn_iters,
                              cost_scale=mixup_config.cost_scale)

    def features(inputs):
        return _grid(context.model.apply(variables, inputs, train=False,
                                         method=context.model.features))

    inputs = context.normalize(images)
    anchor = features(inputs)
    height, width = anchor.shape[1:3]
    if inputs.shape[2] % width:
        raise ValueError(f'a shift by whole cells needs the image width ({inputs.shape[2]}) '
                         f'to be a multiple of the width of A ({width})')
    partners = {'flip': flip_partners(height, width),
                'shift': shift_partners(height, width, shift_cells)}
    transformed = {'flip': inputs[:, :, ::-1],
                   'shift': shift_right(inputs, shift_cells * (inputs.shape[2] // width))}
    same_cell = np.arange(height * width, dtype=np.int32)
    outputs = {}
    for name in TRANSFORMS:
        plan = solve(anchor, features(transformed[name]))
        outputs[f'{name}_share'] = alignment.partner_share(plan, partners[name])
        outputs[f'{name}_same_cell_share'] = alignment.partner_share(plan, same_cell)
        outputs[f'{name}_marginal_error'] = alignment.marginal_error(plan)
    outputs['num_cells'] = jnp.full(anchor.shape[:1], height * width, jnp.int32)
    return outputs


class Evaluator:
    """The share of the plan's mass on the true partner cell for flipped and shifted pairs."""

    name = 'correspondence'

    def __init__(self, context: common.EvalContext, *, batch_size: int = 0,
                 num_examples: int = 500, shift_cells: int = 1):
        if shift_cells < 1:
            raise ValueError(f'evals.correspondence.shift_cells must be >= 1, got {shift_cells}')
        if context.config.mixup.cost_scale not in alignment.COST_SCALES:
            raise ValueError(f'mixup.cost_scale must be one of {alignment.COST_SCALES}, got '
                             f'{context.config.mixup.cost_scale!r}')
        self.context = context
        self.batch_size = batch_size or context.batch_size
        self.num_examples = num_examples
        self.shift_cells = shift_cells
        self._shares_fn = jax.jit(functools.partial(_shares, context, shift_cells))

    def run(self, variables: dict) -> dict:
        outputs = common.map_batches(
            self._shares_fn, variables,
            self.context.test_batches(self.batch_size, self.num_examples), self.context.mesh)
        num_cells = int(outputs['num_cells'][0])
        results = {name: float(np.mean(values)) for name, values in outputs.items()
                   if name not in ('labels', 'num_cells')}
        results.update(chance=1.0 / num_cells, num_cells=num_cells,
                       num_examples=len(outputs['labels']), shift_cells=self.shift_cells,
                       epsilon=float(self.context.config.mixup.epsilon),
                       sinkhorn_iters=int(self.context.config.mixup.sinkhorn_iters),
                       cost_scale=self.context.config.mixup.cost_scale)
        return results

    def table(self, results: dict) -> str:
        rows = [(f'x vs {name}(x)', 100 * results[f'{name}_share'],
                 100 * results[f'{name}_same_cell_share'],
                 f'{results[f"{name}_marginal_error"]:.4f}')
                for name in TRANSFORMS]
        rows.append(('chance (1/r)', 100 * results['chance'], 100 * results['chance'], '-'))
        return (common.format_table(('pair', 'on true partner (%)', 'on same cell (%)',
                                     'marginal error'), rows)
                + f'\n({results["num_examples"]} test images, A with {results["num_cells"]} '
                f'cells, shift {results["shift_cells"]} cell(s), eps {results["epsilon"]}, '
                f'{results["sinkhorn_iters"]} iterations, cost_scale {results["cost_scale"]})')

    def write_files(self, results: dict, directory: str, name: str) -> list:
        del results, directory, name
        return []


if __name__ == '__main__':
    from alignmix_jax.evaluation import command

    command.run_command('correspondence')
