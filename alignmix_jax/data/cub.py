"""CUB-200-2011 (Wah et al., 2011) with its bounding boxes, for weakly-supervised localisation.

`load_cub(config.dataset)` returns a `LocalizationDataset`, held in memory, with the interface
the training loop reads (`num_classes`, `class_names`, `num_train_examples`, `image_shape`,
`train_batches`, `eval_batches`, as `data.common.Dataset`) and, for the localisation
evaluation, `test_boxes`: the ground-truth box of every test image, in the order of
`eval_batches`, in pixel-edge coordinates (x0, y0, x1, y1) of the resized test image.
Boxes are never used in training.

Sources (`config.dataset.name`):
- 'cub': the official archive CUB_200_2011.tgz extracted in `data_dir`, i.e.
  `data_dir/CUB_200_2011/{images.txt, image_class_labels.txt, train_test_split.txt,
  bounding_boxes.txt, classes.txt, images/<class>/<image>.jpg}` (`data_dir` may also be the
  CUB_200_2011 folder itself). Image ids, labels (1-200 in the files, 0-199 here), the split
  (1 = train) and the boxes (x, y, width, height in original pixels) are read from the lists.
- 'caltech_birds2011': tensorflow-datasets, prepared in `data_dir` (`tfds build
  caltech_birds2011 --data_dir=DIR`); its boxes are tfds BBoxes (ymin, xmin, ymax, xmax)
  relative to the image, the same boxes as bounding_boxes.txt.
Both give 5,994 training and 5,794 test images of 200 classes.

Preprocessing, as the paper's Appendix B (after Yun et al., 2019, CutMix): training images are
resized to `train_resize` x `train_resize` (256; the aspect ratio is not kept, as
torchvision's Resize((256, 256))), a random `image_size` (224) crop is taken and flipped
horizontally with probability 1/2; test images are resized straight to `image_size` x
`image_size`, and their boxes scaled by the same factors. Resizing is bilinear with
antialiasing (PIL's, which torchvision uses), done once at load time; crops and flips are cut
on the host per batch (`device_augmentation` is False), so a config asking the train step to
augment too is refused (`dataset.crop_padding=0`, `dataset.random_flip=False`, as
configs/cub_*.py set them).

Order and resuming: step s's batch is the one `data.common.train_batches` gives (a
permutation per epoch from (seed, epoch)); the crop offsets and flips of the global batch of
step s are drawn from (seed, s), and each process takes its slice, so a resumed run and any
number of processes see the same augmented global batches.
"""

import dataclasses
import os
import pathlib
from collections.abc import Iterator

import ml_collections
import numpy as np

from alignmix_jax.data.common import (
    DatasetError,
    DatasetNotFoundError,
    Split,
    class_balanced_subset,
    decode_image,
    eval_batches,
    import_tensorflow,
    local_batch_size,
    short_reason,
    train_batches,
)

# config.dataset.name of the datasets handled here.
CUB_DATASETS = ('cub', 'caltech_birds2011')
DEFAULT_IMAGE_SIZE = 224
DEFAULT_TRAIN_RESIZE = 256
ARCHIVE_FOLDER = 'CUB_200_2011'
_ARCHIVE_LISTS = ('images.txt', 'image_class_labels.txt', 'train_test_split.txt',
                  'bounding_boxes.txt')
# Stream tag: crop and flip draws are independent of the data order drawn from the same seed.
_AUGMENT_STREAM = 0x63726F70


def _archive_hint(data_dir) -> str:
    return (f'extract the official CUB_200_2011.tgz (https://www.vision.caltech.edu/datasets/'
            f'cub_200_2011/) into DIR so that DIR/{ARCHIVE_FOLDER}/images.txt exists and pass '
            f'--config.dataset.data_dir=DIR (now: {data_dir}), or build tfds caltech_birds2011 '
            f'with `tfds build caltech_birds2011 --data_dir=DIR` and pass '
            f'--config.dataset.name=caltech_birds2011 --config.dataset.data_dir=DIR')


