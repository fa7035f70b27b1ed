"""Data: CIFAR from tfds, image folders and the embedded demo subset, held in memory.

This module targets datasets that fit in host memory (CIFAR: 50,000 x 32x32x3 uint8 images are
150 MB). A dataset is read and decoded once, with tf.data/tfds, into uint8 numpy arrays
(`Split`, `Dataset`). ImageNet ('imagenet2012', 'imagenet_folder') is streamed from disk by
`alignmix_jax.imagenet_input` with the same interface; `load_dataset` hands it over.

- `train_batches` cuts training batches on the host from a permutation per epoch,
  `np.random.default_rng([seed, epoch]).permutation(n)`, dropping the incomplete last batch.
  Any step's batch is a function of (seed, step) alone, so a resumed run starting at step k
  sees exactly the batches an uninterrupted one would, without replaying earlier epochs.
- `eval_batches` covers every test image once, in order; the last batch is padded and masked so
  that the jitted evaluation step has a single shape.
- `augment` (4-pixel zero padding + random crop, horizontal flip; optionally torchvision-style
  colour jitter and small rotations, off by default) and `normalize` are pure jax functions
  called inside the jitted train step: augmentation runs on the device, so a GPU is never left
  waiting for host-side image processing, and the host only ships uint8 batches.

Datasets (`config.dataset.name`):
- 'cifar10', 'cifar100': tfds, prepared in `data_dir` (downloaded there if `download` is set).
- 'image_folder': `data_dir/{train,test}/<class>/<image>`; labels are the indices of the sorted
  class folder names of train; all images must have the same size.
- 'demo': 500 training and 100 test images per class of CIFAR-10, shipped in
  `alignmix_jax/demo_data/cifar10_demo.npz` as their original JPEG bytes.

A dataset that cannot be found raises `DatasetNotFoundError` with one line saying what to do.
TensorFlow is imported only when a dataset is loaded, quietly and with no GPU visible to it.
"""

import dataclasses
import os
import pathlib
import re
import socket
import urllib.request
from collections.abc import Iterator, Sequence

import dm_pix as pix
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax import lax

DEMO_DATA_PATH = pathlib.Path(__file__).resolve().parent / 'demo_data' / 'cifar10_demo.npz'

# The training subset must be the same whatever the run's seed, so it has its own fixed seed.
_SUBSET_SEED = 0
# Where tfds downloads CIFAR from (tensorflow_datasets/image_classification/cifar.py). Offline,
# tfds retries a download ten times with exponential backoff (over three minutes); probing the
# host first turns that into an immediate error.
_TFDS_DOWNLOAD_HOSTS = {'cifar10': 'www.cs.toronto.edu', 'cifar100': 'www.cs.toronto.edu'}
_PROBE_TIMEOUT_SECONDS = 10.0
_IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.gif')
_SPLITS = ('train', 'test')
# Streamed by alignmix_jax.imagenet_input rather than held in memory.
IMAGENET_DATASETS = ('imagenet2012', 'imagenet_folder')
# CUB-200-2011 (official archive, tfds), with boxes: alignmix_jax.cub_input.
CUB_DATASETS = ('cub', 'caltech_birds2011')


