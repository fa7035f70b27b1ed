"""The offline demo: AlignMix on the CIFAR-10 subset embedded in the package, on a laptop CPU.

    python -m alignmix_jax.main --config=configs/demo.py --workdir=runs/demo

5,000 training and 1,000 test images (alignmix_jax/data/demo), a quarter-width
PreActResNet18 and a short step schedule; everything else as in the paper (all four mixup
modes, aligned, Sinkhorn eps 0.1 for 100 iterations). docs/results.md gives the time it
takes and the test accuracy it reaches on the CPUs measured.

AlignMixup/AE, with the decoder, so that the pictures of alignmix_jax/experiments/visualize.py can
be drawn from it (`:ae` after the file name selects it):

    python -m alignmix_jax.main --config=configs/demo.py:ae --workdir=runs/demo_ae
    python -m alignmix_jax.experiments.visualize --config=configs/demo.py:ae --workdir=runs/demo_ae

It adds the decoder and the 'clean' mode, and gives D a base learning rate of 0.02: at the
paper's 0.1 (which F, f and g keep), the reconstruction loss of this short run stays above that
of predicting the mean image.

`:ae_flat` is AlignMixup/AE with the paper's f (a Dense layer on the whole A,
`model.flatten_features`, e of 128 dimensions), which keeps the layout of A so that aligned and
unaligned morphs differ. At the paper's 0.1 its f's BatchNorm + ReLU outputs all go
to zero (dead ReLUs before the 2048-input Dense layer) and the run stays at chance, also with
f alone at 0.02 (7.8% after an epoch, reconstruction error 3.1): the whole network trains at
0.02, as the decoder does.
"""

from configs import default


def get_config(variant: str | None = None):
    """The demo; `variant` 'ae' (from `--config=configs/demo.py:ae`) is AlignMixup/AE, 'ae_flat'
    the same with the paper's flattened f."""
    config = default.get_config()
    config.dataset.name = 'demo'
    config.model.width = 0.25
    config.train.num_epochs = 15
    config.train.lr_decay_epochs = (10, 13)
    config.train.eval_every_epochs = 5
    config.train.log_every_steps = 39
    config.train.checkpoint_every_steps = 100
    if variant in ('ae', 'ae_flat'):
        config.model.decoder = 'ae'
        config.train.decoder_learning_rate = 0.02
    if variant == 'ae_flat':
        config.model.flatten_features = True
        config.model.embedding_dim = 128
        config.train.learning_rate = 0.02
    elif variant not in (None, 'ae'):
        raise ValueError(f'unknown demo variant {variant!r}; the variants are "ae" and '
                         '"ae_flat"')
    return config
