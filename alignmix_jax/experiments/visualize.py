"""Pictures of the alignment: decoded morphs (paper Fig. 3), correspondences, the toy of Fig. 2.

    python -m alignmix_jax.experiments.visualize --config=configs/demo.py \\
        --config.model.decoder=ae --workdir=runs/demo_ae

reads the latest checkpoint in DIR (trained with a decoder, `model.decoder` 'ae' or 'vae') and
writes PNGs into `DIR/figures/`:

- `morph_<k>.png`, for pairs (x, x') of test images of different classes: decoded images
  D(f(.)) of interpolated feature tensors, lambda from 0 to 1 across the columns (lambda is the
  weight of x's side), x' and x themselves at the two ends. Rows: A and A' mixed without
  alignment; A mixed with A aligned to A' (Eq. 12: at lambda = 0, the pose of x with the
  texture of x'); A' aligned to A mixed with A' (Eq. 13, drawn as mix_{1-lambda}(A', A~') so
  the row also runs from x' to x: at lambda = 1, the pose of x' with the texture of x).
- `correspondence_<k>.png`: x and x' side by side over their h x w grid of feature cells,
  the strongest entries of the assignment R = r P between A and A' drawn as lines.
- `toy_alignment.png`: Fig. 2's toy example: two sets of 16 points in 2-D, the couplings of
  the transport plan, R, the set A aligned to A' and the interpolations.
- `morph_difference.json`: what alignment changes in the morphs as a number: per lambda, the
  mean absolute difference in [0, 1] pixels between each aligned row (Eq. 12, Eq. 13) and the
  unaligned row, over `--difference_pairs` test pairs (`morph_differences`); also printed.

Figure sizes in pixels are fixed (`morph_figure_size`, `CORRESPONDENCE_SIZE`, `TOY_SIZE`).
Every alignment goes through `alignment.transport_plan` and `alignment.apply_plan` with the
config's epsilon and number of Sinkhorn iterations, as in training.
"""

import json
import os

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from alignmix_jax.data import augmentation
from alignmix_jax.evaluation import common as evaluation_common
from alignmix_jax.method import alignment, mixup
from alignmix_jax.runtime.command_line import hide_library_info, one_line_errors, parse_flags
from alignmix_jax.settings import config_checks

matplotlib.use('Agg')  # files only, no display
from matplotlib import pyplot as plt  # noqa: E402  (after the backend is chosen)

DPI = 100
# Inches: a column of the morph grid, the row-label margin, the title and axis-label margins.
_CELL, _LABEL_MARGIN, _TOP_MARGIN, _BOTTOM_MARGIN = 1.0, 2.0, 0.7, 0.5
CORRESPONDENCE_SIZE = (1100, 440)
TOY_SIZE = (1800, 600)
MORPH_ROWS = ('unaligned\nmix$_\\lambda$(A, A\u2032)',
              'A aligned to A\u2032, Eq. (12)\nmix$_\\lambda$(A, \u00c3)',
              'A\u2032 aligned to A, Eq. (13)\nmix$_{1-\\lambda}$(A\u2032, \u00c3\u2032)')

FLAGS = flags.FLAGS


def morph_figure_size(num_lambdas: int) -> tuple[int, int]:
    """(width, height) in pixels of a morph grid with `num_lambdas` interpolation columns."""
    width = _LABEL_MARGIN + _CELL * (num_lambdas + 2)
    height = _TOP_MARGIN + _CELL * len(MORPH_ROWS) + _BOTTOM_MARGIN
    return round(width * DPI), round(height * DPI)


def _decode_features(module, features):
    """D(f(A)) in evaluation mode (a VAE decodes mu)."""
    return module.decode(module.embed(features, train=False), train=False)


def encode(model, variables, images: jax.Array) -> jax.Array:
    """A = F(x) of normalised images, in evaluation mode."""
    features = model.apply(variables, images, train=False, method='features')
    if isinstance(features, tuple):
        raise ValueError(f'the pictures need a feature tensor A (b, h, w, c); '
                         f'{model.encoder_name} represents A as tokens: use a convolutional '
                         'or Swin backbone')
    return features