class DatasetError(Exception):
    """The dataset cannot be used as configured; the message says why and what to do."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """The dataset is not where the config says and could not be fetched."""


# eq=False: the generated __eq__ would compare numpy arrays, whose truth value is ambiguous.
@dataclasses.dataclass(frozen=True, eq=False)
class Split:
    """One split in memory: `images` uint8 (n, h, w, 3), `labels` int32 (n,)."""

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self):
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise ValueError(f'images must be uint8 (n, h, w, 3), got {self.images.dtype} '
                             f'{self.images.shape}')
        if self.labels.dtype != np.int32 or self.labels.shape != self.images.shape[:1]:
            raise ValueError(f'labels must be int32 ({len(self.images)},), got '
                             f'{self.labels.dtype} {self.labels.shape}')


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """Both splits in memory; label i is `class_names[i]`.

    The training loop reads any dataset through `num_train_examples`, `image_shape`,
    `train_batches` and `eval_batches`; streaming datasets (ImageNet) offer the same.
    """

    train: Split
    test: Split
    num_classes: int
    class_names: tuple[str, ...]
    # The test images of the classes removed by `config.dataset.held_out_classes` (labels:
    # their original class indices), for out-of-distribution evaluation; None if none were.
    held_out_test: Split | None = None

    @property
    def num_train_examples(self) -> int:
        return len(self.train.labels)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.train.images.shape[1:]

    def train_batches(self, batch_size: int, *, seed: int, start_step: int = 0,
                      process_index: int = 0, process_count: int = 1):
        return train_batches(self.train, batch_size, seed=seed, start_step=start_step,
                             process_index=process_index, process_count=process_count)

    def eval_batches(self, batch_size: int, *, process_index: int = 0, process_count: int = 1):
        return eval_batches(self.test, batch_size, process_index=process_index,
                            process_count=process_count)


def load_dataset(dataset_config: ml_collections.ConfigDict) -> Dataset:
    """Reads the dataset named by `config.dataset` into memory (see the module docstring)."""
    name = dataset_config.name
    if name in IMAGENET_DATASETS and dataset_config.get('held_out_classes'):
        raise DatasetError('held_out_classes needs a dataset held in memory, not ImageNet')
    if name in IMAGENET_DATASETS:
        # Streamed from disk with host-side augmentation; imported here because it builds on
        # this module's helpers.
        from alignmix_jax import imagenet_input
        return imagenet_input.load_imagenet(dataset_config)
    if name in CUB_DATASETS:
        # CUB-200-2011 with its test boxes, for weakly-supervised localisation.
        from alignmix_jax import cub_input
        return cub_input.load_cub(dataset_config)
    if name in _TFDS_DOWNLOAD_HOSTS:
        dataset = _load_tfds(name, dataset_config.data_dir, download=dataset_config.download)
    elif name == 'image_folder':
        dataset = _load_image_folder(dataset_config.data_dir)
    elif name == 'demo':
        dataset = _load_demo(DEMO_DATA_PATH)
    else:
        raise ValueError(f'unknown dataset {name!r}; expected one of '
                         f'{sorted(_TFDS_DOWNLOAD_HOSTS) + ["image_folder", "demo"]} or '
                         f'{IMAGENET_DATASETS} or {CUB_DATASETS}')
    if dataset_config.get('held_out_classes'):
        dataset = hold_out_classes(dataset, dataset_config.held_out_classes)
    if dataset_config.train_subset:
        train = _class_balanced_subset(dataset.train, dataset_config.train_subset)
        dataset = dataclasses.replace(dataset, train=train)
    return dataset


def hold_out_classes(dataset: Dataset, held_out: Sequence[str | int]) -> Dataset:
    """The dataset without the classes `held_out` (names or indices), relabelled 0..k-1.

    For the held-out-classes protocol of OOD detection: train on the other classes, and treat
    the held-out classes' test images (kept in `held_out_test`) as out-of-distribution. The
    remaining classes keep their order.
    """
    removed = set()
    for name in held_out:
        if isinstance(name, int) and 0 <= name < dataset.num_classes:
            removed.add(name)
        elif name in dataset.class_names:
            removed.add(dataset.class_names.index(name))
        else:
            raise DatasetError(f'held_out_classes: no class {name!r}; the classes are '
                               f'{", ".join(dataset.class_names)}')
    kept = [label for label in range(dataset.num_classes) if label not in removed]
    if not kept:
        raise DatasetError('held_out_classes holds out every class')
    new_label = np.full(dataset.num_classes, -1, np.int32)
    new_label[kept] = np.arange(len(kept), dtype=np.int32)

    def keep(split: Split) -> Split:
        chosen = new_label[split.labels] >= 0
        return Split(images=split.images[chosen], labels=new_label[split.labels[chosen]])

    is_held_out = new_label[dataset.test.labels] < 0
    held_out_test = Split(images=dataset.test.images[is_held_out],
                          labels=dataset.test.labels[is_held_out])
    return Dataset(train=keep(dataset.train), test=keep(dataset.test), num_classes=len(kept),
                   class_names=tuple(dataset.class_names[label] for label in kept),
                   held_out_test=held_out_test)


def _class_balanced_subset(split: Split, size: int) -> Split:
    """A fixed random subset of `size` examples whose class counts differ by at most one.

    (As long as every class has enough examples; otherwise the rarer classes are used up.)
    """
    num_examples = len(split.labels)
    if not 0 < size <= num_examples:
        raise ValueError(f'train_subset must be in [0, {num_examples}], got {size}')
    order = np.random.default_rng(_SUBSET_SEED).permutation(num_examples)
    ordered_labels = split.labels[order]
    # Rank of each example among those of its class in the random order: taking examples by
    # increasing rank takes one of each class in turn.
    rank_in_class = np.empty(num_examples, np.int64)
    for label in np.unique(ordered_labels):
        members = np.flatnonzero(ordered_labels == label)
        rank_in_class[members] = np.arange(len(members))
    by_rank = np.lexsort((np.arange(num_examples), rank_in_class))
    chosen = np.sort(order[by_rank[:size]])
    return Split(images=split.images[chosen], labels=split.labels[chosen])


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Training batches per epoch: the incomplete last batch is dropped."""
    if batch_size <= 0 or num_examples < batch_size:
        raise ValueError(f'batch size {batch_size} must be in [1, {num_examples}] (the number '
                         'of training images)')
    return num_examples // batch_size


