"""AlignMix on CIFAR-100 with the paper's Appendix B settings.

    python -m alignmix_jax.main --config=configs/cifar100.py --workdir=runs/cifar100_r18

Same schedule as CIFAR-10 (2000 epochs, lr 0.1 x0.1 at 500/1000/1500). The paper reports
18.08% top-1 error (R-18) and 18.67% (WRN16-8, --config.model.name=wide_resnet16_8).
The public code normalises CIFAR-100 with the CIFAR-10 statistics; so do we.
`--config=configs/cifar100.py:cutmix` (or baseline, input_mixup, manifold_mixup, alignmix_ae,
alignmix_cutmix) trains a comparison method of Table 1 instead (configs/methods.py); backbones
beyond the paper's (configs/backbones.py) the same way: `:vit_small`, `:mobilenet_v2,cutmix`.

Initialisation (`model.init='pytorch'`): the public CIFAR code never re-initialises its
PreActResNet18 or WRN16-8 (its WRN defines a conv_init but does not apply it), so every
convolution and linear layer keeps PyTorch's default U(+-1/sqrt(fan_in)) weights and biases.
`--config.model.init=torchvision` gives torchvision's He normal (fan_out) convolutions.

Network: the public PreActBlock (`model.preact_resnet18.shortcut='preactivated'`), as
configs/cifar10.py explains.
"""

from configs import default, methods


def get_config(variant: str | None = None):
    """AlignMix; `variant` (`--config=configs/cifar100.py:cutmix`, `:vit_small,cutmix`) methods
    and backbones of configs/methods.py and configs/backbones.py."""
    config = default.get_config()
    config.dataset.name = 'cifar100'
    config.model.init = 'pytorch'  # the public CIFAR networks keep PyTorch's defaults
    config.model.preact_resnet18.shortcut = 'preactivated'  # the public block (above)
    if variant is not None:
        methods.apply_variant(config, variant)
    return config
