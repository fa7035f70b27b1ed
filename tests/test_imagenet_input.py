"""Streaming ImageNet input on tiny generated folders: shapes, per-process coverage of train
epochs and of the validation split, exact resuming, torchvision's crops, errors.

Every generated image is one flat colour, unique to it: a random-resized crop of it is the same
flat colour, so the batches can be traced back to the files they came from.
"""

import functools
import itertools
import pathlib

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from alignmix_jax import data
from alignmix_jax.data import common as data_common
from alignmix_jax.data import imagenet, imagenet_transforms

IMAGE_SIZE = 32
EVAL_RESIZE = 40
CLASSES = ('n01', 'n02', 'n03')
TRAIN_PER_CLASS = (6, 6, 6)
VAL_PER_CLASS = (4, 3, 4)
BATCH = 6  # divides over 1, 2 and 3 processes; 18 training images = 3 steps per epoch
# Flat colours 50 levels apart: JPEG (a few levels) and lighting noise cannot confuse them.
LEVELS = (20, 70, 120, 170, 220)
GRAYS = [(level,) * 3 for level in LEVELS]
COLOURS = [colour for colour in itertools.product(LEVELS, repeat=3) if len(set(colour)) > 1]
# (height, width): landscape, portrait, square, and two too elongated for any crop attempt
# (RandomResizedCrop's centred fallback).
SIZES = ((200, 300), (180, 150), (64, 64), (90, 410), (400, 40), (121, 97))


def tf_module():
    return data_common.import_tensorflow()


def write_image(path: pathlib.Path, colour, size, kind):
    height, width = size
    if kind == 'gray':
        Image.new('L', (width, height), colour[0]).save(path, quality=95)
    elif kind == 'cmyk':
        Image.new('RGB', (width, height), colour).convert('CMYK').save(path, quality=95)
    else:
        Image.new('RGB', (width, height), colour).save(path, quality=95)


def make_folder(root: pathlib.Path):
    """The tiny folder; returns {colour: (split, label)} of its images."""
    colours = iter(COLOURS)
    grays = iter(GRAYS)
    owner = {}
    rng = np.random.default_rng(0)
    for split, per_class in (('train', TRAIN_PER_CLASS), ('val', VAL_PER_CLASS)):
        for label, (name, count) in enumerate(zip(CLASSES, per_class, strict=True)):
            (root / split / name).mkdir(parents=True)
            for index in range(count):
                # One grayscale, one CMYK and one PNG image in each split, the rest RGB JPEG.
                kind = {0: 'gray', 1: 'cmyk', 2: 'png'}.get(index + 3 * label, 'rgb')
                colour = next(grays) if kind == 'gray' else next(colours)
                suffix = '.png' if kind == 'png' else '.JPEG'
                size = SIZES[rng.integers(len(SIZES))]
                write_image(root / split / name / f'img{index}{suffix}', colour, size, kind)
                owner[colour] = (split, label)
    return owner


def dataset_config(data_dir, **overrides):
    config = ml_collections.ConfigDict({
        'name': 'imagenet_folder', 'data_dir': str(data_dir), 'train_subset': 0,
        'image_size': IMAGE_SIZE, 'eval_resize': EVAL_RESIZE, 'pca_lighting': False})
    config.update(overrides)
    return config


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp('imagenet')
    return root, make_folder(root)


@pytest.fixture(scope='module')
def dataset(folder):
    return imagenet.load_imagenet(dataset_config(folder[0]))


def identify(images, owner):
    """The colour (key of `owner`) of each flat image of a batch."""
    palette = np.array(list(owner), np.float64)
    pixels = images.reshape(len(images), -1, 3).astype(np.float64)
    # A flat source stays flat through crop, resize and flip.
    assert np.all(pixels.max(axis=1) - pixels.min(axis=1) <= 4)
    means = pixels.mean(axis=1)
    nearest = np.argmin(np.linalg.norm(means[:, None] - palette[None], axis=-1), axis=1)
    assert np.all(np.abs(means - palette[nearest]) < 6)
    return [tuple(int(value) for value in palette[index]) for index in nearest]