def _local_batch_size(batch_size: int, process_count: int) -> int:
    if batch_size % process_count:
        raise ValueError(f'the batch size {batch_size} must be a multiple of the number of '
                         f'processes, {process_count}')
    return batch_size // process_count


def train_batches(split: Split, batch_size: int, *, seed: int, start_step: int = 0,
                  process_index: int = 0,
                  process_count: int = 1) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Endless (images, labels) batches; step s is batch s % spe of epoch s // spe.

    Epoch e visits the examples in the order `np.random.default_rng([seed, e]).permutation(n)`,
    `batch_size` (global) at a time. Each process yields its own contiguous part of every global
    batch, so the processes' shares are disjoint and together cover the batch. Starting at
    `start_step` yields what an iterator started at 0 yields from that step on.
    """
    num_examples = len(split.labels)
    batches_per_epoch = steps_per_epoch(num_examples, batch_size)
    local_size = _local_batch_size(batch_size, process_count)
    epoch, first_batch = divmod(start_step, batches_per_epoch)
    while True:
        order = np.random.default_rng([seed, epoch]).permutation(num_examples)
        for batch in range(first_batch, batches_per_epoch):
            start = batch * batch_size + process_index * local_size
            indices = order[start:start + local_size]
            yield split.images[indices], split.labels[indices]
        epoch, first_batch = epoch + 1, 0


def eval_batches(split: Split, batch_size: int, *, process_index: int = 0,
                 process_count: int = 1) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(images, labels, mask) batches covering this process's share of the split once, in order.

    Process p reads the p-th of `process_count` contiguous, near-equal shares, `batch_size //
    process_count` images at a time. Batches are padded with zero images (label 0, mask False)
    and every process yields the same number of them, so a masked metric over all processes
    counts every image exactly once and the processes' steps line up.
    """
    local_size = _local_batch_size(batch_size, process_count)
    num_examples = len(split.labels)
    share_bounds = np.linspace(0, num_examples, process_count + 1).round().astype(int)
    share_start, share_stop = share_bounds[process_index], share_bounds[process_index + 1]
    largest_share = int(np.max(np.diff(share_bounds)))
    for offset in range(0, max(largest_share, 1), local_size):
        start = min(share_start + offset, share_stop)
        stop = min(start + local_size, share_stop)
        images, labels = split.images[start:stop], split.labels[start:stop]
        mask = np.ones(len(labels), bool)
        padding = local_size - len(labels)
        if padding:
            images = np.concatenate([images, np.zeros((padding, *images.shape[1:]), np.uint8)])
            labels = np.concatenate([labels, np.zeros(padding, np.int32)])
            mask = np.concatenate([mask, np.zeros(padding, bool)])
        yield images, labels, mask


