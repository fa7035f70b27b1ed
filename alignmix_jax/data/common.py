"""What every dataset shares: the split and dataset types and their errors, batching on the host,
class-balanced subsets, image decoding (PIL) and class-folder listing, the quiet TensorFlow import.

- `train_batches` cuts training batches on the host from a permutation per epoch,
  `np.random.default_rng([seed, epoch]).permutation(n)`, dropping the incomplete last batch.
  Any step's batch is a function of (seed, step) alone, so a resumed run starting at step k
  sees exactly the batches an uninterrupted one would, without replaying earlier epochs.
- `eval_batches` covers every test image once, in order; the last batch is padded and masked
  (`pad_batch`) so that the jitted evaluation step has a single shape. Process p reads the p-th
  contiguous share (`share_bounds`).

A dataset says whether the train step augments its batches on the device
(`device_augmentation`: the in-memory datasets) or its own pipeline already did (ImageNet,
CUB). TensorFlow is imported only when a dataset read through tf.data or tfds is read (tfds
CIFAR, ImageNet, CUB, folders on gs://...), quietly and with no GPU visible to it; the demo and
local image folders are decoded with PIL and need no TensorFlow.
"""

import concurrent.futures
import dataclasses
import io
import os
import re
from collections.abc import Iterator, Sequence

import numpy as np

# The training subset must be the same whatever the run's seed, so it has its own fixed seed.
SUBSET_SEED = 0
IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.gif')


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
    # In-memory images are augmented inside the train step (crop, flip, jitter, rotation).
    device_augmentation = True

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


def class_balanced_indices(labels: np.ndarray, size: int) -> np.ndarray:
    """Sorted indices of a fixed random subset of `size` examples whose class counts differ by
    at most one (as long as every class has enough; otherwise the rarer ones are used up)."""
    num_examples = len(labels)
    if not 0 < size <= num_examples:
        raise ValueError(f'train_subset must be in [0, {num_examples}], got {size}')
    order = np.random.default_rng(SUBSET_SEED).permutation(num_examples)
    ordered_labels = labels[order]
    # Rank of each example among those of its class in the random order: taking examples by
    # increasing rank takes one of each class in turn.
    rank_in_class = np.empty(num_examples, np.int64)
    for label in np.unique(ordered_labels):
        members = np.flatnonzero(ordered_labels == label)
        rank_in_class[members] = np.arange(len(members))
    by_rank = np.lexsort((np.arange(num_examples), rank_in_class))
    return np.sort(order[by_rank[:size]])


def class_balanced_subset(split: Split, size: int) -> Split:
    """The examples of `split` at `class_balanced_indices(split.labels, size)`."""
    chosen = class_balanced_indices(split.labels, size)
    return Split(images=split.images[chosen], labels=split.labels[chosen])


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Training batches per epoch: the incomplete last batch is dropped."""
    if batch_size <= 0 or num_examples < batch_size:
        raise ValueError(f'batch size {batch_size} must be in [1, {num_examples}] (the number '
                         'of training images)')
    return num_examples // batch_size


def local_batch_size(batch_size: int, process_count: int) -> int:
    """Each process's part of a global batch."""
    if batch_size % process_count:
        raise ValueError(f'the batch size {batch_size} must be a multiple of the number of '
                         f'processes, {process_count}')
    return batch_size // process_count


def check_process(process_index: int, process_count: int):
    if not 0 <= process_index < process_count:
        raise ValueError(f'process_index {process_index} must be in [0, {process_count})')


def share_bounds(num_examples: int, process_count: int) -> np.ndarray:
    """Start and stop of each process's contiguous evaluation share (near-equal sizes)."""
    return np.linspace(0, num_examples, process_count + 1).round().astype(np.int64)