def global_stream(dataset, process_count, num_steps, *, seed=0, start_step=0, batch=BATCH):
    """The global batches of `num_steps` steps: the processes' shares concatenated in order."""
    iterators = [dataset.train_batches(batch, seed=seed, start_step=start_step,
                                       process_index=index, process_count=process_count)
                 for index in range(process_count)]
    stream = []
    for _ in range(num_steps):
        shares = [next(iterator) for iterator in iterators]
        for images, labels in shares:
            assert images.shape == (batch // process_count, IMAGE_SIZE, IMAGE_SIZE, 3)
            assert images.dtype == np.uint8 and labels.dtype == np.int32
        stream.append((np.concatenate([images for images, _ in shares]),
                       np.concatenate([labels for _, labels in shares])))
    return stream


@pytest.fixture(scope='module')
def flat_stream(dataset):
    return global_stream(dataset, 1, 6)


@pytest.fixture(scope='module')
def textured_dataset(tmp_path_factory):
    """Noise images, on which every crop, flip and resize shows: for comparing streams."""
    root = tmp_path_factory.mktemp('textured')
    rng = np.random.default_rng(1)
    for split, per_class in (('train', TRAIN_PER_CLASS), ('val', (1, 1, 1))):
        for name, count in zip(CLASSES, per_class, strict=True):
            (root / split / name).mkdir(parents=True)
            for index in range(count):
                height, width = SIZES[rng.integers(len(SIZES))]
                pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f'{index}.jpg', quality=90)
    return imagenet.load_imagenet(dataset_config(root))


@pytest.fixture(scope='module')
def textured_stream(textured_dataset):
    return global_stream(textured_dataset, 1, 6)


def test_dataset_description(dataset):
    assert dataset.class_names == CLASSES
    assert dataset.num_classes == 3
    assert dataset.num_train_examples == sum(TRAIN_PER_CLASS)
    assert dataset.image_shape == (IMAGE_SIZE, IMAGE_SIZE, 3)


@pytest.mark.slow  # compiles or trains for many seconds (see docs/testing.md)
@pytest.mark.parametrize('process_count', [1, 2, 3])
def test_train_epochs_cover_each_image_once(dataset, folder, flat_stream, process_count):
    _, owner = folder
    stream = global_stream(dataset, process_count, 6)
    train_colours = {colour for colour, (split, _) in owner.items() if split == 'train'}
    epochs = []
    for epoch in range(2):
        seen = []
        for images, labels in stream[3 * epoch:3 * epoch + 3]:
            colours = identify(images, owner)
            assert [owner[colour] for colour in colours] == [('train', int(label))
                                                             for label in labels]
            seen += colours
        # Disjoint shares that together cover every training image once per epoch.
        assert sorted(seen) == sorted(train_colours)
        epochs.append(seen)
    assert epochs[0] != epochs[1]  # reshuffled
    expected = [identify(images, owner) for images, _ in flat_stream]
    assert [identify(images, owner) for images, _ in stream] == expected


@pytest.mark.slow  # compiles or trains for many seconds (see docs/testing.md)
@pytest.mark.parametrize('process_count', [2, 3])
def test_global_batches_do_not_depend_on_the_process_count(textured_dataset, textured_stream,
                                                           process_count):
    # The augmentation of an image is keyed by its position in the epoch, not in a share.
    stream = global_stream(textured_dataset, process_count, 6)
    for (images, labels), (expected_images, expected_labels) in zip(
            stream, textured_stream, strict=True):
        np.testing.assert_array_equal(images, expected_images)
        np.testing.assert_array_equal(labels, expected_labels)


def test_train_order_is_the_seeded_permutation(folder, flat_stream):
    _, owner = folder
    train_colours = [colour for colour, (split, _) in owner.items() if split == 'train']
    # The listing order is class by class, file by file, as written by make_folder.
    for epoch in range(2):
        order = np.random.default_rng([0, epoch]).permutation(len(train_colours))
        seen = [colour for images, _ in flat_stream[3 * epoch:3 * epoch + 3]
                for colour in identify(images, owner)]
        assert seen == [train_colours[index] for index in order]


