"""ImageNet: a streaming tf.data pipeline with host-side augmentation (the data does not fit in
memory, and random-resized crops of full-resolution JPEGs cannot be cut on the device).

`load_imagenet(config.dataset)` returns a `StreamingDataset` with the interface of the in-memory
`data.common.Dataset` (`num_classes`, `class_names`, `num_train_examples`, `image_shape`,
`train_batches`, `eval_batches`), so the training loop reads either the same way. Batches are
uint8 images and int32 labels; normalisation stays in the train and eval steps. The pipeline
augments (`device_augmentation` is False): a config asking for device-side augmentation too
is refused (`dataset.crop_padding=0`, `dataset.random_flip=False`, as configs/imagenet.py).

Sources (`config.dataset.name`):
- 'imagenet2012': tensorflow-datasets, prepared by hand (tfds cannot download ImageNet): put
  ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in `DIR/downloads/manual/` and run
  `tfds build imagenet2012 --data_dir=DIR`, then pass `--config.dataset.data_dir=DIR`.
- 'imagenet_folder': `PATH/train/<class>/<image>` and `PATH/val/<class>/<image>` (the layout
  torchvision's ImageFolder and the public AlignMixup code read); labels are the indices of the
  sorted class folder names. Local paths or any filesystem tf.io.gfile knows (gs://...).

Training (`train_batches`): RandomResizedCrop to `image_size`, a horizontal flip and, if
`dataset.pca_lighting`, PCA lighting noise, on the host (`data.imagenet_transforms`).
Evaluation (`eval_batches`): Resize(256) + CenterCrop(224), as torchvision's.

Order, determinism and resuming:
- imagenet_folder: epoch e visits the training images in the order
  `np.random.default_rng([seed, e]).permutation(n)` (as the in-memory CIFAR pipeline does);
  global batch s of the epoch is positions [s B, (s + 1) B) of it and process p of P takes the
  p-th contiguous B / P of each. The augmentation of an image is a function of (seed, epoch,
  its position in the epoch) through TensorFlow's stateless random ops, so the global batch of
  every step is the same whatever the number of processes, and `start_step` resumes exactly:
  the records already seen in the epoch are skipped before anything is read or decoded.
- imagenet2012 (tfds): process p reads its own fixed `tfds.split_for_jax_process` share of the
  train split (a contiguous 1/P of the records); each epoch shuffles the share's file order and
  passes the records through a shuffle buffer, both seeded from (seed, epoch). Deterministic
  for a given (seed, process count); resuming skips the epoch's seen records (read, not
  decoded). TFRecords have no random access, so this is not the global permutation above.
- Each epoch has `num_train_examples // B` steps (the incomplete last batch is dropped). The
  pipeline is rebuilt at each epoch boundary (one batch's worth of latency per epoch).

Evaluation shares: process p takes the p-th contiguous share of the validation images (the
sorted folder listing, or `split_for_jax_process`), `B / P` at a time; batches are padded with
zero images (label 0, mask False), and every process yields as many batches as the largest
share needs, so collective evaluation steps line up and every image is counted exactly once.
"""

import dataclasses
import os
from collections.abc import Iterator, Sequence
from typing import Any

import ml_collections
import numpy as np

from alignmix_jax.data.common import (
    DatasetError,
    DatasetNotFoundError,
    check_process,
    class_balanced_indices,
    decode_image,
    import_tensorflow,
    list_class_folders,
    local_batch_size,
    pad_batch,
    share_bounds,
    short_reason,
    steps_per_epoch,
)
from alignmix_jax.data.imagenet_transforms import make_eval_example_fn, make_train_example_fn

# Defaults of the dataset fields this module reads (configs/imagenet.py sets them all).
DEFAULT_IMAGE_SIZE = 224
DEFAULT_EVAL_RESIZE = 256

