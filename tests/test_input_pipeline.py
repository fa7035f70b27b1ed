"""The input pipeline: loaders against PIL, batch order and resumption, device augmentation."""

import io
import os
import time
import zipfile
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from alignmix_jax import data
from alignmix_jax.data import augmentation, in_memory
from configs import default
from tests.conftest import CIFAR10_CLASSES, demo_jpegs, write_demo_image_folder

SLICE_CLASSES = ('cat', 'airplane', 'bird')  # listed unsorted: labels must follow sorted names
SLICE_SIZES = {'train': 4, 'test': 3}


def dataset_config(**fields):
    config = default.get_config().dataset
    config.update(fields)
    return config


def pil_decode(path):
    return np.asarray(Image.open(path).convert('RGB'))


def random_split(num_examples, seed=0, size=8):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (num_examples, size, size, 3), dtype=np.uint8)
    # Each image carries its index in its first pixels, so batches can be traced back.
    images[:, 0, 0, 0] = np.arange(num_examples) % 256
    images[:, 0, 0, 1] = np.arange(num_examples) // 256
    return data.Split(images=images,
                                labels=rng.integers(0, 10, num_examples).astype(np.int32))


def example_indices(images):
    return images[:, 0, 0, 0].astype(np.int64) + 256 * images[:, 0, 0, 1].astype(np.int64)


@pytest.fixture(scope='module')
def cifar_slice(tmp_path_factory):
    """3 classes of CIFAR-10 JPEGs (the embedded demo's): 4 training and 3 test images each."""
    return write_demo_image_folder(tmp_path_factory.mktemp('cifar_slice'), SLICE_SIZES,
                                   SLICE_CLASSES)


@pytest.fixture(scope='module')
def demo_dataset():
    return data.load_dataset(dataset_config(name='demo'))


def test_image_folder_gives_sorted_labels_and_the_pixels_pil_decodes(cifar_slice):
    dataset = data.load_dataset(
        dataset_config(name='image_folder', data_dir=str(cifar_slice)))
    assert dataset.class_names == ('airplane', 'bird', 'cat')
    assert dataset.num_classes == 3
    for split_name, split in (('train', dataset.train), ('test', dataset.test)):
        count = SLICE_SIZES[split_name]
        assert split.images.shape == (3 * count, 32, 32, 3)
        assert split.images.dtype == np.uint8
        assert split.labels.dtype == np.int32
        np.testing.assert_array_equal(split.labels, np.repeat([0, 1, 2], count))
        paths = [path for class_name in dataset.class_names
                 for path in sorted((cifar_slice / split_name / class_name).iterdir())]
        expected = np.stack([pil_decode(path) for path in paths])
        # TensorFlow and PIL both decode with libjpeg's default (islow) DCT: identical pixels.
        np.testing.assert_array_equal(split.images, expected)


def test_image_folder_rejects_mixed_sizes_other_classes_and_broken_files(tmp_path):
    mixed = tmp_path / 'mixed'
    for split in ('train', 'test'):
        (mixed / split / 'airplane').mkdir(parents=True)
        (mixed / split / 'airplane' / 'a.jpg').write_bytes(demo_jpegs(split, 'airplane', 1)[0])
    Image.new('RGB', (16, 20)).save(mixed / 'test' / 'airplane' / 'b.png')
    with pytest.raises(data.DatasetError, match=r'b\.png is 20x16 but .*a\.jpg is '
                       r'32x32: all images of .*test must have the same size \(1 differ\)'):
        data.load_dataset(dataset_config(name='image_folder', data_dir=str(mixed)))

    (mixed / 'train' / 'ship').mkdir()
    (mixed / 'train' / 'ship' / 'c.jpg').write_bytes(demo_jpegs('train', 'ship', 1)[0])
    with pytest.raises(data.DatasetError,
                       match=r"only in train: \['ship'\], only in test: \[\]"):
        data.load_dataset(dataset_config(name='image_folder', data_dir=str(mixed)))

    (mixed / 'test' / 'airplane' / 'b.png').unlink()
    (mixed / 'test' / 'ship').mkdir()
    (mixed / 'test' / 'ship' / 'd.jpg').write_bytes(b'not an image')
    with pytest.raises(data.DatasetError,
                       match=r'ship/d\.jpg could not be read as an image \(not a decodable '
                             r'image file\); 1 of the 2 images of .*test could not'):
        data.load_dataset(dataset_config(name='image_folder', data_dir=str(mixed)))