def test_train_stream_is_reproducible_and_depends_on_the_seed(textured_dataset,
                                                             textured_stream):
    again = global_stream(textured_dataset, 1, 2)
    for (images, labels), (expected_images, expected_labels) in zip(
            again, textured_stream[:2], strict=False):
        np.testing.assert_array_equal(images, expected_images)
        np.testing.assert_array_equal(labels, expected_labels)
    other_seed = global_stream(textured_dataset, 1, 1, seed=1)
    assert not np.array_equal(other_seed[0][0], textured_stream[0][0])


def test_train_crops_and_flips_real_content(tmp_path):
    # A left/right-split image: flips and crops move the boundary; both halves show up.
    root = tmp_path / 'halves'
    pixels = np.zeros((120, 160, 3), np.uint8)
    pixels[:, 80:] = 255
    for split in ('train', 'val'):
        (root / split / 'a').mkdir(parents=True)
        for index in range(10):  # copies, so that 40 draws take few epochs
            Image.fromarray(pixels).save(root / split / 'a' / f'halves{index}.png')
    dataset = imagenet.load_imagenet(dataset_config(root))
    iterator = dataset.train_batches(2, seed=0)
    left_bright = []
    for _ in range(20):
        for image in next(iterator)[0].astype(int):
            left, right = image[:, :IMAGE_SIZE // 4].mean(), image[:, -IMAGE_SIZE // 4:].mean()
            if abs(left - right) > 200:
                left_bright.append(left > right)
    # Some crops straddle the boundary; of those, flipped ones have the bright half on the left.
    assert len(left_bright) >= 5 and 0 < sum(left_bright) < len(left_bright)


@pytest.mark.slow  # compiles or trains for many seconds (see docs/testing.md)
@pytest.mark.parametrize('process_count, start_step', [(1, 4), (2, 4), (3, 3), (2, 5)])
def test_start_step_resumes_the_uninterrupted_stream(textured_dataset, textured_stream,
                                                     process_count, start_step):
    resumed = global_stream(textured_dataset, process_count, 6 - start_step,
                            start_step=start_step)
    for (images, labels), (expected_images, expected_labels) in zip(
            resumed, textured_stream[start_step:], strict=True):
        np.testing.assert_array_equal(images, expected_images)
        np.testing.assert_array_equal(labels, expected_labels)


@pytest.mark.parametrize('process_count, batch', [(1, BATCH), (2, BATCH), (3, BATCH), (3, 30)])
def test_eval_counts_every_image_once(dataset, folder, process_count, batch):
    _, owner = folder
    local_size = batch // process_count
    seen, batch_counts = [], []
    for index in range(process_count):
        batches = list(dataset.eval_batches(batch, process_index=index,
                                            process_count=process_count))
        batch_counts.append(len(batches))
        for images, labels, mask in batches:
            assert images.shape == (local_size, IMAGE_SIZE, IMAGE_SIZE, 3)
            assert images.dtype == np.uint8 and labels.dtype == np.int32 and mask.dtype == bool
            assert not np.any(images[~mask]) and not np.any(labels[~mask])
            if mask.any():
                colours = identify(images[mask], owner)
                assert [owner[colour] for colour in colours] == [('val', int(label))
                                                                 for label in labels[mask]]
                seen += colours
    # Collective evaluation steps line up: every process yields as many batches.
    assert len(set(batch_counts)) == 1
    assert sorted(seen) == sorted(colour for colour, (split, _) in owner.items()
                                  if split == 'val')


def write_ramp(path, height, width):
    """A PNG whose red channel is 2 x row and green channel 2 x column."""
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing='ij')
    pixels = np.stack([2 * rows, 2 * cols, np.zeros_like(rows)], axis=-1).astype(np.uint8)
    Image.fromarray(pixels).save(path)


