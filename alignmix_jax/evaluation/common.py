"""What all evaluations share: the evaluator interface, loading, batching and writing results.

An evaluator (one class `Evaluator` per module of this package, as big_vision's evaluators) is

    Evaluator(context: EvalContext, **options)   options: the kind's `config.evals.<kind>`
        .name: str                               the kind; the command writes eval/<name>.json
        .run(variables) -> dict                  named figures ({'top1_error': 0.42, ...}) of
                                                 the model variables {'params', 'batch_stats'}
        .table(results) -> str                   the results as the command prints them
        .write_files(results, directory, name)   -> the paths it wrote (e.g. a PNG), each named
                                                 `<name>_...` (`results_name`); may be []

`run` may be called many times (e.g. by a training loop): the constructor compiles, `run`
only computes. Its values are JSON-serialisable (floats, ints, strings, lists of them).

`EvalContext` holds the model, its dataset and the device mesh, and offers the model in eval
mode on pixels (`logits`, differentiable in the pixels, normalisation inside) and the test set
as padded, masked batches. `load(config, workdir, step)` builds one from a config and a
checkpoint; `map_batches` runs a jitted per-batch function over batches and gathers its
per-example outputs without the padding. The `python -m` entry point is
`alignmix_jax.evaluation.command`.

The evaluation layer reads checkpoints and models; it never imports the trainer or mixup.
"""

import dataclasses
import functools
import json
import os
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from alignmix_jax import data, models
from alignmix_jax.data import augmentation
from alignmix_jax.data import common as data_common
from alignmix_jax.runtime import checkpointing, sharding

Batch = tuple[np.ndarray, np.ndarray, np.ndarray]  # uint8 images, int32 labels, bool mask


@dataclasses.dataclass(frozen=True, eq=False)
class EvalContext:
    """The model, its data and the mesh; see the module docstring."""

    config: ml_collections.ConfigDict  # the run's whole config
    model: object  # alignmix_jax.models.Classifier
    dataset: object  # data.Dataset, or imagenet.StreamingDataset
    mesh: jax.sharding.Mesh

    @property
    def num_classes(self) -> int:
        return self.dataset.num_classes

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.dataset.image_shape)

    @property
    def batch_size(self) -> int:
        """The default global batch size of evaluations: the run's `train.eval_batch_size`."""
        return self.config.train.eval_batch_size

    def normalize(self, images: jax.Array) -> jax.Array:
        """uint8 pixels, or float pixels in [0, 1], -> the network's normalised float32 input.

        uint8 goes through `augmentation.normalize` (the training path, bit for bit); floats
        are (x - mean) / std per channel, differentiable, for attacks in [0, 1] pixel space.
        """
        dataset_config = self.config.dataset
        if images.dtype == jnp.uint8:
            return augmentation.normalize(images, dataset_config.mean, dataset_config.std)
        mean = jnp.asarray(dataset_config.mean, jnp.float32)
        std = jnp.asarray(dataset_config.std, jnp.float32)
        return (images.astype(jnp.float32) - mean) / std

    def logits(self, variables: dict, images: jax.Array) -> jax.Array:
        """Float32 logits of the model in eval mode (BatchNorm running averages) on pixels."""
        return self.model.apply(variables, self.normalize(images), train=False)

    def test_batches(self, batch_size: int | None = None, num_examples: int = 0
                     ) -> Iterator[Batch]:
        """This process's padded, masked batches of the test split: every image once.

        `num_examples` > 0 keeps a fixed class-balanced random subset of that many test images
        (`subset`; held in memory datasets only: test splits are often ordered by class, so
        the first images would not do).
        """
        batch_size = batch_size or self.batch_size
        sharding.check_batch_size(batch_size, self.mesh, 'the evaluation batch size')
        if not num_examples:
            return self.dataset.eval_batches(batch_size, process_index=jax.process_index(),
                                             process_count=jax.process_count())
        test = getattr(self.dataset, 'test', None)
        if not isinstance(test, data.Split):
            raise ValueError('num_examples (a subset of the test set) needs a dataset held in '
                             'memory; use 0 (the whole test set) for streamed datasets')
        return self.split_batches(subset(test, num_examples), batch_size)

    def split_batches(self, split: data.Split, batch_size: int | None = None
                      ) -> Iterator[Batch]:
        """Padded, masked batches of any in-memory split (e.g. an OOD set), as `test_batches`."""
        batch_size = batch_size or self.batch_size
        sharding.check_batch_size(batch_size, self.mesh, 'the evaluation batch size')
        return data.eval_batches(split, batch_size, process_index=jax.process_index(),
                                           process_count=jax.process_count())


def subset(split: data.Split, num_examples: int) -> data.Split:
    """A fixed class-balanced random subset of `num_examples` examples of `split` (class
    counts differing by at most one, `data_common.class_balanced_indices`), in their original
    order."""
    if not 0 < num_examples <= len(split.labels):
        raise ValueError(f'num_examples must be in [0, {len(split.labels)}] (the size of the '
                         f'test set), got {num_examples}')
    chosen = data_common.class_balanced_indices(split.labels, num_examples)
    return data.Split(images=split.images[chosen], labels=split.labels[chosen])