def test_missing_image_folder_or_split_is_a_clear_not_found_error(tmp_path):
    started = time.monotonic()
    with pytest.raises(data.DatasetNotFoundError,
                       match=r'image folder .*nowhere does not exist: pass '
                             r'--config\.dataset\.data_dir=PATH'):
        data.load_dataset(
            dataset_config(name='image_folder', data_dir=str(tmp_path / 'nowhere')))
    (tmp_path / 'train' / 'airplane').mkdir(parents=True)
    with pytest.raises(data.DatasetNotFoundError, match=r'class folder .*airplane '
                                                                  r'holds no images'):
        data.load_dataset(dataset_config(name='image_folder', data_dir=str(tmp_path)))
    (tmp_path / 'train' / 'airplane' / 'a.jpg').write_bytes(
        demo_jpegs('train', 'airplane', 1)[0])
    with pytest.raises(data.DatasetNotFoundError,
                       match=r'image folder split .*test does not exist'):
        data.load_dataset(dataset_config(name='image_folder', data_dir=str(tmp_path)))
    assert time.monotonic() - started < 5
    # main.py prints DatasetNotFoundError as one line; it is also a FileNotFoundError.
    assert issubclass(data.DatasetNotFoundError, FileNotFoundError)


@pytest.mark.parametrize('download', [False, True])
def test_unprepared_tfds_dataset_fails_fast_with_one_line_saying_what_to_do(tmp_path,
                                                                            monkeypatch,
                                                                            download):
    # The test never reaches out: the probe of the CIFAR host meets a network that refuses.
    # Without the probe, tfds alone would retry for over three minutes before failing.
    def refuse(address, *args, **kwargs):
        raise OSError(f'no route to {address[0]} (test)')

    monkeypatch.setattr(in_memory.socket, 'create_connection', refuse)
    monkeypatch.delenv('https_proxy', raising=False)
    monkeypatch.delenv('HTTPS_PROXY', raising=False)
    started = time.monotonic()
    with pytest.raises(data.DatasetNotFoundError) as raised:
        data.load_dataset(
            dataset_config(name='cifar10', data_dir=str(tmp_path), download=download))
    assert time.monotonic() - started < 15
    message = str(raised.value)
    assert '\n' not in message
    assert message.startswith(f'cifar10 is not prepared in {tmp_path}')
    assert ('downloading is off' in message) != download
    assert ('www.cs.toronto.edu is unreachable' in message) == download
    assert message.endswith(
        'run `tfds build cifar10 --data_dir=DIR` on a machine with internet and pass '
        '--config.dataset.data_dir=DIR, or train on an image folder with '
        '--config.dataset.name=image_folder --config.dataset.data_dir=PATH')


def test_prepared_tfds_dataset_becomes_uint8_and_int32_arrays(monkeypatch):
    # The real cifar10 cannot be prepared offline; tfds' mock serves random examples instead.
    with tfds.testing.mock_data(num_examples=7):
        monkeypatch.setattr(tfds.core.DatasetBuilder, 'is_prepared', lambda builder: True)
        dataset = data.load_dataset(dataset_config(name='cifar10', download=False))
    assert dataset.num_classes == 10
    # tfds reads CIFAR's class names from the downloaded files; unprepared, they are indices.
    assert dataset.class_names == tuple(str(label) for label in range(10))
    for split in (dataset.train, dataset.test):
        assert split.images.shape == (7, 32, 32, 3)
        assert split.images.dtype == np.uint8
        assert split.labels.dtype == np.int32
        assert set(split.labels.tolist()) <= set(range(10))


