"""The datasets held in memory: CIFAR from tfds, image folders and the embedded demo subset.

These fit in host memory (CIFAR: 50,000 x 32x32x3 uint8 images are 150 MB). A dataset is read
and decoded once into uint8 numpy arrays (`common.Split`, `common.Dataset`): CIFAR with tfds
(TensorFlow), image folders and the demo with PIL (no TensorFlow needed); the train step
augments its batches on the device (`alignmix_jax.data.augmentation`).

Datasets (`config.dataset.name`):
- 'cifar10', 'cifar100': tfds, prepared in `data_dir` (downloaded there if `download` is set).
- 'image_folder': `data_dir/{train,test}/<class>/<image>`; labels are the indices of the sorted
  class folder names of train; all images must have the same size.
- 'demo': 500 training and 100 test images per class of CIFAR-10, shipped in
  `alignmix_jax/data/demo/cifar10_demo.npz` as their original JPEG bytes.

A dataset that cannot be found raises `DatasetNotFoundError` with one line saying what to do.
"""

import dataclasses
import pathlib
import socket
import urllib.request
from collections.abc import Sequence

import ml_collections
import numpy as np

from alignmix_jax.data.common import (
    Dataset,
    DatasetError,
    DatasetNotFoundError,
    Split,
    class_balanced_subset,
    decode_images,
    import_tensorflow,
    list_class_folders,
    short_reason,
)

DEMO_DATA_PATH = pathlib.Path(__file__).resolve().parent / 'demo' / 'cifar10_demo.npz'
# Where tfds downloads CIFAR from (tensorflow_datasets/image_classification/cifar.py). Offline,
# tfds retries a download ten times with exponential backoff (over three minutes); probing the
# host first turns that into an immediate error.
TFDS_DOWNLOAD_HOSTS = {'cifar10': 'www.cs.toronto.edu', 'cifar100': 'www.cs.toronto.edu'}
_PROBE_TIMEOUT_SECONDS = 10.0
_SPLITS = ('train', 'test')
# The training split's size of each tfds dataset (known before it is read).
TFDS_TRAIN_SIZES = {'cifar10': 50_000, 'cifar100': 50_000}


def load_in_memory(dataset_config: ml_collections.ConfigDict) -> Dataset:
    """Reads 'cifar10', 'cifar100', 'image_folder' or 'demo' into memory (see the docstring),
    with `held_out_classes` and `train_subset` applied."""
    name = dataset_config.name
    if name in TFDS_DOWNLOAD_HOSTS:
        dataset = _load_tfds(name, dataset_config.data_dir, download=dataset_config.download)
    elif name == 'image_folder':
        dataset = _load_image_folder(dataset_config.data_dir)
    else:
        dataset = _load_demo(DEMO_DATA_PATH)
    if dataset_config.get('held_out_classes'):
        dataset = hold_out_classes(dataset, dataset_config.held_out_classes)
    if dataset_config.train_subset:
        train = class_balanced_subset(dataset.train, dataset_config.train_subset)
        dataset = dataclasses.replace(dataset, train=train)
    return dataset


def known_train_size(dataset_config: ml_collections.ConfigDict) -> int | None:
    """How many training images `load_in_memory` returns, where that is known without reading
    the images (CIFAR's 50,000; the demo's, from its archive's labels), after `train_subset`;
    None for image folders and with `held_out_classes`. So a batch larger than the training set
    is refused before the seconds spent decoding it."""
    name = dataset_config.name
    if dataset_config.get('held_out_classes') or name == 'image_folder':
        return None
    if name in TFDS_TRAIN_SIZES:
        size = TFDS_TRAIN_SIZES[name]
    elif DEMO_DATA_PATH.is_file():
        with np.load(DEMO_DATA_PATH, allow_pickle=False) as archive:
            size = len(archive['train_labels'])
    else:
        return None  # the loader says what is missing
    return min(size, dataset_config.train_subset) if dataset_config.train_subset else size


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



def _not_found_message(name: str, location: str, reason: str) -> str:
    return (f'{name} is not prepared in {location} and could not be downloaded ({reason}): run '
            f'`tfds build {name} --data_dir=DIR` on a machine with internet and pass '
            '--config.dataset.data_dir=DIR, or train on an image folder with '
            '--config.dataset.name=image_folder --config.dataset.data_dir=PATH')



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
    import_tensorflow()  # Configured before tfds starts TensorFlow.
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
        if not download:
            reason = 'downloading is off: --config.dataset.download=False'
        else:
            reason = _unreachable_reason(TFDS_DOWNLOAD_HOSTS[name])
        if reason is not None:
            raise DatasetNotFoundError(_not_found_message(name, builder.data_dir, reason))
        try:
            builder.download_and_prepare()
        except Exception as error:  # Whatever failed, the remedy is the same.
            raise DatasetNotFoundError(
                _not_found_message(name, builder.data_dir, short_reason(error))) from error

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
    files_by_split = {split: list_class_folders(
        str(root / split), 'image folder',
        missing=f'expected {root}/{{train,test}}/<class>/<image>',
        empty=f'expected {root / split}/<class>/<image>') for split in _SPLITS}
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
        images = decode_images(paths, paths, where=str(root / split), from_files=True)
        splits[split] = Split(images=images, labels=labels)
    return Dataset(train=splits['train'], test=splits['test'], num_classes=len(class_names),
                   class_names=class_names)


def _load_demo(path: pathlib.Path) -> Dataset:
    """The embedded subset built by `alignmix_jax.data.demo.build`."""
    if not path.is_file():
        raise DatasetNotFoundError(
            f'the demo data {path} is missing: rebuild it with `python -m '
            'alignmix_jax.data.demo.build --source ../shared/data/cifar10-jpeg`')
    with np.load(path, allow_pickle=False) as archive:
        contents = {key: archive[key] for key in archive.files}
    splits = {}
    for split in _SPLITS:
        jpeg_bytes = contents[f'{split}_jpeg_bytes']
        offsets = contents[f'{split}_offsets']
        encoded_images = [jpeg_bytes[start:end].tobytes()
                          for start, end in zip(offsets[:-1], offsets[1:], strict=True)]
        names = [f'{path.name}:{split}[{index}]' for index in range(len(encoded_images))]
        images = decode_images(encoded_images, names, where=f'{path} ({split})',
                                from_files=False)
        splits[split] = Split(images=images, labels=contents[f'{split}_labels'].astype(np.int32))
    class_names = tuple(str(name) for name in contents['class_names'])
    return Dataset(train=splits['train'], test=splits['test'], num_classes=len(class_names),
                   class_names=class_names)