# The optional augmentations draw from keys folded out of `augment`'s key. With the default
# (partitionable) threefry, `jax.random.fold_in(key, i)` is `jax.random.split(key, n)[i]`, so
# folding in 0 or 1 would reuse the crop or flip key: these constants keep clear of both. The
# crop and flip keep their `jax.random.split(key)`, so turning jitter or rotation on or off
# changes no crop or flip.
_COLOR_JITTER_STREAM = 0xC010
_ROTATION_STREAM = 0x4074
JITTER_COMPONENTS = ('brightness', 'contrast', 'saturation', 'hue')


def augment(key: jax.Array, images: jax.Array, *, padding: int = 4, flip: bool = True,
            color_jitter: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
            rotation_degrees: float = 0.0) -> jax.Array:
    """Random crop of the zero-padded image, random horizontal flip, optionally colour jitter
    and rotation, per example.

    As torchvision's RandomCrop(size, padding=padding) + RandomHorizontalFlip(): crop offsets
    are uniform in [0, 2 * padding] on each axis, flips have probability 1/2. Then, if any of
    `color_jitter` = (brightness, contrast, saturation, hue) is positive, ColorJitter's
    per-image factors (`draw_jitter_factors`, `jitter_colours`); then, if `rotation_degrees` is
    positive, RandomRotation(rotation_degrees): a rotation by an angle uniform in
    [-rotation_degrees, rotation_degrees], counter-clockwise for positive angles, bilinear,
    with black outside the image (`rotate_images`). Jitter and rotation work on floats in
    [0, 1], rounded to the nearest level once at the end. Their settings must be Python numbers
    (not traced): a component that is 0 is skipped, so the defaults give exactly the crop and
    flip, bit for bit. `images` is a uint8 (b, h, w, c) batch; the result has the same shape
    and dtype.
    """
    color_jitter = _checked_color_jitter(color_jitter)
    rotation_degrees = float(rotation_degrees)
    if not 0.0 <= rotation_degrees <= 180.0:
        raise ValueError(f'rotation_degrees must be in [0, 180] (0: no rotation), got '
                         f'{rotation_degrees}')
    batch_size, height, width, channels = images.shape
    if any(color_jitter) and channels != 3:
        raise ValueError(f'color_jitter needs RGB images (3 channels), got {channels}: set it '
                         'to (0, 0, 0, 0)')
    crop_key, flip_key = jax.random.split(key)
    if padding > 0:
        padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
        offsets = jax.random.randint(crop_key, (batch_size, 2), 0, 2 * padding + 1)

        def crop(image, offset):
            return lax.dynamic_slice(image, (offset[0], offset[1], 0), (height, width, channels))

        images = jax.vmap(crop)(padded, offsets)
    if flip:
        flipped = jax.random.bernoulli(flip_key, 0.5, (batch_size,))
        images = jnp.where(flipped[:, None, None, None], images[:, :, ::-1, :], images)
    if not any(color_jitter) and rotation_degrees == 0.0:
        return images
    pixels = images.astype(jnp.float32) / 255.0
    if any(color_jitter):
        factors = draw_jitter_factors(jax.random.fold_in(key, _COLOR_JITTER_STREAM), batch_size,
                                      color_jitter)
        pixels = jitter_colours(pixels, **factors)
    if rotation_degrees > 0.0:
        angles = jax.random.uniform(jax.random.fold_in(key, _ROTATION_STREAM), (batch_size,),
                                    minval=-rotation_degrees, maxval=rotation_degrees)
        pixels = rotate_images(pixels, angles)
    # jnp.round rounds halves to even; the clip only guards against float error at 0 and 1.
    return jnp.clip(jnp.round(pixels * 255.0), 0, 255).astype(jnp.uint8)


