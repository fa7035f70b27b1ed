"""The datasets: `load_dataset(config.dataset)` routes by name through `LOADERS`.

- `common`: what every dataset shares (types, errors, host batching, subsets, decoding);
- `in_memory`: CIFAR (tfds), image folders and the embedded demo subset, held in memory;
- `imagenet`: ImageNet streamed with tf.data, augmented on the host;
- `cub`: CUB-200-2011 with its test boxes, held in memory, augmented on the host.

Each source module imports only `common`, never another source.
"""

import ml_collections

from alignmix_jax.data import cub, imagenet, in_memory
from alignmix_jax.data.common import (
    Dataset,
    DatasetError,
    DatasetNotFoundError,
    Split,
    eval_batches,
    steps_per_epoch,
    train_batches,
)
from alignmix_jax.data.in_memory import DEMO_DATA_PATH, hold_out_classes

# config.dataset.name -> the loader that reads it.
LOADERS = {
    **{name: in_memory.load_in_memory for name in
       (*in_memory.TFDS_DOWNLOAD_HOSTS, 'image_folder', 'demo')},
    'imagenet2012': imagenet.load_imagenet,
    'imagenet_folder': imagenet.load_imagenet,
    **{name: cub.load_cub for name in cub.CUB_DATASETS},
}
# Loaders that apply `held_out_classes` (the others stream or carry boxes).
_HOLD_OUT_LOADERS = (in_memory.load_in_memory,)

__all__ = ['DEMO_DATA_PATH', 'LOADERS', 'Dataset', 'DatasetError', 'DatasetNotFoundError',
           'Split', 'eval_batches', 'hold_out_classes', 'known_train_size', 'load_dataset',
           'steps_per_epoch', 'train_batches']


def load_dataset(dataset_config: ml_collections.ConfigDict):
    """The dataset named by `config.dataset`: a `Dataset`, ImageNet's `StreamingDataset` or
    CUB's `LocalizationDataset`, all with the interface the training loop reads."""
    name = dataset_config.name
    if name not in LOADERS:
        raise ValueError(f'unknown dataset {name!r}; expected one of {sorted(LOADERS)}')
    loader = LOADERS[name]
    if dataset_config.get('held_out_classes') and loader not in _HOLD_OUT_LOADERS:
        raise DatasetError(f'held_out_classes needs a dataset held in memory, not {name}')
    return loader(dataset_config)


def known_train_size(dataset_config: ml_collections.ConfigDict) -> int | None:
    """The training set's size when it is known before loading (`in_memory.known_train_size`);
    None for the other sources, whose size is checked once they are listed."""
    if LOADERS.get(dataset_config.name) is in_memory.load_in_memory:
        return in_memory.known_train_size(dataset_config)
    return None
