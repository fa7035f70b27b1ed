"""torchvision ImageNet weights (ResNet-50, VGG-16) -> our Flax variables, and starting from them.

    python -m alignmix_jax.pytorch.convert_torchvision --arch=resnet50 --state_dict=resnet50.pth \\
        --output=weights/resnet50

reads a PyTorch `state_dict` file in torchvision's layout and writes `OUTPUT/variables.npz`
(the Flax variables {'params', 'batch_stats'} as flat 'collection/module/.../name' arrays) and
`OUTPUT/conversion.json` (the architecture, the source file, the keys that were not used).
Training starts from it with `--config.model.pretrained=OUTPUT` (`pretrained.load_pretrained`).
Reading the .pth file needs PyTorch (`pip install torch`); nothing else here does.

Layouts:
- resnet50: torchvision's `resnet50` (conv1, bn1, layer{1-4}.{i}.{conv,bn}{1,2,3},
  layer{s}.0.downsample.{0,1}, fc) -> alignmix_jax/models/resnet.py with `model.head_norm=False`
  (stem_conv, stem_norm, stage{s}_block{i+1}/{conv,norm}{1,2,3}, shortcut_{conv,norm},
  classifier). Any `last_stride` fits the same weights.
- vgg16: torchvision's `vgg16` (features.{0, 2, 5, ..., 28}: the thirteen 3x3 convolutions)
  -> alignmix_jax/models/vgg.py (conv1_1 ... conv5_3). torchvision's fully connected head
  (`classifier.*`) has no counterpart in VGG-GAP and is left out; conv6 and the classifier
  then keep their initialisation. A VGG16-CAM state_dict as Choe et al. (2020) train it
  (wsolevaluation: the same `features`, plus `conv6` and `fc`) converts completely.
PyTorch convolution weights (out, in, kh, kw) become Flax kernels (kh, kw, in, out), Linear
weights (out, in) kernels (in, out); BatchNorm weight, bias, running_mean, running_var become
scale, bias (params) and mean, var (batch_stats). A 'module.' prefix (DataParallel) and a
{'state_dict': ...} or {'model': ...} wrapper (training checkpoints) are accepted.

The files are written and read by `alignmix_jax.models.pretrained`.
"""

import os
import re

import numpy as np
from absl import app, flags

from alignmix_jax.models.pretrained import (
    VARIABLES_FILE,
    ConversionError,
    flatten,
    save_converted,
)
from alignmix_jax.models.vgg import VGG16_BLOCKS, vgg16_layer_names

ARCHS = ('resnet50', 'vgg16')
# BatchNorm's counter of updates: PyTorch bookkeeping with no Flax counterpart.
_IGNORED_SUFFIXES = ('num_batches_tracked',)


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """The tensors of a PyTorch state_dict file as float32 numpy arrays, by key."""
    try:
        import torch
    except ImportError:
        raise ImportError('reading a PyTorch .pth file needs PyTorch: pip install torch==2.13.0 '
                          '(CPU-only wheel: add --index-url https://download.pytorch.org/whl/cpu)'
                          ) from None
    if not os.path.isfile(path):
        raise FileNotFoundError(f'no state_dict file {path}')
    # weights_only: tensors and containers only; a .pth file cannot run code when loaded.
    state = torch.load(path, map_location='cpu', weights_only=True)
    for wrapper in ('state_dict', 'model'):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise ConversionError(f'{path} holds a {type(state).__name__}, not a state_dict')
    arrays = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            name = key[len('module.'):] if key.startswith('module.') else key
            arrays[name] = value.detach().to(torch.float32).cpu().numpy() \
                if value.is_floating_point() else value.cpu().numpy()
    return arrays


def _conv_kernel(weight: np.ndarray) -> np.ndarray:
    # (out, in, kh, kw) -> (kh, kw, in, out)
    return np.ascontiguousarray(np.transpose(weight, (2, 3, 1, 0)))


class _Converter:
    """Takes keys from a state_dict into a Flax variables tree, remembering what it used."""

    def __init__(self, state: dict[str, np.ndarray], arch: str):
        self.state, self.arch = state, arch
        self.used: set[str] = set()
        self.variables = {'params': {}, 'batch_stats': {}}

    def take(self, key: str) -> np.ndarray:
        if key not in self.state:
            raise ConversionError(f'the state_dict has no {key!r}: not a torchvision {self.arch} '
                                  f'state_dict?')
        self.used.add(key)
        return np.asarray(self.state[key], np.float32)

    def put(self, collection: str, path: tuple[str, ...], value: np.ndarray):
        node = self.variables[collection]
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = value

    def conv(self, source: str, target: tuple[str, ...], *, bias: bool = False):
        self.put('params', (*target, 'kernel'), _conv_kernel(self.take(f'{source}.weight')))
        if bias:
            self.put('params', (*target, 'bias'), self.take(f'{source}.bias'))

    def batch_norm(self, source: str, target: tuple[str, ...]):
        self.put('params', (*target, 'scale'), self.take(f'{source}.weight'))
        self.put('params', (*target, 'bias'), self.take(f'{source}.bias'))
        self.put('batch_stats', (*target, 'mean'), self.take(f'{source}.running_mean'))
        self.put('batch_stats', (*target, 'var'), self.take(f'{source}.running_var'))

    def linear(self, source: str, target: tuple[str, ...]):
        self.put('params', (*target, 'kernel'),
                 np.ascontiguousarray(self.take(f'{source}.weight').T))
        self.put('params', (*target, 'bias'), self.take(f'{source}.bias'))

    def unused(self) -> list[str]:
        return sorted(key for key in self.state
                      if key not in self.used and not key.endswith(_IGNORED_SUFFIXES))