def _checked_color_jitter(color_jitter: Sequence[float]) -> tuple[float, ...]:
    message = ('color_jitter must be 4 non-negative numbers (brightness, contrast, saturation, '
               f'hue) with hue <= 0.5, as torchvision\'s ColorJitter; got {color_jitter!r}')
    try:
        values = tuple(float(value) for value in color_jitter)
    except (TypeError, ValueError) as error:
        raise ValueError(message) from error
    # `not >=` also refuses NaN.
    if len(values) != 4 or not all(value >= 0.0 for value in values) or not values[3] <= 0.5:
        raise ValueError(message)
    return values


def draw_jitter_factors(key: jax.Array, batch_size: int,
                        color_jitter: Sequence[float]) -> dict[str, jax.Array]:
    """Per-image factors of torchvision's ColorJitter, as `jitter_colours` keywords.

    For (brightness, contrast, saturation) = (b, c, s): factors uniform in [max(0, 1 - b),
    1 + b], etc.; for hue h: a shift uniform in [-h, h]. Each is a float32 (batch_size,) array;
    a component that is 0 is left out (torchvision skips it too). One uniform draw per image
    and component, so a component's factors do not depend on which others are on.
    """
    color_jitter = _checked_color_jitter(color_jitter)
    uniform = jax.random.uniform(key, (batch_size, len(JITTER_COMPONENTS)))
    factors = {}
    for column, (name, amount) in enumerate(zip(JITTER_COMPONENTS, color_jitter, strict=True)):
        if amount == 0.0:
            continue
        low, high = (-amount, amount) if name == 'hue' else (max(0.0, 1.0 - amount), 1.0 + amount)
        factors[name] = low + (high - low) * uniform[:, column]
    return factors


def jitter_colours(images: jax.Array, *, brightness: jax.Array | None = None,
                   contrast: jax.Array | None = None, saturation: jax.Array | None = None,
                   hue: jax.Array | None = None) -> jax.Array:
    """torchvision's colour adjustments, with per-image factors, on float RGB images in [0, 1].

    `images` is (b, h, w, 3); each factor is (b,) or None (skipped). Applied in the fixed order
    brightness, contrast, saturation, hue (torchvision's ColorJitter permutes the order randomly
    per call), each clipped to [0, 1] as torchvision's adjust_* do. With `gray` the luma
    0.2989 R + 0.587 G + 0.114 B (torchvision's rgb_to_grayscale, pix's rec601):
    - brightness f: f * image (pix.adjust_brightness adds a delta instead: tf.image's);
    - contrast f: f * image + (1 - f) * mean(gray) over the whole image, one scalar per image
      (pix.adjust_contrast blends with each channel's own mean instead: tf.image's);
    - saturation f: f * image + (1 - f) * gray (pix.adjust_saturation scales the HSV saturation
      instead: tf.image's; f = 0 gives r = g = b = max(r, g, b) there, the luma here);
    - hue d: the HSV hue shifted by d turns of the colour wheel, (h + d) mod 1: pix.adjust_hue,
      which is torchvision's adjust_hue.
    """
    def per_image(factor):
        return jnp.asarray(factor, images.dtype)[:, None, None, None]

    def gray(image):
        return pix.rgb_to_grayscale(image, luma_standard='rec601')

    if brightness is not None:
        images = jnp.clip(per_image(brightness) * images, 0.0, 1.0)
    if contrast is not None:
        mean = jnp.mean(gray(images), axis=(1, 2, 3), keepdims=True)
        factor = per_image(contrast)
        images = jnp.clip(factor * images + (1.0 - factor) * mean, 0.0, 1.0)
    if saturation is not None:
        factor = per_image(saturation)
        images = jnp.clip(factor * images + (1.0 - factor) * gray(images), 0.0, 1.0)
    if hue is not None:
        images = jnp.clip(jax.vmap(pix.adjust_hue)(images, jnp.asarray(hue, images.dtype)),
                          0.0, 1.0)
    return images