def test_eval_resizes_the_shorter_side_and_takes_the_centre(tmp_path):
    # torchvision's Resize(40): shorter side 40, longer side 40 x long / short truncated; then
    # CenterCrop(32) from round((size - 32) / 2), half to even. The ramps stay linear away from
    # the borders: resized pixel i shows the source at (i + 0.5) x scale - 0.5.
    root = tmp_path / 'ramps'
    for split in ('train', 'val'):
        (root / split / 'a').mkdir(parents=True)
    write_ramp(root / 'train' / 'a' / 'any.png', 80, 80)
    cases = {  # name: (source height, width), (resized height, width), (top, left)
        'a_portrait.png': ((120, 80), (60, 40), (14, 4)),
        'b_half.png': ((122, 80), (61, 40), (14, 4)),  # 14.5 rounds to 14
        'c_truncated.png': ((123, 80), (61, 40), (14, 4)),  # 61.5 truncates to 61
        'd_landscape.png': ((80, 122), (40, 61), (4, 14)),
    }
    for name, (source, _, _) in cases.items():
        write_ramp(root / 'val' / 'a' / name, *source)
    dataset = imagenet.load_imagenet(dataset_config(root))
    (images, _, mask), = dataset.eval_batches(4)
    assert mask.all()
    index = np.arange(IMAGE_SIZE)
    for image, (source, resized, offset) in zip(images.astype(int), cases.values(),
                                                strict=True):
        for axis, channel in ((0, 0), (1, 1)):
            scale = source[axis] / resized[axis]
            expected = 2 * ((offset[axis] + index + 0.5) * scale - 0.5)
            profile = image[:, 0, channel] if axis == 0 else image[0, :, channel]
            assert np.max(np.abs(profile - expected)) <= 0.5 + 1e-3
        assert not np.any(image[..., 2])


def test_random_resized_crop_windows_follow_torchvision():
    tf = tf_module()
    crop_window = functools.partial(imagenet_transforms._crop_window, tf)

    def windows(height, width, count=400):
        seeds = tf.data.Dataset.range(count).map(
            lambda key: crop_window(height, width, tf.stack([tf.constant(7, tf.int64), key])))
        return next(seeds.batch(count).as_numpy_iterator())

    top, left, crop_height, crop_width = windows(300, 400).T
    assert np.all((top >= 0) & (left >= 0) & (top + crop_height <= 300)
                  & (left + crop_width <= 400))
    area = crop_height * crop_width / (300 * 400)
    ratio = crop_width / crop_height
    # Rounding the sides to pixels moves area and ratio slightly past their ranges.
    assert area.min() >= 0.07 and area.max() <= 1.0
    assert ratio.min() >= 0.74 and ratio.max() <= 1.35
    # Log-uniform ratio: as many windows wider than tall as taller than wide.
    assert 0.4 < np.mean(ratio > 1) < 0.6
    assert len(set(zip(top, left, strict=True))) > 300
    # No attempt fits a 10-pixel-high strip: the centred crop of the widest allowed ratio.
    np.testing.assert_array_equal(windows(10, 1000, 3), [[0, 493, 10, 13]] * 3)
    np.testing.assert_array_equal(windows(1000, 10, 3), [[493, 0, 13, 10]] * 3)


def test_pca_lighting_shifts_each_image_by_a_colour(folder, flat_stream):
    root, owner = folder
    lit = imagenet.load_imagenet(dataset_config(root, pca_lighting=True))
    stream = global_stream(lit, 1, 1)
    images, plain = stream[0][0].astype(int), flat_stream[0][0].astype(int)
    assert identify(stream[0][0], owner) == identify(flat_stream[0][0], owner)
    shifts = (images - plain).reshape(len(images), -1, 3)
    # One colour per image (+-1 for rounding), along the eigenvectors scaled by 255 eigval.
    assert np.all(shifts.max(axis=1) - shifts.min(axis=1) <= 1)
    mean_shift = shifts.mean(axis=1)
    assert np.any(np.abs(mean_shift) >= 1)
    eigvec = np.array(imagenet_transforms.LIGHTING_EIGVEC)
    alpha = np.linalg.solve(eigvec, mean_shift.T).T / (255 * np.array(
        imagenet_transforms.LIGHTING_EIGVAL))
    assert np.all(np.abs(alpha[:, 0]) < 5 * imagenet_transforms.LIGHTING_STD)