def decode(model, variables, features: jax.Array) -> jax.Array:
    """D(f(A)): normalised images (b, h, w, 3) decoded from feature tensors (b, h', w', c)."""
    return model.apply(variables, features, method=_decode_features)


def morph_grid(model, variables, image: jax.Array, partner: jax.Array, lambdas, *,
               epsilon: float = 0.1, num_iters: int = 100) -> np.ndarray:
    """Decoded interpolations of one pair: (3, len(lambdas), h, w, 3) normalised images.

    `image` (x) and `partner` (x') are normalised (h, w, 3) images. Rows as in the module doc:
    mix_l(A, A'), mix_l(A, A~) (Eq. 12) and mix_{1-l}(A', A~') (Eq. 13), with A~ = A' R^T the
    features of x' aligned to A (Eq. 10) and A~' those of x aligned to A' (a plan from A' to A,
    as the `feature_prime` training mode solves it).
    """
    features = encode(model, variables, jnp.stack([image, partner]))
    anchor, other = features[0], features[1]
    # Eq. (10): A aligned to A' is A' R^T; and A' aligned to A from the plan of A' to A.
    aligned = alignment.apply_plan(
        alignment.transport_plan(anchor, other, epsilon=epsilon, num_iters=num_iters), other)
    aligned_prime = alignment.apply_plan(
        alignment.transport_plan(other, anchor, epsilon=epsilon, num_iters=num_iters), anchor)
    rows = []
    for lam in lambdas:
        rows.append([mixup.mix(anchor, other, lam),
                     mixup.mix(anchor, aligned, lam),  # Eq. (12)
                     mixup.mix(other, aligned_prime, 1.0 - lam)])  # Eq. (13)
    mixed = jnp.stack([jnp.stack(columns) for columns in zip(*rows, strict=True)])
    num_rows, num_columns = mixed.shape[:2]
    decoded = decode(model, variables, mixed.reshape(num_rows * num_columns, *mixed.shape[2:]))
    return np.asarray(decoded).reshape(num_rows, num_columns, *decoded.shape[1:])


def row_differences(grid_pixels: np.ndarray) -> np.ndarray:
    """(2, lambdas): per column, the mean absolute difference between the Eq. (12) row and the
    unaligned row, and between the Eq. (13) row and the unaligned row, of a morph grid in
    pixels (3, lambdas, h, w, 3). Zero at lambda = 1 for Eq. (12) and at 0 for Eq. (13), where
    those rows are x and x' themselves."""
    unaligned = grid_pixels[0]
    return np.abs(grid_pixels[1:] - unaligned[None]).mean(axis=(2, 3, 4))


def morph_differences(model, variables, pairs_normalised: np.ndarray, lambdas, *, mean, std,
                      epsilon: float = 0.1, num_iters: int = 100) -> dict:
    """`row_differences` averaged over pairs (k, 2, h, w, 3) of normalised images: {'lambdas',
    'eq12', 'eq13' (per lambda), 'pairs'}."""
    per_pair = [row_differences(to_pixels(
        morph_grid(model, variables, pair[0], pair[1], lambdas, epsilon=epsilon,
                   num_iters=num_iters), mean, std)) for pair in pairs_normalised]
    means = np.mean(per_pair, axis=0)
    return {'lambdas': [float(lam) for lam in lambdas], 'eq12': means[0].tolist(),
            'eq13': means[1].tolist(), 'pairs': len(per_pair)}


def to_pixels(images, mean, std) -> np.ndarray:
    """Normalised images back to [0, 1] pixels for display."""
    return np.clip(np.asarray(images) * np.asarray(std) + np.asarray(mean), 0.0, 1.0)


