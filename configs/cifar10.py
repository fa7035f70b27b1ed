"""AlignMix on CIFAR-10 with the paper's Appendix B settings.

    python -m alignmix_jax.main --config=configs/cifar10.py --workdir=runs/cifar10_r18

PreActResNet18, 2000 epochs of SGD (lr 0.1, x0.1 at epochs 500/1000/1500, momentum 0.9,
weight decay 1e-4, batch 128), lambda ~ Beta(2, 2), Sinkhorn with eps 0.1 for 100 iterations.
The paper reports 2.95% top-1 error (R-18) and 3.09% (WRN16-8, with
--config.model.name=wide_resnet16_8). Needs one GPU; tfds downloads CIFAR-10 on first use.

The comparison methods of Table 1 run with the same settings but their own modes and alpha
(configs/methods.py): `--config=configs/cifar10.py:baseline` (also input_mixup,
manifold_mixup, cutmix, alignmix_ae, alignmix_cutmix). Backbones beyond the paper's
(configs/backbones.py) the same way, alone or with a method: `:vit_small`, `:swin_tiny`,
`:mobilenet_v2,baseline`.

Initialisation (`model.init='pytorch'`): the public CIFAR code never re-initialises its
PreActResNet18 or WRN16-8 (its WRN defines a conv_init but does not apply it), so every
convolution and linear layer keeps PyTorch's default U(+-1/sqrt(fan_in)) weights and biases.
`--config.model.init=torchvision` gives torchvision's He normal (fan_out) convolutions.

Network (`model.preact_resnet18.shortcut='preactivated'`): the public PreActBlock adds the
pre-activated input relu(bn1(x)) on the identity shortcuts of its five shape-keeping blocks,
where He et al.'s block adds x ('identity'). The paper's numbers come from the public network,
and the difference matters for mixup: on a 10,000-image, 20-epoch CPU protocol (docs/parity.md)
input mixup and the public AlignMix trained 2.4-3.9 points below the public code with
'identity' and within 0.5 points of its means with 'preactivated' (three seeds: 63.93 and
67.15 against 64.18 and 67.64), while the baseline lands within about a point of the public
code's with either.
`--config.model.preact_resnet18.shortcut=identity` gives He et al.'s block.
"""

from configs import default, methods


def get_config(variant: str | None = None):
    """AlignMix; `variant` (`--config=configs/cifar10.py:cutmix`, `:vit_small,cutmix`) methods
    and backbones of configs/methods.py and configs/backbones.py."""
    config = default.get_config()
    config.dataset.name = 'cifar10'
    config.model.init = 'pytorch'  # the public CIFAR networks keep PyTorch's defaults
    config.model.preact_resnet18.shortcut = 'preactivated'  # the public block (above)
    if variant is not None:
        methods.apply_variant(config, variant)
    return config