@dataclasses.dataclass(frozen=True, eq=False)
class LocalizationDataset:
    """CUB in memory: train images at train_resize, test images and boxes at image_size."""

    train: Split  # uint8 (n, train_resize, train_resize, 3)
    test: Split  # uint8 (m, image_size, image_size, 3)
    test_boxes: np.ndarray  # float32 (m, 4): (x0, y0, x1, y1) in the test images' pixels
    class_names: tuple[str, ...]
    image_size: int
    # Cropped and flipped on the host per batch; the train step must not augment again.
    device_augmentation = False

    def __post_init__(self):
        train_resize = self.train.images.shape[1]
        if self.train.images.shape[1:3] != (train_resize, train_resize) \
                or train_resize < self.image_size:
            raise ValueError(f'training images must be square and at least {self.image_size} '
                             f'pixels, got {self.train.images.shape[1:3]}')
        if self.test.images.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(f'test images must be {self.image_size}x{self.image_size}, got '
                             f'{self.test.images.shape[1:3]}')
        if self.test_boxes.shape != (len(self.test.labels), 4):
            raise ValueError(f'test_boxes must be ({len(self.test.labels)}, 4), got '
                             f'{self.test_boxes.shape}')

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_train_examples(self) -> int:
        return len(self.train.labels)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.image_size, self.image_size, 3)

    def train_batches(self, batch_size: int, *, seed: int, start_step: int = 0,
                      process_index: int = 0,
                      process_count: int = 1) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Endless (uint8 images (B / P, s, s, 3), int32 labels): random crops and flips of
        the resized training images; see the module docstring for the order."""
        local_size = local_batch_size(batch_size, process_count)
        batches = train_batches(
            self.train, batch_size, seed=seed, start_step=start_step,
            process_index=process_index, process_count=process_count)
        margin = self.train.images.shape[1] - self.image_size
        share = slice(process_index * local_size, (process_index + 1) * local_size)
        for batch_index, (images, labels) in enumerate(batches, start=start_step):
            rng = np.random.default_rng([seed, _AUGMENT_STREAM, batch_index])
            offsets = rng.integers(0, margin + 1, size=(batch_size, 2))[share]
            flips = (rng.random(batch_size) < 0.5)[share]
            yield crop_and_flip(images, offsets, flips, self.image_size), labels

    def eval_batches(self, batch_size: int, *, process_index: int = 0,
                     process_count: int = 1):
        """(images, labels, mask) of the resized test images, padded; as data.common's."""
        return eval_batches(self.test, batch_size, process_index=process_index,
                                           process_count=process_count)


def crop_and_flip(images: np.ndarray, offsets: np.ndarray, flips: np.ndarray,
                  size: int) -> np.ndarray:
    """The size x size crop at (top, left) = offsets[i] of each image, mirrored where flips[i]."""
    crops = np.empty((len(images), size, size, images.shape[-1]), images.dtype)
    for index, (image, (top, left), flip) in enumerate(zip(images, offsets, flips,
                                                           strict=True)):
        crop = image[top:top + size, left:left + size]
        crops[index] = crop[:, ::-1] if flip else crop
    return crops


def load_cub(dataset_config: ml_collections.ConfigDict) -> LocalizationDataset:
    """CUB from the official archive ('cub') or tfds ('caltech_birds2011'); see the docstring."""
    image_size = int(dataset_config.get('image_size', DEFAULT_IMAGE_SIZE))
    train_resize = int(dataset_config.get('train_resize', DEFAULT_TRAIN_RESIZE))
    if not 0 < image_size <= train_resize:
        raise ValueError(f'need 0 < image_size <= train_resize, got image_size={image_size}, '
                         f'train_resize={train_resize}')
    name = dataset_config.name
    if name == 'cub':
        dataset = _load_archive(dataset_config.data_dir, image_size, train_resize)
    elif name == 'caltech_birds2011':
        dataset = _load_tfds(dataset_config.data_dir, image_size, train_resize)
    else:
        raise ValueError(f'unknown CUB dataset {name!r}; expected one of {CUB_DATASETS}')
    if dataset_config.get('train_subset', 0):
        train = class_balanced_subset(dataset.train, dataset_config.train_subset)
        dataset = dataclasses.replace(dataset, train=train)
    return dataset