def plot_morph_grid(path: str, grid_pixels: np.ndarray, source_pixels, partner_pixels, lambdas,
                    names: tuple[str, str]) -> None:
    """Writes a morph grid: rows of MORPH_ROWS, x' | lambda columns | x."""
    num_rows, num_lambdas = grid_pixels.shape[:2]
    width, height = morph_figure_size(num_lambdas)
    figure = plt.figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    left = _LABEL_MARGIN / (width / DPI)
    bottom = _BOTTOM_MARGIN / (height / DPI)
    cell_w, cell_h = _CELL / (width / DPI), _CELL / (height / DPI)
    for row in range(num_rows):
        for column in range(num_lambdas + 2):
            axis = figure.add_axes((left + column * cell_w + 0.04 * cell_w,
                                    bottom + (num_rows - 1 - row) * cell_h + 0.04 * cell_h,
                                    0.92 * cell_w, 0.92 * cell_h))
            if column == 0:
                picture, title = partner_pixels, f"x\u2032: {names[1]}"
            elif column == num_lambdas + 1:
                picture, title = source_pixels, f'x: {names[0]}'
            else:
                picture, title = grid_pixels[row, column - 1], f'\u03bb={lambdas[column - 1]:.2f}'
            axis.imshow(picture, interpolation='nearest')
            axis.set_xticks([])
            axis.set_yticks([])
            if column in (0, num_lambdas + 1):
                for spine in axis.spines.values():
                    spine.set_edgecolor('tab:red' if column == 0 else 'tab:blue')
                    spine.set_linewidth(2)
            if row == 0:
                axis.set_title(title, fontsize=9)
            if column == 0:
                axis.set_ylabel(MORPH_ROWS[row], fontsize=9, rotation=0, ha='right',
                                va='center', labelpad=6)
    figure.suptitle('Decoded interpolations D(f(.)) of A = F(x) and A\u2032 = F(x\u2032); '
                    '\u03bb is the weight of x', fontsize=11, y=1 - 0.2 / (height / DPI))
    figure.text(left + (num_lambdas + 2) * cell_w / 2, 0.15 / (height / DPI),
                '\u03bb: 0 (x\u2032 side) \u2192 1 (x side)', ha='center', fontsize=10)
    figure.savefig(path, dpi=DPI)
    plt.close(figure)


def plot_correspondence(path: str, source_pixels, partner_pixels, plan: np.ndarray,
                        names: tuple[str, str], num_lines: int = 16) -> None:
    """x and x' side by side over their feature grids, the strongest entries of R as lines."""
    height, width = source_pixels.shape[:2]
    num_positions = plan.shape[0]
    side = int(round(np.sqrt(num_positions)))
    assignment = num_positions * np.asarray(plan)  # R = r P
    gap = width // 2
    canvas = np.ones((height, 2 * width + gap, 3))
    canvas[:, :width] = source_pixels
    canvas[:, width + gap:] = partner_pixels
    figure = plt.figure(figsize=(CORRESPONDENCE_SIZE[0] / DPI, CORRESPONDENCE_SIZE[1] / DPI),
                        dpi=DPI)
    axis = figure.add_axes((0.02, 0.12, 0.68, 0.72))
    axis.imshow(canvas, interpolation='nearest', extent=(0, 2 * width + gap, height, 0))
    cell = height / side
    for offset in (0, width + gap):
        for k in range(side + 1):
            axis.plot([offset, offset + width], [k * cell, k * cell], color='white', lw=0.6,
                      alpha=0.6)
            axis.plot([offset + k * cell, offset + k * cell], [0, height], color='white',
                      lw=0.6, alpha=0.6)
    strongest = np.argsort(assignment, axis=None)[::-1][:num_lines]
    # One colour per cell of x, so lines leaving the same cell are recognisable as such.
    colours = plt.get_cmap('tab20')
    top = assignment.flat[strongest[0]]
    for index in strongest[::-1]:  # the strongest drawn last, on top
        i, j = divmod(int(index), num_positions)
        (row_i, col_i), (row_j, col_j) = divmod(i, side), divmod(j, side)
        weight = assignment[i, j] / top
        axis.plot([(col_i + 0.5) * cell, width + gap + (col_j + 0.5) * cell],
                  [(row_i + 0.5) * cell, (row_j + 0.5) * cell], color=colours(i % 20),
                  lw=0.6 + 2.4 * weight, alpha=0.9, marker='o', markersize=4)
    axis.set_xlim(0, 2 * width + gap)
    axis.set_ylim(height, 0)
    axis.set_xticks([width / 2, width + gap + width / 2])
    axis.set_xticklabels([f'x: {names[0]} (cells i of A)',
                          f'x\u2032: {names[1]} (cells j of A\u2032)'], fontsize=10)
    axis.set_yticks([])
    axis.set_title(f'The {num_lines} strongest entries of R = rP between the {side}x{side} '
                   f'cells of A and A\u2032\n(line from cell i to cell j, width \u221d R$_{{ij}}$)',
                   fontsize=11)
    matrix_axis = figure.add_axes((0.75, 0.2, 0.17, 0.6))
    image = matrix_axis.imshow(assignment, cmap='viridis', vmin=0.0)
    matrix_axis.set_title('R (rows sum to 1 once converged)', fontsize=9)
    matrix_axis.set_xlabel('j (cell of A\u2032)')
    matrix_axis.set_ylabel('i (cell of A)')
    figure.colorbar(image, cax=figure.add_axes((0.94, 0.2, 0.015, 0.6)))
    figure.savefig(path, dpi=DPI)
    plt.close(figure)


