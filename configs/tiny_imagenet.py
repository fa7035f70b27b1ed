"""AlignMix on Tiny-ImageNet-200 (64x64, 200 classes) with the paper's Appendix B settings.

Prepare the official archive once, then train on the folder it writes:

    python -m alignmix_jax.data.prepare_tiny_imagenet --source=PATH/tiny-imagenet-200 --output=OUT
    python -m alignmix_jax.main --config=configs/tiny_imagenet.py \
        --config.dataset.data_dir=OUT --workdir=runs/tiny_imagenet_r18

`--config.dataset.data_dir` is required. The official validation set (10,000 images, 50 per
class) is the test split, as in the public code, which evaluates on it after every epoch and
keeps the checkpoint with the best accuracy; the paper reports that accuracy. We print the final
test accuracy first and the best one beside it (see the README). The 100,000 training images are
held in memory (1.2 GB of uint8 pixels) and decoded once at start.

Settings (Appendix B, following Kim et al. 2020): PreActResNet18, SGD for 1200 epochs, lr 0.1
multiplied by 0.1 at epochs 600 and 900, momentum 0.9, weight decay 1e-4, batch 128,
lambda ~ Beta(2, 2), Sinkhorn with eps 0.1 for 100 iterations. The paper reports 31.81% top-1
error for AlignMix with R-18 on Tiny-ImageNet (Table 1a; 32.73% for AlignMix/AE).

Batch size: the paper says "128 on 2 GPUs". The public Tiny-ImageNet script's default batch is
256 under nn.DataParallel on the two GPUs its job script requests, i.e. 128 per GPU (and
BatchNorm statistics over 128 images per GPU). We use a global batch of 128 as the paper's text
reads; `--config.train.batch_size=256` gives the public script's global batch.

Augmentation and normalisation, as the public Tiny-ImageNet code does: 4-pixel zero padding and
a random 64x64 crop, a random horizontal flip; no resizing; normalised with the same CIFAR-10
mean and std as on CIFAR (not ImageNet statistics). Test images are only normalised.

The feature tensor A is 8x8x512 here, as in the public code: PreActResNet18's stem works at full
resolution and its stages downsample by 1, 2, 2, 2, so 64x64 inputs give 8x8 (32x32 CIFAR inputs
give 4x4). The public code keeps this layout for 64x64 inputs (no stride-2 stem, no extra
pooling; its head averages over 8x8), so alignment couples r = 64 positions (64x64 transport
plans) instead of CIFAR's 16. `--config.model.feature_pool=2` would align at 4x4 instead;
that is not the public code's setting.

Initialisation (`model.init='pytorch'`): the public Tiny-ImageNet code, as its CIFAR code, keeps
PyTorch's default initialisation of its PreActResNet18 (U(+-1/sqrt(fan_in)) for every
convolution and linear layer; nothing re-initialises them).

Network: the public Tiny-ImageNet PreActResNet18 has the same block as its CIFAR one (its
identity shortcuts add the pre-activated input relu(bn1(x))), so
`model.preact_resnet18.shortcut='preactivated'`, as configs/cifar10.py explains.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.dataset.name = 'image_folder'
    # Required: the OUT of alignmix_jax.data.prepare_tiny_imagenet (left unset here on purpose).
    config.dataset.data_dir = None
    # The public Tiny-ImageNet code reuses the CIFAR-10 statistics; stated here so that a change
    # of the shared default does not silently change this dataset.
    config.dataset.mean = (0.4914, 0.4822, 0.4465)
    config.dataset.std = (0.2023, 0.1994, 0.2010)
    config.dataset.crop_padding = 4
    config.dataset.random_flip = True

    config.model.name = 'preact_resnet18'
    # Stride 2 in the last stage, no pooling of A: A is 8x8 on 64x64 inputs (see above).
    config.model.last_stride = 2
    config.model.feature_pool = 1
    config.model.init = 'pytorch'  # the public code keeps PyTorch's defaults (see above)
    config.model.preact_resnet18.shortcut = 'preactivated'  # the public block (see above)

    config.train.batch_size = 128
    config.train.num_epochs = 1200
    config.train.learning_rate = 0.1
    config.train.lr_decay_epochs = (600, 900)
    config.train.lr_decay_factor = 0.1
    config.train.momentum = 0.9
    config.train.weight_decay = 1e-4
    # 781 steps per epoch at batch 128. An evaluation (10,000 images, forward only) costs about
    # 3% of an epoch, so every 5 epochs keeps the test curve fine-grained for under 1% of the
    # time; each evaluation also writes a checkpoint.
    config.train.eval_every_epochs = 5
    config.train.log_every_steps = 200
    # About every 2.5 epochs: at most that much work is lost when a job is preempted.
    config.train.checkpoint_every_steps = 2000
    return config