def test_demo_file_is_small_balanced_and_holds_the_original_jpeg_bytes(demo_dataset):
    assert data.DEMO_DATA_PATH.stat().st_size <= 10 * 2**20
    assert demo_dataset.num_classes == 10
    assert demo_dataset.class_names == CIFAR10_CLASSES
    assert demo_dataset.train.images.shape == (5000, 32, 32, 3)
    assert demo_dataset.test.images.shape == (1000, 32, 32, 3)
    assert Counter(demo_dataset.train.labels.tolist()) == {label: 500 for label in range(10)}
    assert Counter(demo_dataset.test.labels.tolist()) == {label: 100 for label in range(10)}
    # Image 501 of the training split is the second file of the second class, its JPEG bytes
    # decoded (that they are the original file's: the shared-data check below).
    with np.load(data.DEMO_DATA_PATH) as archive:
        start, end = archive['train_offsets'][501:503]
        stored = archive['train_jpeg_bytes'][start:end].tobytes()
    assert stored == demo_jpegs('train', 'automobile', 2)[1]
    np.testing.assert_array_equal(demo_dataset.train.images[501],
                                  np.asarray(Image.open(io.BytesIO(stored)).convert('RGB')))
    # The archive was written with fixed timestamps, so rebuilding it changes no byte.
    with zipfile.ZipFile(data.DEMO_DATA_PATH) as archive:
        assert {info.date_time for info in archive.infolist()} == {(1980, 1, 1, 0, 0, 0)}


@pytest.mark.shared_data
def test_demo_holds_the_first_files_of_each_class_of_the_full_copy_byte_for_byte(shared_cifar10):
    # alignmix_jax/data/demo/build.py: the first 500 training and 100 test files of each class.
    assert tuple(sorted(os.listdir(shared_cifar10 / 'train'))) == CIFAR10_CLASSES
    for split, count in (('train', 500), ('test', 100)):
        for class_name in CIFAR10_CLASSES:
            sources = sorted((shared_cifar10 / split / class_name).glob('*.jpg'))[:count]
            assert [source.read_bytes() for source in sources] == \
                demo_jpegs(split, class_name, count), (split, class_name)


def test_train_subset_is_fixed_class_balanced_and_leaves_test_whole(demo_dataset):
    config = dataset_config(name='demo', train_subset=64)
    subset = data.load_dataset(config).train
    again = data.load_dataset(config).train
    np.testing.assert_array_equal(subset.images, again.images)
    counts = Counter(subset.labels.tolist())
    assert sorted(counts.values()) == [6] * 6 + [7] * 4
    # Every chosen example is a distinct training image with its own label.
    full = demo_dataset.train
    flat_full = full.images.reshape(len(full.images), -1)
    for image, label in zip(subset.images, subset.labels, strict=True):
        matches = np.flatnonzero(np.all(flat_full == image.reshape(-1), axis=1))
        assert len(matches) == 1 and full.labels[matches[0]] == label
    assert len({image.tobytes() for image in subset.images}) == 64


def test_normalize_is_the_per_channel_formula_exactly():
    mean, std = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
    compiled = jax.jit(augmentation.normalize, static_argnums=(1, 2))
    for value in range(256):
        images = np.full((2, 4, 4, 3), value, np.uint8)
        # The formula in float64, rounded once to float32.
        expected = ((value / 255 - np.asarray(mean)) / np.asarray(std)).astype(np.float32)
        for normalize in (augmentation.normalize, compiled):
            normalized = np.asarray(normalize(jnp.asarray(images), mean, std))
            assert normalized.dtype == np.float32
            np.testing.assert_array_equal(normalized, np.broadcast_to(expected, images.shape))
    mixed = np.asarray([[[[0, 128, 255]]]], np.uint8)
    np.testing.assert_array_equal(
        compiled(mixed, mean, std)[0, 0, 0],
        np.asarray([(0 / 255 - mean[0]) / std[0], (128 / 255 - mean[1]) / std[1],
                    (255 / 255 - mean[2]) / std[2]], np.float32))