def rotate_images(images: jax.Array, degrees: jax.Array) -> jax.Array:
    """Rotates each float (h, w, c) image of the batch by its angle in `degrees`, (b,).

    Counter-clockwise for positive angles, as seen with row 0 at the top (so 90 degrees is
    `jnp.rot90(image)`), about the image centre, as torchvision's rotate (pix.rotate, which does
    it, takes radians). Bilinear, with 0 (black) outside the image, as RandomRotation's default
    fill (whose default interpolation is nearest, though).
    """
    # pix.rotate's mode='constant' gives cval wherever the source position is past the outer
    # pixel centres, so even a tiny rotation would blacken half of the border pixels. Inside a
    # 1-pixel frame of zeros, the edge fades out over that last pixel instead, as torchvision's
    # bilinear sampling with zero padding does; the frame is cut off again afterwards.
    framed = jnp.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)))

    def rotate(image, angle):
        return pix.rotate(image, angle, order=1, mode='constant', cval=0.0)[1:-1, 1:-1]

    radians = jnp.deg2rad(jnp.asarray(degrees, images.dtype))
    return jax.vmap(rotate)(framed, radians)


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
    """(images / 255 - mean) / std per channel, in float32, for uint8 (..., c) images.

    `mean` and `std` are constants (config values), not traced arrays.
    """
    if images.dtype != jnp.uint8:
        raise TypeError(f'normalize takes uint8 images, got {images.dtype}')
    num_channels = images.shape[-1]
    # A uint8 pixel takes 256 values, so a table computed in float64 gives the correctly rounded
    # result, the same eagerly, under jit and on any backend; float32 arithmetic would not be:
    # XLA turns division by a constant into multiplication by its reciprocal (off by an ulp).
    levels = np.arange(256, dtype=np.float64)[None, :]
    table = (levels / 255 - np.asarray(mean, np.float64)[:, None]) \
        / np.asarray(std, np.float64)[:, None]
    flat_table = jnp.asarray(table.astype(np.float32).reshape(num_channels * 256))
    channel_offsets = 256 * jnp.arange(num_channels, dtype=jnp.int32)
    return flat_table[jnp.asarray(images).astype(jnp.int32) + channel_offsets]


def _import_tensorflow():
    """TensorFlow for reading data only: quiet, and with no GPU (that memory is JAX's)."""
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    # Silences the oneDNN banner printed on import; oneDNN only speeds up TF's own math, and
    # TF does none here beyond decoding images.
    os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], 'GPU')
    except RuntimeError:
        pass  # TF's devices were initialised earlier, by code that had its own say on GPUs.
    return tf


def _not_found_message(name: str, location: str, reason: str) -> str:
    return (f'{name} is not prepared in {location} and could not be downloaded ({reason}): run '
            f'`tfds build {name} --data_dir=DIR` on a machine with internet and pass '
            '--config.dataset.data_dir=DIR, or train on an image folder with '
            '--config.dataset.name=image_folder --config.dataset.data_dir=PATH')


def _short_reason(error: BaseException) -> str:
    # TensorFlow prefixes its messages with the graph node, as {{function_node ...}}.
    message = re.sub(r'\{\{.*?\}\}\s*', '', str(error))
    lines = message.strip().splitlines()
    first_line = lines[0] if lines else ''
    if len(first_line) > 160:
        first_line = first_line[:157] + '...'
    return f'{type(error).__name__}: {first_line}' if first_line else type(error).__name__


def _unreachable_reason(host: str) -> str | None:
    """Why `host` cannot be reached on port 443, or None if it can (or a proxy is in use)."""
    if urllib.request.getproxies().get('https'):
        return None  # Only the proxy knows; let tfds try.
    try:
        with socket.create_connection((host, 443), timeout=_PROBE_TIMEOUT_SECONDS):
            return None
    except OSError as error:
        return f'{host} is unreachable: {error}'