def _resize_images(tf, sources, size: int, *, from_files: bool, names) -> tuple[np.ndarray,
                                                                                np.ndarray]:
    """Decodes images (paths or encoded bytes), resizes each to size x size (bilinear,
    antialiased); returns uint8 (n, size, size, 3) and the original (height, width) (n, 2)."""

    @tf.autograph.experimental.do_not_convert
    def decode_and_resize(source):
        data = tf.io.read_file(source) if from_files else source
        image = decode_image(tf, data)
        resized = tf.image.resize(image, [size, size], method='bilinear', antialias=True)
        resized = tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)
        return tf.ensure_shape(resized, (size, size, 3)), tf.shape(image)[:2]

    pipeline = (tf.data.Dataset.from_tensor_slices(sources)
                .map(decode_and_resize, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
                .batch(512))
    images, shapes = [], []
    try:
        for image_batch, shape_batch in pipeline.as_numpy_iterator():
            images.append(image_batch)
            shapes.append(shape_batch)
    except tf.errors.OpError as error:
        raise DatasetError(f'an image of {names} could not be read ({short_reason(error)})'
                           ) from error
    return np.concatenate(images), np.concatenate(shapes)


def _read_list(path: pathlib.Path, columns: int) -> dict[int, list[str]]:
    """`<image id> <value> ...` lines of one of the archive's lists, by image id."""
    rows = {}
    with open(path) as list_file:
        for line_number, line in enumerate(list_file, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) < columns + 1:
                raise DatasetError(f'{path}, line {line_number}: expected an image id and '
                                   f'{columns} values, got {line.strip()!r}')
            rows[int(fields[0])] = fields[1:]
    return rows


def _archive_root(data_dir) -> pathlib.Path:
    if not data_dir:
        raise DatasetNotFoundError(f'cub needs its data: {_archive_hint(data_dir)}')
    root = pathlib.Path(data_dir).expanduser()
    for candidate in (root / ARCHIVE_FOLDER, root):
        if (candidate / 'images.txt').is_file():
            return candidate
    raise DatasetNotFoundError(f'CUB-200-2011 not found in {root}: {_archive_hint(data_dir)}')


def _load_archive(data_dir, image_size: int, train_resize: int) -> LocalizationDataset:
    root = _archive_root(data_dir)
    for list_name in _ARCHIVE_LISTS:
        if not (root / list_name).is_file():
            raise DatasetNotFoundError(f'{root / list_name} is missing (an incomplete '
                                       f'extraction?): {_archive_hint(data_dir)}')
    paths = _read_list(root / 'images.txt', 1)
    labels = _read_list(root / 'image_class_labels.txt', 1)
    is_train = _read_list(root / 'train_test_split.txt', 1)
    boxes = _read_list(root / 'bounding_boxes.txt', 4)
    ids = sorted(paths)
    for list_name, rows in (('image_class_labels.txt', labels),
                            ('train_test_split.txt', is_train), ('bounding_boxes.txt', boxes)):
        missing = sorted(set(ids) - set(rows))
        if missing:
            raise DatasetError(f'{root / list_name} has no line for image id {missing[0]} '
                               f'({len(missing)} of {len(ids)} missing)')
    class_ids = np.array([int(labels[image_id][0]) for image_id in ids])
    num_classes = int(class_ids.max())
    if class_ids.min() < 1:
        raise DatasetError(f'{root / "image_class_labels.txt"}: class ids start at 1')
    class_names = _archive_class_names(root, num_classes, paths, labels)
    image_paths = np.array([str(root / 'images' / paths[image_id][0]) for image_id in ids])
    missing_files = [path for path in image_paths if not os.path.isfile(path)]
    if missing_files:
        raise DatasetNotFoundError(f'{missing_files[0]} is missing ({len(missing_files)} of '
                                   f'{len(image_paths)} images): {_archive_hint(data_dir)}')
    train_mask = np.array([is_train[image_id][0] == '1' for image_id in ids])
    # bounding_boxes.txt: x, y, width, height in original pixels -> pixel edges (x0, y0, x1, y1).
    xywh = np.array([[float(value) for value in boxes[image_id][:4]] for image_id in ids])
    edge_boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    tf = import_tensorflow()
    splits = {}
    for split, mask, size in (('train', train_mask, train_resize),
                              ('test', ~train_mask, image_size)):
        if not mask.any():
            raise DatasetError(f'{root / "train_test_split.txt"} puts no image in the {split} '
                               f'split')
        images, shapes = _resize_images(tf, list(image_paths[mask]), size, from_files=True,
                                        names=f'{root} ({split})')
        splits[split] = Split(images=images, labels=(class_ids[mask] - 1).astype(np.int32))
        if split == 'test':
            test_boxes = _scale_boxes(edge_boxes[mask], shapes, image_size)
    return LocalizationDataset(train=splits['train'], test=splits['test'],
                               test_boxes=test_boxes, class_names=class_names,
                               image_size=image_size)


def _archive_class_names(root: pathlib.Path, num_classes: int, paths, labels) -> tuple:
    """From classes.txt ('1 001.Black_footed_Albatross'), else from the image folders."""
    names = {}
    classes_file = root / 'classes.txt'
    if classes_file.is_file():
        names = {class_id: fields[0] for class_id, fields
                 in _read_list(classes_file, 1).items()}
    else:
        for image_id, fields in paths.items():
            names.setdefault(int(labels[image_id][0]), fields[0].split('/')[0])
    return tuple(names.get(class_id, str(class_id)) for class_id in range(1, num_classes + 1))


def _scale_boxes(edge_boxes: np.ndarray, original_shapes: np.ndarray,
                 image_size: int) -> np.ndarray:
    """Pixel-edge boxes of the original images -> of the images resized to image_size square."""
    heights, widths = original_shapes[:, 0:1].astype(np.float64), original_shapes[:, 1:2]
    scale = np.concatenate([image_size / widths, image_size / heights] * 2, axis=1)
    return np.clip(edge_boxes * scale, 0, image_size).astype(np.float32)


def _load_tfds(data_dir, image_size: int, train_resize: int) -> LocalizationDataset:
    import_tensorflow()  # configured before tfds starts TensorFlow
    import tensorflow_datasets as tfds

    builder = tfds.builder('caltech_birds2011', data_dir=data_dir)
    if not builder.is_prepared():
        raise DatasetNotFoundError(f'caltech_birds2011 is not prepared in {builder.data_dir}: '
                                   f'{_archive_hint(data_dir)}')
    return tfds_dataset(builder, image_size=image_size, train_resize=train_resize)


def tfds_dataset(builder, *, image_size: int = DEFAULT_IMAGE_SIZE,
                 train_resize: int = DEFAULT_TRAIN_RESIZE) -> LocalizationDataset:
    """A LocalizationDataset of a prepared tfds builder with caltech_birds2011's layout:
    'train' and 'test' splits of encoded 'image's, ClassLabel 'label's and BBox 'bbox'es."""
    tf = import_tensorflow()
    import tensorflow_datasets as tfds

    splits, test_boxes = {}, None
    for split, size in (('train', train_resize), ('test', image_size)):
        examples = builder.as_dataset(split=split, shuffle_files=False,
                                      decoders={'image': tfds.decode.SkipDecoding()})
        encoded, labels, boxes = [], [], []
        for example in examples.as_numpy_iterator():
            encoded.append(example['image'])
            labels.append(example['label'])
            boxes.append(example['bbox'])
        images, _ = _resize_images(tf, encoded, size, from_files=False,
                                   names=f'caltech_birds2011 ({split})')
        splits[split] = Split(images=images, labels=np.asarray(labels, np.int32))
        if split == 'test':
            # tfds BBox: (ymin, xmin, ymax, xmax) relative to the image.
            relative = np.asarray(boxes, np.float64).reshape(-1, 4)
            test_boxes = (relative[:, [1, 0, 3, 2]] * image_size).astype(np.float32)
    return LocalizationDataset(train=splits['train'], test=splits['test'],
                               test_boxes=test_boxes,
                               class_names=tuple(builder.info.features['label'].names),
                               image_size=image_size)
