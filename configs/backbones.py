"""Backbones beyond the paper's, set up for 32x32 inputs (CIFAR, the demo, the mini-reproduction).

    python -m alignmix_jax.main --config=configs/cifar10.py:vit_small --workdir=runs/c10_vit
    python -m alignmix_jax.main --config=configs/cifar10.py:mobilenet_v2,baseline ...

`apply_backbone(config, name)` sets these fields; the rest of the config (schedule, mixup) is
unchanged. Each brings its own normalisation of A, so f has no BatchNorm + ReLU of its own
(head_norm False), except MobileNetV2; the transformers keep timm's initialisation
(model.init 'torchvision'):

- preact_resnet18: the paper's network, as configs/default.py has it (nothing changes).
- vit_small (DeiT-S): patches of 4x4 pixels, so A is an 8x8 grid of patch tokens (r = 64)
  plus the class token; f runs the last transformer block, so the alignment matters to it.
- swin_tiny (Swin-T): patches of 2x2 pixels, windows of 4x4 tokens, and no downsampling before
  the last stage, so A is the last stage's 4x4 feature map (r = 16, as R-18's).
- mobilenet_v2: the CIFAR layout (overall stride 8), so A is 4x4 x 1280 channels (x width).
  A is already normalised (BatchNorm + ReLU6), but pooling it then the linear g averages A
  linearly, and behind that the feature modes are exactly mixup of the pooled features (the
  columns of R sum to one): f's own BatchNorm + ReLU (head_norm True) is what alignment acts
  through (measured at start-up, alignmix_jax/training/inert_alignment.py).

These are the architectures at the paper's training settings (SGD, lr 0.1); transformers are
usually trained with other optimisers and far longer, which this does not attempt.
"""

import ml_collections

BACKBONES = {
    'preact_resnet18': {},
    'vit_small': {'model.name': 'vit_small', 'model.head_norm': False, 'model.init': 'torchvision',
                  'model.vit.patch_size': 4},
    'swin_tiny': {'model.name': 'swin_tiny', 'model.head_norm': False, 'model.init': 'torchvision',
                  'model.swin.patch_size': 2, 'model.swin.window_size': 4,
                  'model.last_stride': 1},
    'mobilenet_v2': {'model.name': 'mobilenet_v2', 'model.head_norm': True,
                     'model.mobilenet_v2.small_input': True},
}


def set_fields(config: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
    """Sets each 'section.key' (or 'section.sub.key') of `overrides` in `config`; returns it."""
    for field, value in overrides.items():
        *sections, key = field.split('.')
        node = config
        for section in sections:
            node = node[section]
        node[key] = value
    return config


def apply_backbone(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """`config` with the fields of backbone `name` set in place; returns it."""
    if name not in BACKBONES:
        raise ValueError(f'unknown backbone {name!r}; valid backbones: {", ".join(BACKBONES)}')
    return set_fields(config, BACKBONES[name])
