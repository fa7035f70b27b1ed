"""The offline demo: AlignMix on the CIFAR-10 subset embedded in the package, on a laptop CPU.

    python -m alignmix_jax.main --config=configs/demo.py --workdir=runs/demo

5,000 training and 1,000 test images (alignmix_jax/demo_data), a quarter-width
PreActResNet18 and a short step schedule; everything else as in the paper (all four mixup
modes, aligned, Sinkhorn eps 0.1 for 100 iterations). See the README for the time it takes
and the test accuracy it reaches.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.dataset.name = 'demo'
    config.model.width = 0.25
    config.train.num_epochs = 15
    config.train.lr_decay_epochs = (10, 13)
    config.train.eval_every_epochs = 5
    config.train.log_every_steps = 39
    config.train.checkpoint_every_steps = 100
    return config
