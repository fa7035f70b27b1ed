"""Converted weights on disk: writing them (the converter command) and starting training from them.

`OUTPUT/variables.npz` holds the Flax variables {'params', 'batch_stats'} as flat
'collection/module/.../name' arrays; `OUTPUT/conversion.json` says where they came from
(`alignmix_jax.pytorch.convert_torchvision` writes both). `load_pretrained` puts them into a fresh
train state (`--config.model.pretrained=OUTPUT`). A plain .npz, not an orbax checkpoint: it is
read once, into a state initialised from the config, on any number of devices or hosts.
"""

import json
import os

import jax
import numpy as np
from absl import logging

VARIABLES_FILE = 'variables.npz'
METADATA_FILE = 'conversion.json'


class ConversionError(ValueError):
    """A state_dict or converted file that does not fit; the message says which key."""


def flatten(tree: dict, prefix: str = '') -> dict[str, np.ndarray]:
    """A nested variables tree as flat 'a/b/name' arrays."""
    flat = {}
    for name, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f'{prefix}{name}/'))
        else:
            flat[f'{prefix}{name}'] = value
    return flat


def unflatten(flat: dict[str, np.ndarray]) -> dict:
    """The nested tree of flat 'a/b/name' arrays (the inverse of `flatten`)."""
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, name = path.split('/')
        for parent in parents:
            node = node.setdefault(parent, {})
        node[name] = value
    return tree


def save_converted(variables: dict, output_dir: str, metadata: dict) -> str:
    """Writes OUTPUT/variables.npz and OUTPUT/conversion.json; returns the directory."""
    os.makedirs(output_dir, exist_ok=True)
    np.savez(os.path.join(output_dir, VARIABLES_FILE), **flatten(variables))
    with open(os.path.join(output_dir, METADATA_FILE), 'w') as metadata_file:
        json.dump(metadata, metadata_file, indent=2)
    return output_dir


def load_converted(path: str) -> dict:
    """The variables tree written by `save_converted` (a directory or its variables.npz)."""
    file = os.path.join(path, VARIABLES_FILE) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f'no converted weights at {path}: write them with `python -m '
                                f'alignmix_jax.pytorch.convert_torchvision --arch=resnet50|vgg16 '
                                f'--state_dict=FILE.pth --output={path}`')
    with np.load(file, allow_pickle=False) as archive:
        return unflatten({name: archive[name] for name in archive.files})


def load_pretrained(variables: dict, path: str) -> dict:
    """`variables` ({'params', 'batch_stats'}, e.g. a fresh train state's) with every array
    that the converted weights at `path` hold replaced by theirs.

    The classifier is skipped when its shape differs (another number of classes: it keeps its
    initialisation); any other missing name or shape mismatch is an error naming it (weights
    of another architecture or width). Arrays keep the dtype and, for jax arrays, the sharding
    of the ones they replace. Returns a new tree with the same keys as `variables`.
    """
    converted = flatten(load_converted(path))
    target = flatten({name: dict(variables.get(name, {})) for name in ('params', 'batch_stats')})
    merged, skipped = dict(target), []
    for name, value in converted.items():
        if name not in target:
            raise ConversionError(f'the converted weights at {path} hold {name}, which the model '
                                  f'does not have: weights of another architecture?')
        if tuple(value.shape) != tuple(target[name].shape):
            if name.startswith('params/classifier/'):
                skipped.append(name)
                continue
            raise ConversionError(f'{name} is {tuple(value.shape)} in the converted weights at '
                                  f'{path} but {tuple(target[name].shape)} in the model: another '
                                  f'architecture or width?')
        merged[name] = _like(value, target[name])
    kept = [name for name in target if name not in converted]
    logging.info('Pretrained weights from %s: %d arrays loaded; kept at initialisation: %s.',
                 path, len(converted) - len(skipped), ', '.join(sorted(kept + skipped)) or 'none')
    tree = unflatten(merged)
    return {name: tree.get(name, {}) for name in variables}


def _like(value: np.ndarray, reference):
    value = np.asarray(value, dtype=reference.dtype)
    if isinstance(reference, jax.Array):
        return jax.device_put(value, reference.sharding)
    return value