def _load_tfds(name: str, data_dir: str | None, *, download: bool) -> Dataset:
    _import_tensorflow()  # Configured before tfds starts TensorFlow.
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
        if not download:
            reason = 'downloading is off: --config.dataset.download=False'
        else:
            reason = _unreachable_reason(_TFDS_DOWNLOAD_HOSTS[name])
        if reason is not None:
            raise DatasetNotFoundError(_not_found_message(name, builder.data_dir, reason))
        try:
            builder.download_and_prepare()
        except Exception as error:  # Whatever failed, the remedy is the same.
            raise DatasetNotFoundError(
                _not_found_message(name, builder.data_dir, _short_reason(error))) from error

    def read_split(split_name: str) -> Split:
        examples = builder.as_dataset(split=split_name, as_supervised=True, shuffle_files=False)
        image_batches, label_batches = [], []
        for images, labels in examples.batch(10_000).as_numpy_iterator():
            image_batches.append(images)
            label_batches.append(labels)
        return Split(images=np.concatenate(image_batches).astype(np.uint8),
                     labels=np.concatenate(label_batches).astype(np.int32))

    label_feature = builder.info.features['label']
    return Dataset(train=read_split('train'), test=read_split('test'),
                   num_classes=label_feature.num_classes,
                   class_names=tuple(label_feature.names))


def _decode_images(encoded_or_paths: Sequence[bytes] | Sequence[str], names: Sequence[str],
                   where: str, *, from_files: bool) -> np.ndarray:
    """Decodes encoded images (JPEG, PNG, ...), or the image files at the given paths, into one
    uint8 (n, h, w, 3) array with tf.data. All must have the size of the first; `names` name
    them in error messages.
    """
    tf = _import_tensorflow()

    # Plain graph code: no Python control flow for autograph to convert.
    @tf.autograph.experimental.do_not_convert
    def decode(source):
        data = tf.io.read_file(source) if from_files else source
        # TF decodes JPEG with libjpeg's fast integer DCT unless told otherwise; the accurate
        # one gives the pixels PIL (and so torchvision's loaders) give, to the last bit.
        return tf.cond(
            tf.io.is_jpeg(data),
            lambda: tf.io.decode_jpeg(data, channels=3, dct_method='INTEGER_ACCURATE'),
            lambda: tf.io.decode_image(data, channels=3, expand_animations=False))

    try:
        expected_shape = tuple(decode(tf.constant(encoded_or_paths[0])).shape)
    except tf.errors.OpError as error:
        raise DatasetError(f'{names[0]} could not be read as an image '
                           f'({_short_reason(error)})') from error

    @tf.autograph.experimental.do_not_convert
    def decode_to_expected_shape(index, source):
        image = decode(source)
        shape = tf.shape(image)
        # A differently sized image would break batching with an obscure error: put zeros in
        # its place, and report it by name below.
        fits = tf.reduce_all(tf.equal(shape, expected_shape))
        image = tf.cond(fits, lambda: image, lambda: tf.zeros(expected_shape, tf.uint8))
        return index, tf.ensure_shape(image, expected_shape), shape

    sources = tf.data.Dataset.from_tensor_slices(list(encoded_or_paths))
    decoded = (tf.data.Dataset.zip(tf.data.Dataset.range(len(names)), sources)
               .map(decode_to_expected_shape, num_parallel_calls=tf.data.AUTOTUNE,
                    deterministic=True)
               # Broken files are dropped here and named below from the missing indices, as
               # TF's own error would not say which file it was.
               .ignore_errors()
               .batch(4096))
    index_batches, image_batches, shape_batches = [], [], []
    for indices, images, shapes in decoded.as_numpy_iterator():
        index_batches.append(indices)
        image_batches.append(images)
        shape_batches.append(shapes)
    missing = np.setdiff1d(np.arange(len(names)), np.concatenate(index_batches))
    if len(missing):
        raise DatasetError(f'{names[missing[0]]} could not be read as an image (not a decodable '
                           f'image file); {len(missing)} of the {len(names)} images of {where} '
                           'could not')
    shapes = np.concatenate(shape_batches)
    misfits = np.flatnonzero(np.any(shapes != expected_shape, axis=1))
    if len(misfits):
        height, width, _ = shapes[misfits[0]]
        raise DatasetError(
            f'{names[misfits[0]]} is {height}x{width} but {names[0]} is '
            f'{expected_shape[0]}x{expected_shape[1]}: all images of {where} must have the same '
            f'size ({len(misfits)} differ)')
    return np.concatenate(image_batches)


