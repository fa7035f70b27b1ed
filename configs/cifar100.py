"""AlignMix on CIFAR-100 with the paper's Appendix B settings.

    python -m alignmix_jax.main --config=configs/cifar100.py --workdir=runs/cifar100_r18

Same schedule as CIFAR-10 (2000 epochs, lr 0.1 x0.1 at 500/1000/1500). The paper reports
18.08% top-1 error (R-18) and 18.67% (WRN16-8, --config.model.name=wide_resnet16_8).
The public code normalises CIFAR-100 with the CIFAR-10 statistics; so do we.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.dataset.name = 'cifar100'
    return config
