"""AlignMixup/AE on CIFAR-100: the paper's best CIFAR-100 setting (Table 1a, Table 8).

    python -m alignmix_jax.main --config=configs/cifar100_ae.py --workdir=runs/cifar100_ae

configs/cifar100.py (Appendix B: PreActResNet18, 2000 epochs, SGD) plus the vanilla
autoencoder: a decoder D: e -> x_hat trained by a fifth mode, 'clean', on the reconstruction
loss of clean images, drawn uniformly with the four mixup modes {x, A (Eq. 12), A (Eq. 13), e}
(Algorithm 1), A aligned at 4x4. The paper reports 17.82% top-1 error with R-18 (Table 1a;
82.18% accuracy in Table 8) and 18.09% with WRN16-8 (--config.model.name=wide_resnet16_8).
After training, `python -m alignmix_jax.experiments.visualize --config=configs/cifar100_ae.py
--workdir=runs/cifar100_ae` draws the decoded interpolations of Fig. 3.
"""

from configs import cifar100


def get_config():
    config = cifar100.get_config()
    config.model.decoder = 'ae'
    return config