def _convert_resnet50(converter: _Converter):
    encoder = ('encoder',)
    converter.conv('conv1', (*encoder, 'stem_conv'))
    converter.batch_norm('bn1', (*encoder, 'stem_norm'))
    blocks = sorted({(int(match[1]), int(match[2])) for key in converter.state
                     if (match := re.match(r'layer(\d)\.(\d+)\.', key))})
    if not blocks:
        raise ConversionError('the state_dict has no layer{1-4}.* keys: not a torchvision '
                              'resnet50 state_dict?')
    for stage, block in blocks:
        source = f'layer{stage}.{block}'
        target = (*encoder, f'stage{stage}_block{block + 1}')
        for index in (1, 2, 3):
            converter.conv(f'{source}.conv{index}', (*target, f'conv{index}'))
            converter.batch_norm(f'{source}.bn{index}', (*target, f'norm{index}'))
        if f'{source}.downsample.0.weight' in converter.state:
            converter.conv(f'{source}.downsample.0', (*target, 'shortcut_conv'))
            converter.batch_norm(f'{source}.downsample.1', (*target, 'shortcut_norm'))
    converter.linear('fc', ('classifier',))


def vgg16_feature_indices() -> list[int]:
    """Indices in torchvision's vgg16 `features` of its thirteen convolutions, in order.

    `features` interleaves Conv2d, ReLU and, after each block, MaxPool2d: 0, 2, 5, 7, ..., 28.
    """
    indices, position = [], 0
    for block in VGG16_BLOCKS:
        for _ in block:
            indices.append(position)
            position += 2  # the convolution and its ReLU
        position += 1  # the max pool
    return indices


def _convert_vgg16(converter: _Converter):
    for index, name in zip(vgg16_feature_indices(), vgg16_layer_names(), strict=True):
        converter.conv(f'features.{index}', ('encoder', name), bias=True)
    # The VGG16-CAM layout of Choe et al. (2020): the added convolution and the classifier.
    if 'conv6.weight' in converter.state:
        converter.conv('conv6', ('encoder', 'conv6'), bias=True)
    if 'fc.weight' in converter.state:
        converter.linear('fc', ('classifier',))


def convert(arch: str, state: dict[str, np.ndarray]) -> tuple[dict, list[str]]:
    """(Flax variables {'params', 'batch_stats'}, the state_dict keys left unused)."""
    if arch not in ARCHS:
        raise ValueError(f'unknown arch {arch!r}; valid: {", ".join(ARCHS)}')
    converter = _Converter(state, arch)
    {'resnet50': _convert_resnet50, 'vgg16': _convert_vgg16}[arch](converter)
    return converter.variables, converter.unused()


# --- the command (flags defined only when run: importing this module defines none) ---

def _define_flags():
    flags.DEFINE_enum('arch', None, ARCHS, 'The torchvision architecture of the state_dict.')
    flags.DEFINE_string('state_dict', None, 'A PyTorch state_dict file (.pth) in '
                        'torchvision\'s layout, e.g. resnet50-0676ba61.pth or '
                        'vgg16-397923af.pth.')
    flags.DEFINE_string('output', None, 'The directory to write variables.npz and '
                        'conversion.json to; pass it as --config.model.pretrained.')
    flags.mark_flags_as_required(['arch', 'state_dict', 'output'])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
    options = flags.FLAGS
    try:
        state = read_state_dict(options.state_dict)
        variables, unused = convert(options.arch, state)
    except (ImportError, FileNotFoundError, ConversionError) as error:
        raise SystemExit(f'error: {error}') from None
    num_arrays = len(flatten(variables))
    save_converted(variables, options.output, {
        'arch': options.arch, 'state_dict': os.path.abspath(options.state_dict),
        'num_arrays': num_arrays, 'unused_keys': unused})
    print(f'{options.arch}: {num_arrays} arrays from {options.state_dict} written to '
          f'{os.path.join(options.output, VARIABLES_FILE)}')
    if unused:
        print(f'not used ({len(unused)} keys, no counterpart in our model): '
              f'{", ".join(unused[:8])}{" ..." if len(unused) > 8 else ""}')


if __name__ == '__main__':
    _define_flags()
    app.run(main)