_FOLDER_SPLITS = {'train': 'train', 'eval': 'val'}
_TFDS_SPLITS = {'train': 'train', 'eval': 'validation'}
# Records held by the tfds train shuffle: ~1.1 GB of encoded ImageNet JPEGs (110 kB each).
# Shuffling the file order mixes the shards; the buffer mixes the examples of the shards being
# interleaved at any time (16 by default).
_TFDS_SHUFFLE_BUFFER = 10_000
# The key of an image's augmentation is epoch * 2**32 + its position in the epoch.
_POSITION_BITS = 32
# Stream tags: the file shuffle and the record shuffle of an epoch get independent seeds.
_FILE_SHUFFLE_STREAM, _RECORD_SHUFFLE_STREAM = 0x66696C65, 0x72656364


def _folder_layout_hint() -> str:
    return '--config.dataset.data_dir=PATH with PATH/{train,val}/<class>/<image>'


def _not_prepared_message(root: str) -> str:
    return (f'imagenet2012 is not prepared in {root}: put ILSVRC2012_img_train.tar and '
            f'ILSVRC2012_img_val.tar in {root}/downloads/manual/ and run `tfds build '
            f'imagenet2012 --data_dir={root}`, or use --config.dataset.name=imagenet_folder '
            '--config.dataset.data_dir=PATH (PATH/{train,val}/<wnid>/<image>)')


def _derived_seed(*parts: int) -> int:
    """A 31-bit seed for TensorFlow's seeded ops, a function of the given integers."""
    return int(np.random.default_rng(list(parts)).integers(2**31))


def _epoch_positions(batches_per_epoch: int, batch_size: int, first_batch: int,
                     process_index: int, local_size: int) -> np.ndarray:
    """Positions in the epoch's order of this process's images from `first_batch` on."""
    positions = np.arange(batches_per_epoch * batch_size).reshape(batches_per_epoch, batch_size)
    start = process_index * local_size
    return positions[first_batch:, start:start + local_size].reshape(-1)


def _pipeline_options(tf):
    options = tf.data.Options()
    options.deterministic = True  # parallel maps keep the order: batches are reproducible
    # One thread per image op: tf.data's parallelism is across images, which scales better
    # than splitting a single decode or resize over threads.
    options.threading.max_intra_op_parallelism = 1
    return options


# ----------------------------------------------------------------------------------------------
# Sources: where the (encoded image or path, label) records come from.


@dataclasses.dataclass(frozen=True, eq=False)
class _FolderSource:
    """File lists of an image folder; records are file paths, read inside the pipeline."""

    root: str
    train_paths: np.ndarray  # object array of str
    train_labels: np.ndarray  # int32
    eval_paths: np.ndarray
    eval_labels: np.ndarray
    from_files = True

    def train_records(self, tf, *, epoch: int, first_batch: int, batch_size: int,
                      local_size: int, seed: int, process_index: int, process_count: int):
        del process_count  # the share is cut from the global batch
        num_examples = len(self.train_labels)
        batches_per_epoch = num_examples // batch_size
        order = np.random.default_rng([seed, epoch]).permutation(num_examples)
        positions = _epoch_positions(batches_per_epoch, batch_size, first_batch,
                                     process_index, local_size)
        indices = order[positions]
        paths = self.train_paths[indices]
        keys = (np.int64(epoch) << _POSITION_BITS) + positions
        records = tf.data.Dataset.from_tensor_slices(
            (tf.constant(paths.tolist(), tf.string), self.train_labels[indices], keys))
        return records, paths

    def eval_share_sizes(self, process_count: int) -> np.ndarray:
        return np.diff(share_bounds(len(self.eval_labels), process_count))

    def eval_records(self, tf, *, process_index: int, process_count: int):
        bounds = share_bounds(len(self.eval_labels), process_count)
        start, stop = bounds[process_index], bounds[process_index + 1]
        paths = self.eval_paths[start:stop]
        records = tf.data.Dataset.from_tensor_slices(
            (tf.constant(paths.tolist(), tf.string), self.eval_labels[start:stop]))
        return records, paths