def candidate_windows(image, padding):
    """Every crop of the zero-padded image, flipped or not: {bytes: (dy, dx, flipped)}."""
    height, width, _ = image.shape
    padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    windows = {}
    for dy in range(2 * padding + 1):
        for dx in range(2 * padding + 1):
            window = padded[dy:dy + height, dx:dx + width]
            windows[window.tobytes()] = (dy, dx, False)
            windows[window[:, ::-1].tobytes()] = (dy, dx, True)
    return windows


def test_augment_crops_a_window_of_the_padded_image_and_flips_half_the_time():
    image = np.random.default_rng(0).integers(1, 256, (32, 32, 3), dtype=np.uint8)
    windows = candidate_windows(image, padding=4)
    assert len(windows) == 2 * 81  # all distinct, so each output names its crop and flip
    batch = np.broadcast_to(image, (2000, 32, 32, 3))
    augment = jax.jit(augmentation.augment, static_argnames=('padding', 'flip'))
    augmented = np.asarray(augment(jax.random.PRNGKey(7), batch, padding=4, flip=True))
    assert augmented.shape == batch.shape and augmented.dtype == np.uint8
    draws = [windows[example.tobytes()] for example in augmented]  # KeyError: not a window
    assert {dy for dy, _, _ in draws} == set(range(9))
    assert {dx for _, dx, _ in draws} == set(range(9))
    assert 900 <= sum(flipped for _, _, flipped in draws) <= 1100  # Binomial(2000, 1/2)
    np.testing.assert_array_equal(
        augmented, augment(jax.random.PRNGKey(7), batch, padding=4, flip=True))
    # Across keys, one example also takes every offset.
    per_key = [windows[np.asarray(augment(jax.random.PRNGKey(seed), batch[:1])).tobytes()]
               for seed in range(300)]
    assert {dy for dy, _, _ in per_key} == {dx for _, dx, _ in per_key} == set(range(9))
    assert 100 <= sum(flipped for _, _, flipped in per_key) <= 200


def test_augment_without_padding_or_flip_is_the_identity():
    images = np.random.default_rng(1).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(
        augmentation.augment(jax.random.PRNGKey(0), images, padding=0, flip=False), images)


def test_eval_batches_cover_every_image_once_with_one_shape():
    split = random_split(1003)
    seen_indices, seen_labels = [], []
    num_batches = 0
    for images, labels, mask in data.eval_batches(split, 128):
        assert images.shape == (128, 8, 8, 3) and labels.shape == mask.shape == (128,)
        assert not images[~mask].any()
        seen_indices.append(example_indices(images[mask]))
        seen_labels.append(labels[mask])
        num_batches += 1
    assert num_batches == 8
    np.testing.assert_array_equal(np.concatenate(seen_indices), np.arange(1003))
    np.testing.assert_array_equal(np.concatenate(seen_labels), split.labels)


def test_train_batches_are_epoch_permutations_and_resume_exactly():
    split = random_split(1003)
    batch_size = 100
    assert data.steps_per_epoch(1003, batch_size) == 10
    batches = data.train_batches(split, batch_size, seed=5)
    steps = [next(batches) for _ in range(25)]
    for images, labels in steps:
        assert images.shape == (100, 8, 8, 3) and labels.shape == (100,)
        np.testing.assert_array_equal(labels, split.labels[example_indices(images)])
    for epoch in (0, 1):
        visited = np.concatenate([example_indices(images)
                                  for images, _ in steps[10 * epoch:10 * (epoch + 1)]])
        expected_order = np.random.default_rng([5, epoch]).permutation(1003)
        np.testing.assert_array_equal(visited, expected_order[:1000])
        assert len(set(visited.tolist())) == 1000
    assert not np.array_equal(example_indices(steps[0][0]), example_indices(steps[10][0]))
    # Resuming mid-epoch 0 and right at the start of epoch 2 gives the same batches.
    for start_step in (7, 20):
        resumed = data.train_batches(split, batch_size, seed=5, start_step=start_step)
        for step in range(start_step, 25):
            images, labels = next(resumed)
            np.testing.assert_array_equal(images, steps[step][0])
            np.testing.assert_array_equal(labels, steps[step][1])
    other_seed = next(data.train_batches(split, batch_size, seed=6))[0]
    assert not np.array_equal(other_seed, steps[0][0])


