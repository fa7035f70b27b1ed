"""The methods of the paper's Table 1 as config overrides, in one place.

Each method is the same training code (pipeline, schedule, logging) with these fields changed;
`apply_method(config, name)` applies them, `command_line(name)` spells them as flags:

    python -m alignmix_jax.main --config=configs/cifar10.py:cutmix --workdir=runs/c10_cutmix
    python -m alignmix_jax.main --config=configs/cifar10.py \\
        --config.mixup.modes="('none',)" --config.mixup.alpha=1.0 \\
        --config.mixup.cutmix_probability=0.5 --config.mixup.cutmix_alpha=1.0 \\
        --workdir=runs/c10_cutmix

are the same run. alpha is each method's own published value on CIFAR (lambda ~
Beta(alpha, alpha)):

- baseline: no mixup; clean images and hard labels through the same loss (mode 'none').
- input_mixup (Zhang et al., 2018): mix x; alpha = 1, their CIFAR-10 setting.
- manifold_mixup (Verma et al., 2019): mix the representation of a layer drawn per batch among
  the input and the outputs of the first two stages of F (their PreActResNet setting, k in
  {0, 1, 2}); alpha = 2, the value they report for manifold mixup on CIFAR.
- cutmix (Yun et al., 2019): paste a box of x' with area (1 - lambda) into x, labels weighted
  by the pasted area; alpha = 1 (their Beta(1, 1), i.e. lambda uniform). As their official
  CIFAR recipe (cutmix_prob 0.5), a batch is a CutMix batch with probability 0.5, else a clean
  one (mode 'none'); the paper ran its competitors with their official code.
- cutmix_every_batch: the same CutMix on every batch (what `cutmix` was before).
- alignmix: the paper's method, the defaults of configs/default.py (the four modes of
  Algorithm 1, alpha = 2).
- alignmix_unaligned: the paper's Table 8 'unaligned' row: AlignMix's four modes and alpha with
  `mixup.align=False`, so the feature modes mix A and A' cell by cell without the transport
  plan; what alignment adds is alignmix against this. The start-up check of inert alignment
  measures nothing here (there is no alignment to be inert), so the run starts as it is.
- alignmix_ae: AlignMixup/AE, the defaults plus the decoder and its 'clean' mode.
- alignmix_cutmix (beyond the paper, the reproduction report's Section 4.1): each batch is a
  CutMix batch (alpha = 1) with probability 0.5, else one of AlignMix's four modes (alpha = 2).
- alignmix_public: what the public CIFAR code trains, for parity runs against it. Per batch,
  input mixup with probability 1/2, else aligned feature mixup in one of its two directions
  (modes input, input, feature, feature_prime); its Sinkhorn loop (mixup.sinkhorn 'public':
  at most 100 iterations, the batch stopping once the mean L1 change of A's potential falls
  below 0.1); feat' from the plan of A to A' reused (mixup.prime_plan 'reuse'); its head,
  pooling then the linear classifier (model.head_norm False); PyTorch's default
  initialisation (model.init 'pytorch'). The loop and the reuse are two fields, not one, so
  each difference from Algorithm 1 can be switched and measured on its own. Behind that head
  the aligned modes are mixup of pooled features (alignment inert), which the start-up check
  refuses unless mixup.allow_inert_alignment, set here: training what the public code
  trains is the point of this method.

`apply_variant(config, 'vit_small,cutmix')` applies a comma-separated list of methods and
backbones (configs/backbones.py): the `:VARIANT` of the CIFAR and mini-reproduction configs.

The paper's Appendix B states alpha = 2 and that the other methods were reproduced "using
these settings"; it does not list each method's alpha, so we take the authors' own.
"""

import ml_collections

from configs import backbones

METHODS = {
    'baseline': {'mixup.modes': ('none',)},
    'input_mixup': {'mixup.modes': ('input',), 'mixup.alpha': 1.0},
    'manifold_mixup': {'mixup.modes': ('input', 'hidden1', 'hidden2'), 'mixup.alpha': 2.0},
    'cutmix': {'mixup.modes': ('none',), 'mixup.alpha': 1.0, 'mixup.cutmix_probability': 0.5,
               'mixup.cutmix_alpha': 1.0},
    'cutmix_every_batch': {'mixup.modes': ('cutmix',), 'mixup.alpha': 1.0},
    'alignmix': {},
    'alignmix_unaligned': {'mixup.align': False},
    'alignmix_ae': {'model.decoder': 'ae'},
    'alignmix_cutmix': {'mixup.cutmix_probability': 0.5, 'mixup.cutmix_alpha': 1.0},
    'alignmix_public': {'mixup.modes': ('input', 'input', 'feature', 'feature_prime'),
                        'mixup.sinkhorn': 'public', 'mixup.prime_plan': 'reuse',
                        'mixup.sinkhorn_iters': 100, 'mixup.sinkhorn_threshold': 0.1,
                        'model.head_norm': False, 'model.init': 'pytorch',
                        'model.preact_resnet18.shortcut': 'preactivated',
                        'mixup.allow_inert_alignment': True},
}


def apply_method(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """`config` with the overrides of method `name` set in place; returns it."""
    if name not in METHODS:
        raise ValueError(f'unknown method {name!r}; valid methods: {", ".join(METHODS)}')
    return backbones.set_fields(config, METHODS[name])


def apply_variant(config: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
    """`config` with each comma-separated name of `variant` applied: a method of METHODS or a
    backbone of configs/backbones.py (at most one of each); returns it. The method first, then
    the backbone, whatever their order in `variant`: the backbone's architecture fields win
    (e.g. the transformers keep timm's initialisation under alignmix_public's 'pytorch')."""
    names = [name.strip() for name in variant.split(',') if name.strip()]
    unknown = [name for name in names
               if name not in METHODS and name not in backbones.BACKBONES]
    if unknown or not names:
        raise ValueError(f'unknown config variant {unknown[0] if unknown else variant!r}; '
                         f'valid: methods {", ".join(METHODS)}; backbones '
                         f'{", ".join(backbones.BACKBONES)} (comma-separated)')
    for kind, table in (('method', METHODS), ('backbone', backbones.BACKBONES)):
        chosen = [name for name in names if name in table]
        if len(chosen) > 1:
            raise ValueError(f'config variant {variant!r} names more than one {kind}')
    for name in names:
        if name in METHODS:
            apply_method(config, name)
    for name in names:
        if name in backbones.BACKBONES:
            backbones.apply_backbone(config, name)
    return config


def command_line(name: str) -> str:
    """The overrides of method `name` as command-line flags ('' for AlignMix itself)."""
    if name not in METHODS:
        raise ValueError(f'unknown method {name!r}; valid methods: {", ".join(METHODS)}')

    def flag_value(value):
        if isinstance(value, tuple):
            return '"(' + ''.join(f"'{item}'," for item in value) + ')"'
        return str(value)

    return ' '.join(f'--config.{field}={flag_value(value)}'
                    for field, value in METHODS[name].items())