def test_train_subset_is_class_balanced(folder):
    root, owner = folder
    subset = imagenet.load_imagenet(dataset_config(root, train_subset=9))
    assert subset.num_train_examples == 9
    (images, labels), = global_stream(subset, 1, 1, batch=9)
    assert np.bincount(labels, minlength=3).tolist() == [3, 3, 3]
    assert len(set(identify(images, owner))) == 9


def test_batch_size_must_split_over_processes(dataset):
    with pytest.raises(ValueError, match='multiple of the number of processes'):
        dataset.train_batches(BATCH, seed=0, process_index=0, process_count=4)
    with pytest.raises(ValueError, match='multiple of the number of processes'):
        dataset.eval_batches(BATCH, process_index=0, process_count=4)


class FlatImagenet2012(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """imagenet2012's layout in miniature: 'train' and 'validation' splits of flat JPEGs whose
    grey level, 6 + 12 i, names example i."""

    VERSION = tfds.core.Version('1.0.0')
    SPLIT_SIZES = {'train': 18, 'validation': 11}

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self, supervised_keys=('image', 'label'),
            features=tfds.features.FeaturesDict({
                'image': tfds.features.Image(encoding_format='jpeg'),
                'label': tfds.features.ClassLabel(names=list(CLASSES))}))

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {split: self._generate_examples(size) for split, size in self.SPLIT_SIZES.items()}

    def _generate_examples(self, size):
        for index in range(size):
            shape = SIZES[index % len(SIZES)] + (3,)
            yield index, {'image': np.full(shape, 6 + 12 * index, np.uint8), 'label': index % 3}


def example_ids(images, labels):
    ids = np.round((images.reshape(len(images), -1).mean(axis=1) - 6) / 12).astype(int)
    np.testing.assert_array_equal(labels, ids % 3)
    return ids.tolist()


@pytest.fixture(scope='module')
def tfds_imagenet(tmp_path_factory):
    builder = FlatImagenet2012(data_dir=str(tmp_path_factory.mktemp('tfds')))
    builder.download_and_prepare()
    return imagenet.tfds_dataset(builder, image_size=IMAGE_SIZE, eval_resize=EVAL_RESIZE)


@pytest.mark.slow  # compiles or trains for many seconds (see docs/testing.md)
@pytest.mark.parametrize('process_count', [1, 2, 3])
def test_tfds_source_shares_cover_train_and_validation(tfds_imagenet, process_count):
    assert tfds_imagenet.num_train_examples == 18 and tfds_imagenet.class_names == CLASSES
    # Train: each process reads its own split_for_jax_process share, all of it every epoch.
    stream = global_stream(tfds_imagenet, process_count, 6)
    local_size = BATCH // process_count
    for epoch in range(2):
        shares = [[] for _ in range(process_count)]
        for images, labels in stream[3 * epoch:3 * epoch + 3]:
            ids = example_ids(images, labels)
            for index in range(process_count):
                shares[index] += ids[index * local_size:(index + 1) * local_size]
        assert sorted(sum(shares, [])) == list(range(18))
    # Resuming at step 4 replays steps 4 and 5.
    resumed = global_stream(tfds_imagenet, process_count, 2, start_step=4)
    for (images, labels), (expected_images, expected_labels) in zip(resumed, stream[4:],
                                                                    strict=True):
        np.testing.assert_array_equal(images, expected_images)
        np.testing.assert_array_equal(labels, expected_labels)
    # Validation: every example once, as many batches in every process.
    seen, batch_counts = [], []
    for index in range(process_count):
        batches = list(tfds_imagenet.eval_batches(BATCH, process_index=index,
                                                  process_count=process_count))
        batch_counts.append(len(batches))
        for images, labels, mask in batches:
            assert images.shape == (local_size, IMAGE_SIZE, IMAGE_SIZE, 3)
            seen += example_ids(images[mask], labels[mask])
    assert len(set(batch_counts)) == 1 and sorted(seen) == list(range(11))


