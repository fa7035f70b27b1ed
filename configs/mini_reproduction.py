"""One run of the CPU-sized comparison of the paper's Table 1 methods
(alignmix_jax/experiments/reproduce.py).

    python -m alignmix_jax.main --config=configs/mini_reproduction.py:cutmix \
        --config.dataset.data_dir=../shared/data/cifar10-jpeg --workdir=runs/mini/cutmix/seed0

A small budget, not the paper's protocol: CIFAR-10 from the image folder, a fixed
class-balanced subset of 2,000 training images, the full 10,000-image test split, a
quarter-width PreActResNet18, 8 epochs of SGD (lr 0.1, x0.1 after epoch 6, batch 128), one
evaluation at the end. The method (configs/methods.py: baseline, input_mixup, manifold_mixup,
cutmix, alignmix, alignmix_ae, alignmix_cutmix) sets the mixup modes and alpha; everything
else is shared. `python -m alignmix_jax.experiments.reproduce` runs every method with three seeds
and writes the table. A backbone of configs/backbones.py may precede the method
(`:mobilenet_v2,alignmix`; `reproduce --backbone=mobilenet_v2`); the default is the
quarter-width PreActResNet18.
"""

from configs import default, methods


def get_config(variant: str | None = 'alignmix'):
    """`variant`: a method of configs/methods.py, optionally after a backbone
    ('vit_small,cutmix'); the method defaults to alignmix."""
    config = default.get_config()
    config.dataset.name = 'image_folder'
    config.dataset.train_subset = 2000
    config.model.width = 0.25
    config.train.num_epochs = 8
    config.train.lr_decay_epochs = (6,)
    config.train.eval_every_epochs = config.train.num_epochs  # only at the end
    config.train.log_every_steps = 15
    config.train.checkpoint_every_steps = 60
    config.train.keep_checkpoints = 1
    names = [name.strip() for name in (variant or '').split(',') if name.strip()]
    if not any(name in methods.METHODS for name in names):
        names.append('alignmix')
    methods.apply_variant(config, ','.join(names))
    if config.model.decoder != 'none':
        # As the AE demo (configs/demo.py:ae): at the paper's 0.1 the reconstruction loss of a
        # run this short stays above that of predicting the mean image.
        config.train.decoder_learning_rate = 0.02
    return config