@dataclasses.dataclass(frozen=True, eq=False)
class _TfdsSource:
    """A prepared tfds builder; records are encoded JPEGs (decoded by this module, so the
    train crops can be decoded alone)."""

    builder: Any
    from_files = False

    def _read(self, tf, split, *, shuffle_seed: int | None):
        import tensorflow_datasets as tfds

        read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed, options=_pipeline_options(tf))
        return self.builder.as_dataset(
            split=split, shuffle_files=shuffle_seed is not None, as_supervised=True,
            decoders={'image': tfds.decode.SkipDecoding()}, read_config=read_config)

    def _process_split(self, kind: str, process_index: int, process_count: int):
        import tensorflow_datasets as tfds

        return tfds.split_for_jax_process(_TFDS_SPLITS[kind], process_index=process_index,
                                          process_count=process_count)

    def train_records(self, tf, *, epoch: int, first_batch: int, batch_size: int,
                      local_size: int, seed: int, process_index: int, process_count: int):
        num_examples = self.builder.info.splits['train'].num_examples
        batches_per_epoch = num_examples // batch_size
        split = self._process_split('train', process_index, process_count)
        records = self._read(tf, split,
                             shuffle_seed=_derived_seed(seed, epoch, _FILE_SHUFFLE_STREAM))
        records = records.shuffle(_TFDS_SHUFFLE_BUFFER,
                                  seed=_derived_seed(seed, epoch, _RECORD_SHUFFLE_STREAM),
                                  reshuffle_each_iteration=False)
        # Every share holds at least batches_per_epoch * local_size records (even splits).
        records = records.take(batches_per_epoch * local_size).skip(first_batch * local_size)
        positions = _epoch_positions(batches_per_epoch, batch_size, first_batch,
                                     process_index, local_size)
        keys = tf.data.Dataset.from_tensor_slices(
            (np.int64(epoch) << _POSITION_BITS) + positions)
        records = tf.data.Dataset.zip(records, keys).map(
            lambda example, key: (example[0], example[1], key))
        return records, None

    def eval_share_sizes(self, process_count: int) -> np.ndarray:
        return np.array([
            self.builder.info.splits[self._process_split('eval', index, process_count)]
            .num_examples for index in range(process_count)])

    def eval_records(self, tf, *, process_index: int, process_count: int):
        split = self._process_split('eval', process_index, process_count)
        return self._read(tf, split, shuffle_seed=None), None


# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class StreamingDataset:
    """ImageNet read from disk as it is consumed; the interface of data.common.Dataset."""

    class_names: tuple[str, ...]
    num_train_examples: int
    image_size: int
    eval_resize: int
    pca_lighting: bool
    source: _FolderSource | _TfdsSource
    description: str  # where the data is, for error messages
    # Augmented by this pipeline on the host; the train step must not augment again.
    device_augmentation = False

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.image_size, self.image_size, 3)

    def train_batches(self, batch_size: int, *, seed: int, start_step: int = 0,
                      process_index: int = 0,
                      process_count: int = 1) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Endless (uint8 images (B / P, s, s, 3), int32 labels) of this process; see the
        module docstring for the order, the augmentation and resuming at `start_step`."""
        batches_per_epoch = steps_per_epoch(self.num_train_examples, batch_size)
        local_size = local_batch_size(batch_size, process_count)
        check_process(process_index, process_count)
        if start_step < 0:
            raise ValueError(f'start_step must be >= 0, got {start_step}')
        tf = import_tensorflow()
        example_fn = make_train_example_fn(self.image_size, seed,
                                           pca_lighting=self.pca_lighting,
                                           from_files=self.source.from_files)

        def batches():
            epoch, first_batch = divmod(start_step, batches_per_epoch)
            while True:
                records, names = self.source.train_records(
                    tf, epoch=epoch, first_batch=first_batch, batch_size=batch_size,
                    local_size=local_size, seed=seed, process_index=process_index,
                    process_count=process_count)
                yield from self._run(tf, records, example_fn, local_size, names,
                                     drop_remainder=True)
                epoch, first_batch = epoch + 1, 0

        return batches()

    def eval_batches(self, batch_size: int, *, process_index: int = 0,
                     process_count: int = 1
                     ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(images, labels, mask) of this process's share of the validation images, padded;
        every process yields the same number of batches (see the module docstring)."""
        local_size = local_batch_size(batch_size, process_count)
        check_process(process_index, process_count)
        tf = import_tensorflow()
        share_sizes = self.source.eval_share_sizes(process_count)
        num_batches = max(1, -(-int(np.max(share_sizes)) // local_size))
        own_size = int(share_sizes[process_index])
        example_fn = make_eval_example_fn(self.image_size, self.eval_resize,
                                          from_files=self.source.from_files)

        def batches():
            yielded = 0
            if own_size:
                records, names = self.source.eval_records(
                    tf, process_index=process_index, process_count=process_count)
                for images, labels in self._run(tf, records, example_fn, local_size, names,
                                                drop_remainder=False):
                    yield pad_batch(images, labels, local_size)
                    yielded += 1
            empty = (np.zeros((0, *self.image_shape), np.uint8), np.zeros(0, np.int32))
            for _ in range(yielded, num_batches):
                yield pad_batch(*empty, local_size)

        return batches()

    def _run(self, tf, records, example_fn, local_size: int, names: Sequence[str] | None, *,
             drop_remainder: bool):
        """Decodes `records` in parallel and yields numpy batches; a file that cannot be
        decoded stops the pipeline with a DatasetError naming it (when the names are known)."""
        pipeline = (records
                    .map(example_fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
                    .batch(local_size, drop_remainder=drop_remainder)
                    .prefetch(tf.data.AUTOTUNE)
                    .with_options(_pipeline_options(tf)))
        batch_index = 0
        iterator = pipeline.as_numpy_iterator()
        while True:
            try:
                images, labels = next(iterator)
            except StopIteration:
                return
            except tf.errors.OpError as error:
                raise DatasetError(self._decode_failure(tf, error, names, batch_index,
                                                        local_size)) from error
            batch_index += 1
            yield images, labels

    def _decode_failure(self, tf, error, names, batch_index: int, local_size: int) -> str:
        if names is not None:
            # Errors surface in order (deterministic map): the culprit is in this batch.
            for name in names[batch_index * local_size:(batch_index + 1) * local_size]:
                try:
                    decode_image(tf, tf.io.read_file(name))
                except tf.errors.OpError as file_error:
                    return (f'{name} could not be read as an image '
                            f'({short_reason(file_error)})')
        return f'an image of {self.description} could not be read ({short_reason(error)})'


# ----------------------------------------------------------------------------------------------
# Loading.


def load_imagenet(dataset_config: ml_collections.ConfigDict) -> StreamingDataset:
    """The streaming dataset named by `config.dataset` ('imagenet2012' or 'imagenet_folder').

    Reads `data_dir`, `train_subset` (imagenet_folder only), `image_size` (224),
    `eval_resize` (256) and `pca_lighting` (False) from `dataset_config`.
    """
    image_size = int(dataset_config.get('image_size', DEFAULT_IMAGE_SIZE))
    eval_resize = int(dataset_config.get('eval_resize', DEFAULT_EVAL_RESIZE))
    pca_lighting = bool(dataset_config.get('pca_lighting', False))
    if image_size <= 0 or eval_resize < image_size:
        raise ValueError(f'need 0 < image_size <= eval_resize, got image_size={image_size}, '
                         f'eval_resize={eval_resize}')
    train_subset = int(dataset_config.get('train_subset', 0) or 0)
    name = dataset_config.name
    if name == 'imagenet2012':
        if train_subset:
            raise DatasetError('train_subset is not supported for imagenet2012 (tfds); use '
                               '--config.dataset.name=imagenet_folder for a subset')
        return tfds_dataset(_prepared_builder(dataset_config.data_dir), image_size=image_size,
                            eval_resize=eval_resize, pca_lighting=pca_lighting)
    if name != 'imagenet_folder':
        raise ValueError(f"unknown ImageNet dataset {name!r}; expected 'imagenet2012' or "
                         "'imagenet_folder'")
    source, class_names = _load_folder(dataset_config.data_dir)
    if train_subset:
        chosen = class_balanced_indices(source.train_labels, train_subset)
        source = dataclasses.replace(source, train_paths=source.train_paths[chosen],
                                     train_labels=source.train_labels[chosen])
    return StreamingDataset(class_names=class_names,
                            num_train_examples=len(source.train_labels), image_size=image_size,
                            eval_resize=eval_resize, pca_lighting=pca_lighting, source=source,
                            description=source.root)


def _prepared_builder(data_dir: str | None):
    import_tensorflow()  # configured before tfds starts TensorFlow
    import tensorflow_datasets as tfds

    builder = tfds.builder('imagenet2012', data_dir=data_dir)
    if not builder.is_prepared():
        # builder.data_dir is ROOT/imagenet2012/VERSION; the manual folder is under ROOT.
        root = os.path.dirname(os.path.dirname(builder.data_dir))
        raise DatasetNotFoundError(_not_prepared_message(root))
    return builder


def tfds_dataset(builder, *, image_size: int = DEFAULT_IMAGE_SIZE,
                 eval_resize: int = DEFAULT_EVAL_RESIZE,
                 pca_lighting: bool = False) -> StreamingDataset:
    """A StreamingDataset of a prepared tfds builder with imagenet2012's layout: 'train' and
    'validation' splits of encoded 'image's and ClassLabel 'label's."""
    return StreamingDataset(
        class_names=tuple(builder.info.features['label'].names),
        num_train_examples=builder.info.splits['train'].num_examples, image_size=image_size,
        eval_resize=eval_resize, pca_lighting=pca_lighting, source=_TfdsSource(builder),
        description=f'{builder.name} in {builder.data_dir}')


def _load_folder(data_dir: str | None) -> tuple[_FolderSource, tuple[str, ...]]:
    if not data_dir:
        raise DatasetNotFoundError(f'imagenet_folder needs the folder: pass '
                                   f'{_folder_layout_hint()}')
    tf = import_tensorflow()
    root = os.path.expanduser(data_dir)
    if not tf.io.gfile.isdir(root):
        raise DatasetNotFoundError(f'imagenet_folder {root} does not exist: pass '
                                   f'{_folder_layout_hint()}')
    listings = {kind: list_class_folders(os.path.join(root, folder), 'imagenet_folder',
                                         missing=f'pass {_folder_layout_hint()}',
                                         empty=f'pass {_folder_layout_hint()}')
                for kind, folder in _FOLDER_SPLITS.items()}
    class_names = tuple(listings['train'])
    if tuple(listings['eval']) != class_names:
        only_train = sorted(set(class_names) - set(listings['eval']))
        only_val = sorted(set(listings['eval']) - set(class_names))
        raise DatasetError(f'{root}/train and {root}/val must have the same class folders; '
                           f'only in train: {only_train[:5]}, only in val: {only_val[:5]}')
    arrays = {}
    for kind, files_by_class in listings.items():
        paths = np.array([path for files in files_by_class.values() for path in files],
                         dtype=object)
        labels = np.concatenate([np.full(len(files), label, np.int32)
                                 for label, files in enumerate(files_by_class.values())])
        arrays[kind] = paths, labels
    source = _FolderSource(root=root, train_paths=arrays['train'][0],
                           train_labels=arrays['train'][1], eval_paths=arrays['eval'][0],
                           eval_labels=arrays['eval'][1])
    return source, class_names