def assert_one_line(error):
    message = str(error.value)
    assert message and '\n' not in message
    assert isinstance(error.value, data.DatasetError)
    return message


def test_unprepared_tfds_imagenet_says_what_to_do(tmp_path):
    with pytest.raises(data.DatasetNotFoundError) as error:
        imagenet.load_imagenet(dataset_config(tmp_path, name='imagenet2012'))
    message = assert_one_line(error)
    for part in (f'{tmp_path}/downloads/manual/', 'ILSVRC2012_img_train.tar',
                 'ILSVRC2012_img_val.tar', f'tfds build imagenet2012 --data_dir={tmp_path}',
                 '--config.dataset.name=imagenet_folder'):
        assert part in message


@pytest.mark.parametrize('layout, expected', [
    (None, 'needs the folder'),
    ('missing', 'does not exist'),
    ('no_val', 'val does not exist'),
    ('empty_class', 'holds no images'),
    ('class_mismatch', 'must have the same class folders'),
])
def test_folder_errors_are_one_line(tmp_path, layout, expected):
    if layout is not None:
        for split in ('train', 'val'):
            if not (layout == 'no_val' and split == 'val'):
                (tmp_path / split / 'a').mkdir(parents=True)
                write_image(tmp_path / split / 'a' / 'x.jpg', (20, 70, 120), (40, 40), 'rgb')
        if layout == 'empty_class':
            (tmp_path / 'val' / 'b').mkdir()
        if layout == 'class_mismatch':
            (tmp_path / 'train' / 'b').mkdir()
            write_image(tmp_path / 'train' / 'b' / 'y.jpg', (20, 70, 120), (40, 40), 'rgb')
    data_dir = {None: '', 'missing': tmp_path / 'nowhere'}.get(layout, tmp_path)
    with pytest.raises(data.DatasetError, match=expected) as error:
        imagenet.load_imagenet(dataset_config(data_dir))
    assert_one_line(error)


def test_undecodable_file_is_named(tmp_path):
    for split in ('train', 'val'):
        (tmp_path / split / 'a').mkdir(parents=True)
        for index in range(3):
            write_image(tmp_path / split / 'a' / f'{index}.jpg', (20, 70, 120), (40, 40), 'rgb')
    broken = tmp_path / 'train' / 'a' / '1.jpg'
    broken.write_bytes(b'not an image')
    dataset = imagenet.load_imagenet(dataset_config(tmp_path))
    with pytest.raises(data.DatasetError, match='1.jpg could not be read') as error:
        next(dataset.train_batches(3, seed=0))
    assert str(broken) in assert_one_line(error)


@pytest.mark.slow  # trains (left out by -m "not slow")
def test_main_trains_resnet50_on_an_imagenet_folder(folder, tmp_path):
    """The real entry point with configs/imagenet.py on the tiny folder: an eighth-width
    ResNet-50, one epoch, all four modes available; evaluation sees the 11 validation images."""
    import json
    import os
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    workdir = tmp_path / 'run'
    command = [sys.executable, '-m', 'alignmix_jax.main', '--config=configs/imagenet.py',
               f'--workdir={workdir}', '--config.dataset.name=imagenet_folder',
               f'--config.dataset.data_dir={folder[0]}', '--config.dataset.image_size=64',
               '--config.dataset.eval_resize=73', '--config.model.width=0.125',
               '--config.train.batch_size=6', '--config.train.eval_batch_size=6',
               '--config.train.num_epochs=2', '--config.train.lr_decay_epochs=()',
               '--config.train.log_every_steps=1']
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3'))
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((workdir / 'results.json').read_text())
    assert results['steps'] == 6  # 18 training images, batch 6, two epochs
    assert 0.0 <= results['final_test_accuracy'] <= 1.0
    assert np.isfinite(results['final_test_loss'])
    # Every one of the 11 validation images, once: accuracy is a multiple of 1/11.
    assert abs(results['final_test_accuracy'] * 11 - round(results['final_test_accuracy'] * 11)) \
        < 1e-6