def test_a_batch_larger_than_the_split_is_refused():
    with pytest.raises(ValueError, match=r'batch size 128 must be in \[1, 100\]'):
        data.steps_per_epoch(100, 128)
    with pytest.raises(ValueError, match=r'batch size 128'):
        next(data.train_batches(random_split(100), 128, seed=0))



def _labelled_split(num_examples):
    # Each image carries its own index in its first pixel, so batches can be traced back.
    images = np.zeros((num_examples, 2, 2, 3), np.uint8)
    images[:, 0, 0, 0] = np.arange(num_examples) % 256
    images[:, 0, 0, 1] = np.arange(num_examples) // 256
    return data.Split(images=images, labels=np.arange(num_examples, dtype=np.int32))


def _indices(images):
    return images[:, 0, 0, 0].astype(int) + 256 * images[:, 0, 0, 1].astype(int)


@pytest.mark.parametrize('process_count', [1, 2, 4])
def test_process_shares_of_train_batches_are_disjoint_and_cover_each_epoch(process_count):
    split = _labelled_split(100)
    batch_size, steps = 24, 4  # 4 steps per epoch, 4 examples dropped
    iterators = [data.train_batches(split, batch_size, seed=3, start_step=0,
                                              process_index=p, process_count=process_count)
                 for p in range(process_count)]
    single = data.train_batches(split, batch_size, seed=3)
    seen = []
    for _ in range(steps):
        shares = [next(iterator) for iterator in iterators]
        assert all(len(labels) == batch_size // process_count for _, labels in shares)
        global_batch = np.concatenate([labels for _, labels in shares])
        # The processes' shares, in process order, are exactly the single-process batch.
        np.testing.assert_array_equal(global_batch, next(single)[1])
        np.testing.assert_array_equal(np.concatenate([_indices(images) for images, _ in shares]),
                                      global_batch)
        seen.extend(global_batch.tolist())
    assert len(seen) == len(set(seen)) == 96


@pytest.mark.parametrize('process_count', [1, 2, 3])
def test_process_shares_of_eval_batches_count_every_image_once(process_count):
    split = _labelled_split(101)
    batch_size = 12
    counts, seen = set(), []
    for process in range(process_count):
        batches = list(data.eval_batches(split, batch_size, process_index=process,
                                                   process_count=process_count))
        counts.add(len(batches))
        for images, labels, mask in batches:
            assert images.shape[0] == labels.shape[0] == mask.shape[0] == 12 // process_count
            seen.extend(labels[mask].tolist())
            np.testing.assert_array_equal(_indices(images)[mask], labels[mask])
    assert len(counts) == 1  # every process steps through the same number of batches
    assert sorted(seen) == list(range(101))


def test_batch_size_must_divide_among_processes():
    with pytest.raises(ValueError, match='multiple of the number of processes'):
        next(data.eval_batches(_labelled_split(10), 5, process_count=2))


def test_a_class_folder_that_is_a_dangling_link_is_an_error_not_a_dropped_class(tmp_path):
    for split in ('train', 'test'):
        for class_name in ('cat', 'dog'):
            (tmp_path / split / class_name).mkdir(parents=True)
            Image.new('RGB', (8, 8), (40, 80, 120)).save(tmp_path / split / class_name / 'a.png')
        (tmp_path / split / '.cache').mkdir()  # hidden: skipped
        (tmp_path / split / 'README.txt').write_text('a file beside the classes: skipped')
    loaded = data.load_dataset(dataset_config(name='image_folder', data_dir=str(tmp_path)))
    assert loaded.class_names == ('cat', 'dog')
    (tmp_path / 'train' / 'eel').symlink_to(tmp_path / 'share' / 'eel')  # not mounted
    with pytest.raises(data.DatasetNotFoundError) as raised:
        data.load_dataset(dataset_config(name='image_folder', data_dir=str(tmp_path)))
    assert str(raised.value) == (
        f'class folder {tmp_path}/train/eel is a symbolic link to {tmp_path}/share/eel, which '
        f'does not exist (a share not mounted?): mount it, or remove the link to train without '
        f'that class')