def _list_class_folders(split_dir: pathlib.Path) -> dict[str, list[str]]:
    """Paths of the image files of each class folder of a split, sorted by name."""
    if not split_dir.is_dir():
        raise DatasetNotFoundError(
            f'image folder split {split_dir} does not exist: expected '
            f'{split_dir.parent}/{{train,test}}/<class>/<image>')
    # os.scandir knows file types from the directory listing: no stat call per image.
    class_dirs = sorted((entry for entry in os.scandir(split_dir)
                         if entry.is_dir() and not entry.name.startswith('.')),
                        key=lambda entry: entry.name)
    files_by_class = {}
    for class_dir in class_dirs:
        files = sorted(entry.path for entry in os.scandir(class_dir.path)
                       if entry.is_file() and entry.name.lower().endswith(_IMAGE_SUFFIXES))
        if not files:
            raise DatasetNotFoundError(
                f'class folder {class_dir.path} holds no images ({", ".join(_IMAGE_SUFFIXES)})')
        files_by_class[class_dir.name] = files
    if not files_by_class:
        raise DatasetNotFoundError(
            f'image folder split {split_dir} holds no class folders: expected '
            f'{split_dir}/<class>/<image>')
    return files_by_class


def _load_image_folder(data_dir: str | None) -> Dataset:
    if not data_dir:
        raise DatasetNotFoundError('image_folder needs the folder: pass '
                                   '--config.dataset.data_dir=PATH with PATH/{train,test}/'
                                   '<class>/<image>')
    root = pathlib.Path(data_dir).expanduser()
    if not root.is_dir():
        raise DatasetNotFoundError(f'image folder {root} does not exist: pass '
                                   '--config.dataset.data_dir=PATH with PATH/{train,test}/'
                                   '<class>/<image>')
    files_by_split = {split: _list_class_folders(root / split) for split in _SPLITS}
    class_names = tuple(files_by_split['train'])
    test_class_names = tuple(files_by_split['test'])
    if test_class_names != class_names:
        only_train = sorted(set(class_names) - set(test_class_names))
        only_test = sorted(set(test_class_names) - set(class_names))
        raise DatasetError(f'{root}/train and {root}/test must have the same class folders; '
                           f'only in train: {only_train}, only in test: {only_test}')
    splits = {}
    for split, files_by_class in files_by_split.items():
        paths = [path for files in files_by_class.values() for path in files]
        labels = np.concatenate([np.full(len(files), label, np.int32)
                                 for label, files in enumerate(files_by_class.values())])
        images = _decode_images(paths, paths, where=str(root / split), from_files=True)
        splits[split] = Split(images=images, labels=labels)
    return Dataset(train=splits['train'], test=splits['test'], num_classes=len(class_names),
                   class_names=class_names)


def _load_demo(path: pathlib.Path) -> Dataset:
    """The embedded subset built by `alignmix_jax.demo_data.build`."""
    if not path.is_file():
        raise DatasetNotFoundError(
            f'the demo data {path} is missing: rebuild it with `python -m '
            'alignmix_jax.demo_data.build --source ../shared/data/cifar10-jpeg`')
    with np.load(path, allow_pickle=False) as archive:
        contents = {key: archive[key] for key in archive.files}
    splits = {}
    for split in _SPLITS:
        jpeg_bytes = contents[f'{split}_jpeg_bytes']
        offsets = contents[f'{split}_offsets']
        encoded_images = [jpeg_bytes[start:end].tobytes()
                          for start, end in zip(offsets[:-1], offsets[1:], strict=True)]
        names = [f'{path.name}:{split}[{index}]' for index in range(len(encoded_images))]
        images = _decode_images(encoded_images, names, where=f'{path} ({split})',
                                from_files=False)
        splits[split] = Split(images=images, labels=contents[f'{split}_labels'].astype(np.int32))
    class_names = tuple(str(name) for name in contents['class_names'])
    return Dataset(train=splits['train'], test=splits['test'], num_classes=len(class_names),
                   class_names=class_names)