def map_batches(compiled_fn: Callable, variables: dict, batches: Iterator[Batch],
                mesh: jax.sharding.Mesh) -> dict[str, np.ndarray]:
    """Per-example outputs of `compiled_fn` over all batches, padding removed, on every process.

    `compiled_fn(variables, batch_index, images, labels)` (jitted) returns a dict of arrays
    whose first axis is the batch; `batch_index` (int32) lets it draw per-batch randomness by
    `fold_in`. The result also holds 'labels'. Examples are in process-major order within each
    batch (the order of the test set with one process).
    """
    collected = []
    for batch_index, local_batch in enumerate(batches):
        images, labels, mask = sharding.global_batch(local_batch, mesh)
        outputs = dict(compiled_fn(variables, jnp.int32(batch_index), images, labels))
        outputs['labels'], outputs['_mask'] = labels, mask
        if jax.process_count() > 1:
            outputs = multihost_utils.process_allgather(outputs, tiled=True)
        collected.append(jax.device_get(outputs))
    if not collected:
        raise ValueError('the evaluation has no batches: is the test set empty?')
    merged = {name: np.concatenate([outputs[name] for outputs in collected])
              for name in collected[0]}
    mask = merged.pop('_mask')
    return {name: values[mask] for name, values in merged.items()}


def abstract_variables(model, image_shape: Sequence[int], mesh: jax.sharding.Mesh) -> dict:
    """Shapes, dtypes and (replicated) shardings of the model's variables, without computing."""
    shapes = jax.eval_shape(lambda: model.init(
        jax.random.PRNGKey(0), jnp.zeros((1, *image_shape), jnp.float32), train=False))
    replicated = sharding.replicated(mesh)
    return jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=replicated),
        dict(shapes))


def load(config: ml_collections.ConfigDict, workdir: str, step: int | None = None,
         dataset=None) -> tuple[EvalContext, dict, int]:
    """(context, variables, step) of `step` or the latest checkpoint in `workdir`.

    Reads the dataset of `config.dataset` (unless given), builds `config.model` and restores its
    params and batch_stats replicated on every device. Raises CheckpointError (no checkpoint:
    train first) or data.DatasetError with one line saying what to do.
    """
    context = _context(config, dataset)
    variables, step = checkpointing.restore_variables(
        workdir, abstract_variables(context.model, context.image_shape, context.mesh),
        step=step)
    return context, variables, step


def initial(config: ml_collections.ConfigDict, dataset=None) -> tuple[EvalContext, dict]:
    """(context, variables) of the run's initial model, no checkpoint: the variables training
    starts from (`models.initial_variables` with `config.seed`'s key; `model.pretrained`
    weights are not loaded), replicated on every device. What an untrained network gives, as
    the baseline of any evaluation (`--initial`)."""
    context = _context(config, dataset)
    init_key, _ = models.run_keys(config.seed)
    variables = jax.jit(functools.partial(models.initial_variables, config, context.model,
                                          context.image_shape, init_key),
                        out_shardings=sharding.replicated(context.mesh),
                        compiler_options=models.init_compiler_options())()
    return context, variables


def _context(config: ml_collections.ConfigDict, dataset) -> EvalContext:
    dataset = data.load_dataset(config.dataset) if dataset is None else dataset
    return EvalContext(config=config, model=models.build_model_for_dataset(config, dataset),
                       dataset=dataset, mesh=sharding.make_mesh())


def format_table(header: Sequence[str], rows: Sequence[Sequence], decimals: int = 2) -> str:
    """A plain text table, floats with `decimals` decimals."""
    cells = [[f'{value:.{decimals}f}' if isinstance(value, float) else str(value)
              for value in row]
             for row in [header, *rows]]
    widths = [max(len(row[column]) for row in cells) for column in range(len(header))]
    lines = ['  '.join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
             .rstrip() for row in cells]
    lines.insert(1, '  '.join('-' * width for width in widths))
    return '\n'.join(lines)


def _to_json(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f'not JSON-serialisable: {type(value).__name__}')


def results_name(kind: str, step: int | str, *, latest: bool) -> str:
    """The base name of an evaluation's files in WORKDIR/eval, by what it evaluated: <kind> for
    the latest checkpoint, <kind>_step<N> for another step, <kind>_initial for the initial
    model (step 'initial'); so no evaluation overwrites another model's files."""
    if step == 'initial':
        return f'{kind}_initial'
    return kind if latest else f'{kind}_step{step}'


def write_results(workdir: str, name: str, kind: str, step: int | str, results: dict,
                  options: dict) -> str:
    """Writes WORKDIR/eval/<name>.json (`results_name`): the results, the checkpoint step and
    the options."""
    directory = os.path.join(workdir, 'eval')
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f'{name}.json')
    record = {'kind': kind, 'step': step, 'options': options, 'results': results}
    with open(path, 'w') as json_file:
        json.dump(record, json_file, indent=2, default=_to_json)
    return path