def toy_point_sets(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two overlapping sets of 16 points in 2-D as in Fig. 2: A on a ring, A' on a square.

    A' is listed in random order, so mixing A and A' index by index (no alignment) pairs
    unrelated points.
    """
    rng = np.random.default_rng(seed)
    angles = np.linspace(0, 2 * np.pi, 16, endpoint=False)
    ring = 1.2 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    side = np.linspace(-1.5, 1.5, 5)[:4]
    edge = np.full(4, 1.5)
    square = np.concatenate([np.stack([side, -edge], 1), np.stack([edge, side], 1),
                             np.stack([-side, edge], 1), np.stack([-edge, -side], 1)])
    square = square * np.array([1.1, 0.9]) + np.array([0.5, 0.3])
    jitter = 0.08
    points_a = ring + rng.normal(0, jitter, ring.shape)
    points_b = rng.permutation(square) + rng.normal(0, jitter, square.shape)
    return points_a.astype(np.float32), points_b.astype(np.float32)


def toy_alignment(points_a: np.ndarray, points_b: np.ndarray, *, epsilon: float = 0.1,
                  num_iters: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """The plan P (16, 16) between two sets of 16 points and A aligned to A' (Eq. 10), (16, 2).

    The points are read as 4x4 "feature tensors" of 2 channels, so that the same
    `transport_plan` and `apply_plan` as in training do the work.
    """
    num_points, dims = points_a.shape
    side = int(round(np.sqrt(num_points)))
    tensor_a = jnp.asarray(points_a).reshape(side, side, dims)
    tensor_b = jnp.asarray(points_b).reshape(side, side, dims)
    plan = alignment.transport_plan(tensor_a, tensor_b, epsilon=epsilon, num_iters=num_iters)
    aligned = alignment.apply_plan(plan, tensor_b).reshape(num_points, dims)
    return np.asarray(plan), np.asarray(aligned)


def plot_toy(path: str, points_a, points_b, plan, aligned, lambdas=(0.25, 0.5, 0.75)) -> None:
    """Fig. 2 as four panels: couplings, R, the aligned set, the interpolations."""
    assignment = plan.shape[0] * plan
    figure, axes = plt.subplots(1, 4, figsize=(TOY_SIZE[0] / DPI, TOY_SIZE[1] / DPI), dpi=DPI)
    style_a = dict(color='tab:blue', s=28, label='A', zorder=3)
    style_b = dict(color='tab:red', s=28, label='A\u2032', zorder=3)
    couplings = axes[0]
    for i in range(plan.shape[0]):
        for j in range(plan.shape[1]):
            if assignment[i, j] > 0.05:
                couplings.plot([points_a[i, 0], points_b[j, 0]], [points_a[i, 1], points_b[j, 1]],
                               color='gray', lw=1.5 * assignment[i, j],
                               alpha=float(min(1.0, assignment[i, j])))
    couplings.scatter(*points_a.T, **style_a)
    couplings.scatter(*points_b.T, **style_b)
    couplings.set_title('A, A\u2032 and the couplings of P')
    image = axes[1].imshow(assignment, cmap='viridis', vmin=0.0)
    axes[1].set_title('assignment R = rP')
    axes[1].set_xlabel('j (point of A\u2032)')
    axes[1].set_ylabel('i (point of A)')
    figure.colorbar(image, ax=axes[1], fraction=0.046)
    faded = dict(alpha=0.25, s=28, zorder=2)
    axes[2].scatter(*points_a.T, color='tab:blue', label='A', **faded)
    axes[2].scatter(*points_b.T, color='tab:red', label='A\u2032', **faded)
    axes[2].scatter(*aligned.T, color='tab:purple', marker='s', s=28, zorder=3,
                    label='\u00c3 = A\u2032R\u1d40 (Eq. 10)')
    for i in range(len(points_a)):
        axes[2].annotate('', xy=aligned[i], xytext=points_a[i],
                         arrowprops=dict(arrowstyle='->', color='gray', lw=0.8))
    axes[2].set_title('A aligned to A\u2032')
    axes[3].scatter(*points_a.T, color='tab:blue', label='A', **faded)
    axes[3].scatter(*aligned.T, color='tab:purple', marker='s', label='\u00c3', **faded)
    unaligned = 0.5 * points_a + 0.5 * points_b  # index by index, A' in its own order
    axes[3].scatter(*unaligned.T, color='black', marker='x', s=22, zorder=3,
                    label='mix$_{0.5}$(A, A\u2032), unaligned')
    greens = plt.get_cmap('Greens')
    for k, lam in enumerate(lambdas):
        mixed = lam * points_a + (1 - lam) * aligned  # Eq. (12)
        axes[3].scatter(*mixed.T, color=greens(0.4 + 0.5 * k / max(1, len(lambdas) - 1)),
                        s=20, zorder=3, label=f'mix$_{{{lam:g}}}$(A, \u00c3)')
    axes[3].set_title('interpolations: aligned (Eq. 12) vs not')
    for axis in (axes[0], axes[2], axes[3]):
        axis.set_aspect('equal', adjustable='datalim')
        axis.set_xlabel('coordinate 1')
        axis.set_ylabel('coordinate 2')
        axis.legend(fontsize=8, loc='upper center', bbox_to_anchor=(0.5, -0.2), ncol=2,
                    frameon=False)
    figure.suptitle('Toy alignment (paper Fig. 2): 16 points in 2-D, Sinkhorn with '
                    '\u03b5 = 0.1, 100 iterations', fontsize=11)
    figure.subplots_adjust(left=0.04, right=0.98, bottom=0.3, top=0.86, wspace=0.35)
    figure.savefig(path, dpi=DPI)
    plt.close(figure)


def pick_pairs(labels: np.ndarray, num_pairs: int, seed: int) -> list[tuple[int, int]]:
    """`num_pairs` pairs of test indices (i, j) with different labels, fixed by `seed`."""
    rng = np.random.default_rng(seed)
    pairs = []
    while len(pairs) < num_pairs:
        i, j = (int(k) for k in rng.choice(len(labels), 2, replace=False))
        if labels[i] != labels[j]:
            pairs.append((i, j))
    return pairs


def restore_model(config, workdir: str):
    """(model, variables, dataset) of the latest checkpoint in `workdir` (no optimizer state)."""
    if config.model.decoder == 'none':
        raise ValueError('the pictures decode through D: train with --config.model.decoder=ae '
                         '(or vae) and pass the same override here')
    context, variables, step = evaluation_common.load(config, workdir)
    logging.info('Restored the variables of step %d from %s.', step, workdir)
    return context.model, variables, context.dataset


def write_figures(config, workdir: str, *, num_pairs: int = 4, num_lambdas: int = 9,
                  seed: int = 0, difference_pairs: int = 100) -> list[str]:
    """Writes the PNGs described in the module doc into `workdir/figures`; returns their paths."""
    workdir = os.path.abspath(workdir)  # orbax reads absolute paths only
    model, variables, dataset = restore_model(config, workdir)
    figures_dir = os.path.join(workdir, 'figures')
    os.makedirs(figures_dir, exist_ok=True)
    mean, std = config.dataset.mean, config.dataset.std
    epsilon, num_iters = config.mixup.epsilon, config.mixup.sinkhorn_iters
    lambdas = np.linspace(0.0, 1.0, num_lambdas)
    test = dataset.test
    names = dataset.class_names
    paths = []
    for k, (i, j) in enumerate(pick_pairs(test.labels, num_pairs, seed)):
        pair_names = (names[test.labels[i]], names[test.labels[j]])
        normalised = augmentation.normalize(test.images[np.array([i, j])], mean, std)
        grid = morph_grid(model, variables, normalised[0], normalised[1], lambdas,
                          epsilon=epsilon, num_iters=num_iters)
        path = os.path.join(figures_dir, f'morph_{k}.png')
        plot_morph_grid(path, to_pixels(grid, mean, std), test.images[i] / 255.0,
                        test.images[j] / 255.0, lambdas, pair_names)
        paths.append(path)
        features = encode(model, variables, normalised)
        plan = alignment.transport_plan(features[0], features[1], epsilon=epsilon,
                                        num_iters=num_iters)
        path = os.path.join(figures_dir, f'correspondence_{k}.png')
        plot_correspondence(path, test.images[i] / 255.0, test.images[j] / 255.0,
                            np.asarray(plan), pair_names)
        paths.append(path)
    points_a, points_b = toy_point_sets(seed)
    plan, aligned = toy_alignment(points_a, points_b, epsilon=epsilon, num_iters=num_iters)
    path = os.path.join(figures_dir, 'toy_alignment.png')
    plot_toy(path, points_a, points_b, plan, aligned)
    paths.append(path)
    if difference_pairs:
        chosen = np.array(pick_pairs(test.labels, difference_pairs, seed + 1))
        pairs = augmentation.normalize(test.images[chosen.reshape(-1)], mean, std)
        differences = morph_differences(
            model, variables, np.asarray(pairs).reshape(len(chosen), 2, *pairs.shape[1:]),
            lambdas, mean=mean, std=std, epsilon=epsilon, num_iters=num_iters)
        path = os.path.join(figures_dir, 'morph_difference.json')
        with open(path, 'w') as output:
            json.dump(differences, output, indent=2)
        paths.append(path)
    return paths


flags.DEFINE_string('workdir', None, 'Training directory: reads its latest checkpoint and '
                    'writes figures/ into it.')
flags.mark_flags_as_required(['workdir'])
config_flags.DEFINE_config_file('config', None, 'The training configuration file.',
                                lock_config=True)
flags.mark_flags_as_required(['config'])
flags.DEFINE_integer('num_pairs', 4, 'Image pairs to draw.')
flags.DEFINE_integer('num_lambdas', 9, 'Interpolation columns of the morph grids.')
flags.DEFINE_integer('seed', 0, 'Choice of the pairs and of the toy point sets.')
flags.DEFINE_integer('difference_pairs', 100, 'Test pairs averaged in morph_difference.json '
                     '(0: not measured).')


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
    logging.get_absl_handler().addFilter(hide_library_info)
    with one_line_errors():
        config_checks.validate(FLAGS.config)
        paths = write_figures(FLAGS.config, FLAGS.workdir, num_pairs=FLAGS.num_pairs,
                              num_lambdas=FLAGS.num_lambdas, seed=FLAGS.seed,
                              difference_pairs=FLAGS.difference_pairs)
    for path in paths:
        print(path)


if __name__ == '__main__':
    app.run(main, flags_parser=parse_flags)