def pad_batch(images: np.ndarray, labels: np.ndarray,
              size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, labels, mask) padded to `size` with zero images, label 0 and mask False."""
    mask = np.ones(len(labels), bool)
    padding = size - len(labels)
    if padding:
        images = np.concatenate([images, np.zeros((padding, *images.shape[1:]), np.uint8)])
        labels = np.concatenate([labels, np.zeros(padding, np.int32)])
        mask = np.concatenate([mask, np.zeros(padding, bool)])
    return images, labels.astype(np.int32), mask


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
    local_size = local_batch_size(batch_size, process_count)
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
    local_size = local_batch_size(batch_size, process_count)
    num_examples = len(split.labels)
    bounds = share_bounds(num_examples, process_count)
    share_start, share_stop = bounds[process_index], bounds[process_index + 1]
    largest_share = int(np.max(np.diff(bounds)))
    for offset in range(0, max(largest_share, 1), local_size):
        start = min(share_start + offset, share_stop)
        stop = min(start + local_size, share_stop)
        yield pad_batch(split.images[start:stop], split.labels[start:stop], local_size)


# What the datasets read through tf.data (tfds CIFAR, ImageNet, CUB, gs:// folders) need.
TENSORFLOW_PIN = 'pip install tensorflow-cpu==2.21.0 tensorflow-datasets==4.9.10'


def import_tensorflow():
    """TensorFlow for reading data only: quiet, and with no GPU (that memory is JAX's).

    Only the datasets streamed or prepared through tf.data and tfds call it; without
    TensorFlow they stop with a `DatasetError` saying how to install it, and the others
    (the demo, local image folders) train as usual.
    """
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    # Silences the oneDNN banner printed on import; oneDNN only speeds up TF's own math, and
    # TF does none here beyond decoding images.
    os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
    try:
        import tensorflow as tf
    except ImportError as error:
        raise DatasetError(f'this dataset is read with TensorFlow (tf.data, tfds), which cannot '
                           f'be imported ({short_reason(error)}): {TENSORFLOW_PIN}; the demo and '
                           f'local image folders need no TensorFlow') from None

    try:
        tf.config.set_visible_devices([], 'GPU')
    except RuntimeError:
        pass  # TF's devices were initialised earlier, by code that had its own say on GPUs.
    return tf


def short_reason(error: BaseException) -> str:
    # TensorFlow prefixes its messages with the graph node, as {{function_node ...}}.
    message = re.sub(r'\{\{.*?\}\}\s*', '', str(error))
    lines = message.strip().splitlines()
    first_line = lines[0] if lines else ''
    if len(first_line) > 160:
        first_line = first_line[:157] + '...'
    return f'{type(error).__name__}: {first_line}' if first_line else type(error).__name__


def decode_image(tf, data):
    """One encoded image (JPEG, PNG, ...; a string tensor) as uint8 RGB, graph code.

    TF decodes JPEG with libjpeg's fast integer DCT unless told otherwise; the accurate one
    gives the pixels PIL (and so torchvision's loaders) give, to the last bit.
    """
    return tf.cond(
        tf.io.is_jpeg(data),
        lambda: tf.io.decode_jpeg(data, channels=3, dct_method='INTEGER_ACCURATE'),
        lambda: tf.io.decode_image(data, channels=3, expand_animations=False))


def _decode_with_pil(source: bytes | str, *, from_file: bool) -> np.ndarray:
    """One image file's (or encoded image's) pixels as uint8 RGB (h, w, 3), read by PIL.

    PIL decodes JPEG with libjpeg's accurate integer DCT and fancy upsampling, as TensorFlow's
    `decode_jpeg(dct_method='INTEGER_ACCURATE')` does (`decode_image` above): the same pixels,
    to the last bit (tests/test_tensorflow_free.py checks it on the shared CIFAR-10 JPEGs and the
    demo's images). Greyscale and palette images are expanded to RGB and an alpha channel is
    dropped, as `channels=3` does; an animation gives its first frame.
    """
    from PIL import Image

    with Image.open(source if from_file else io.BytesIO(source)) as image:
        return np.asarray(image.convert('RGB'))


def decode_images(encoded_or_paths: Sequence[bytes] | Sequence[str], names: Sequence[str],
                  where: str, *, from_files: bool) -> np.ndarray:
    """Decodes encoded images (JPEG, PNG, ...), or the image files at the given paths, into one
    uint8 (n, h, w, 3) array, with PIL on a pool of threads (its decoders release the GIL).
    All must have the size of the first; `names` name them in error messages.

    PIL rather than tf.data: the in-memory datasets then need no TensorFlow at all (the machine
    that trains may have none), with the pixels TensorFlow gave (`_decode_with_pil`).
    """
    from PIL import UnidentifiedImageError

    def decode(index):
        try:
            return _decode_with_pil(encoded_or_paths[index], from_file=from_files)
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as error:
            return error  # named below, with how many others failed

    try:
        first = _decode_with_pil(encoded_or_paths[0], from_file=from_files)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as error:
        raise DatasetError(f'{names[0]} could not be read as an image '
                           f'({short_reason(error)})') from error
    expected_shape = first.shape
    images = np.empty((len(names), *expected_shape), np.uint8)
    images[0] = first
    broken, misfits = [], []
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(32, os.cpu_count() or 1)) as pool:
        for index, image in enumerate(pool.map(decode, range(1, len(names))), start=1):
            if isinstance(image, Exception):
                broken.append(index)
            elif image.shape != expected_shape:
                misfits.append((index, image.shape))
            else:
                images[index] = image
    if broken:
        raise DatasetError(f'{names[broken[0]]} could not be read as an image (not a decodable '
                           f'image file); {len(broken)} of the {len(names)} images of {where} '
                           'could not')
    if misfits:
        index, (height, width, _) = misfits[0]
        raise DatasetError(
            f'{names[index]} is {height}x{width} but {names[0]} is '
            f'{expected_shape[0]}x{expected_shape[1]}: all images of {where} must have the same '
            f'size ({len(misfits)} differ)')
    return images


class _local_gfile:  # noqa: N801  (stands in for the module tf.io.gfile)
    """The two tf.io.gfile functions `list_class_folders` uses, for local paths, with `os`."""

    isdir = staticmethod(os.path.isdir)
    listdir = staticmethod(os.listdir)


def list_class_folders(split_dir: str, kind: str, *, missing: str,
                       empty: str) -> dict[str, list[str]]:
    """Sorted image paths of each class folder of a split, by sorted class name.

    Local paths (listed with `os`, no TensorFlow) or any filesystem tf.io.gfile knows
    (gs://...); names only, no stat per file (ImageNet's train split holds 1.28 million).
    `missing` and `empty` end the errors for a split folder that does not exist or holds no
    class folders (what to pass instead); `kind` names the dataset in them. A class folder that
    is a dangling symbolic link or cannot be listed is an error; hidden entries and files beside
    the class folders are skipped.
    """
    gfile = _local_gfile if '://' not in split_dir else import_tensorflow().io.gfile
    if not gfile.isdir(split_dir):
        raise DatasetNotFoundError(f'{kind} split {split_dir} does not exist: {missing}')
    files_by_class = {}
    for entry in sorted(gfile.listdir(split_dir)):
        class_name = entry.rstrip('/')
        class_dir = os.path.join(split_dir, class_name)
        if class_name.startswith('.'):
            continue
        if not gfile.isdir(class_dir):
            _check_not_a_dangling_link(class_dir)
            continue
        # tf.io.gfile raises its own errors for remote folders; os raises OSError.
        listing_errors = (OSError,) if gfile is _local_gfile else (
            OSError, import_tensorflow().errors.OpError)
        try:
            names = gfile.listdir(class_dir)
        except listing_errors as error:
            raise DatasetError(f'class folder {class_dir} cannot be read '
                               f'({short_reason(error)})') from error
        files = sorted(os.path.join(class_dir, name) for name in names
                       if name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith('.'))
        if not files:
            raise DatasetNotFoundError(f'class folder {class_dir} holds no images '
                                       f'({", ".join(IMAGE_SUFFIXES)})')
        files_by_class[class_name] = files
    if not files_by_class:
        raise DatasetNotFoundError(f'{kind} split {split_dir} holds no class folders: {empty}')
    return files_by_class


def _check_not_a_dangling_link(path: str) -> None:
    """DatasetNotFoundError for a symbolic link to nothing among the class folders (a share
    that is not mounted), which would otherwise drop its class without a word."""
    if os.path.islink(path) and not os.path.exists(path):
        raise DatasetNotFoundError(
            f'class folder {path} is a symbolic link to {os.readlink(path)}, which does not '
            f'exist (a share not mounted?): mount it, or remove the link to train without '
            f'that class')
