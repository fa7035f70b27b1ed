"""AlignMix on ImageNet (ILSVRC2012) with ResNet-50: the paper's 300-epoch protocol (App. B).

    python -m alignmix_jax.main --config=configs/imagenet.py --workdir=runs/imagenet_r50 \\
        --config.dataset.data_dir=DIR

DIR is a tfds data_dir where imagenet2012 has been built: put ILSVRC2012_img_train.tar and
ILSVRC2012_img_val.tar in DIR/downloads/manual/ and run `tfds build imagenet2012
--data_dir=DIR` (hours; tfds cannot download ImageNet). Or read the extracted JPEGs directly:

    python -m alignmix_jax.main --config=configs/imagenet.py --workdir=runs/imagenet_r50 \\
        --config.dataset.name=imagenet_folder --config.dataset.data_dir=PATH

with PATH/train/<wnid>/<image> and PATH/val/<wnid>/<image> (torchvision's ImageFolder layout).
The paper reports 20.32% top-1 error for AlignMix after 300 epochs (Table 1b) and 20.76% for
the 100-epoch protocol (Table 5); this code has not been run on ImageNet (it needs GPUs).

The protocol (Appendix B, following Kim et al., 2020): ResNet-50 (torchvision layout) as F,
f = BatchNorm + ReLU, then global average pooling (beyond the paper, whose f pools the
network's normalised output directly: that head averages A linearly, so behind it the feature
modes are exactly mixup of the pooled features, the columns of R summing to one; the extra
BatchNorm + ReLU is the nonlinearity through which alignment acts, as the start-up check,
alignmix_jax/training/inert_alignment.py, measures; `--config.model.head_norm=False
--config.mixup.allow_inert_alignment=True` is the paper's head), SGD for 300
epochs with momentum 0.9 and weight decay 1e-4, learning rate 0.1 for the classifier g and
0.01 for the other layers, both x0.1 at epochs 100 and 200; lambda ~ Beta(2, 2); Sinkhorn
with eps = 0.1 for 100 iterations on the 7x7 feature tensors; all four mixup modes.

Batch size: the paper's "batch size of 100 on 4 GPUs" is read as a GLOBAL batch of 100 (25
per GPU). The public code, like all PyTorch DataParallel code, takes one batch size that
DataParallel splits over the GPUs, and the paper quotes that number: its TinyImageNet run is
"128 on 2 GPUs", the same 128 as its CIFAR runs. BatchNorm statistics are then per
device over 25 images on 4 GPUs; training on 4 devices with per-device BatchNorm matches it.

Learning rates scale linearly with the global batch (Goyal et al., 2017): they are set for the
reference batch of 100, so with `--config.train.batch_size=B` use learning_rate = 0.01 * B / 100
and classifier_learning_rate = 0.1 * B / 100 (e.g. B = 400, per-GPU 100 on 4 GPUs: 0.04, 0.4).

Augmentation runs on the host (alignmix_jax/data/imagenet_transforms.py): RandomResizedCrop to 224
(scale 0.08-1, ratio 3/4-4/3) and horizontal flip; evaluation resizes the shorter side to 256
and takes the central 224x224. The device-side augmentation of the train step (padding crop,
flip) is turned off here.

Variants:
- The public code's ImageNet run (imagenet/main.py): one learning rate 0.1 for all layers, x0.1
  every 75 epochs, Nesterov momentum, PCA lighting noise, x mixed half of the time and A
  otherwise, global batch 1024 (its SLURM script):
      --config.train.learning_rate=0.1 --config.train.classifier_learning_rate=0.1
      --config.train.lr_decay_epochs="(75,150,225)" --config.train.nesterov=True
      --config.dataset.pca_lighting=True --config.train.batch_size=1024
      --config.mixup.modes="('input','input','feature','feature_prime')"
  (its colour jitter of brightness, contrast and saturation 0.4 is not implemented here).
- The 100-epoch protocol (paper Table 5, after Kim et al., 2021); the public code's schedule
  for runs other than 300 epochs is x0.1 every 30 epochs:
      --config.train.num_epochs=100 --config.train.lr_decay_epochs="(30,60,90)"
- Localisation (14x14 features): --config.model.last_stride=1.
- A smoke run on a tiny image folder: --config.dataset.name=imagenet_folder
  --config.dataset.data_dir=PATH --config.train.batch_size=8 --config.train.num_epochs=1
  --config.train.lr_decay_epochs="()"
  --config.model.width=0.125 --config.dataset.image_size=64 --config.dataset.eval_resize=73.

Initialisation (`model.init='torchvision'`): the public ImageNet code builds its own ResNet-50
and re-draws every convolution from a normal of variance 2 / (k * k * out_channels), BatchNorm
at 1 and 0, as torchvision's ResNets do; its linear classifier keeps PyTorch's default. Ours
is the same up to the classifier's bias, which starts at zero.
"""

from configs import default


def get_config():
    config = default.get_config()

    config.dataset.name = 'imagenet2012'  # or 'imagenet_folder' (see the docstring)
    config.dataset.download = False  # tfds cannot download ImageNet; it is built by hand
    config.dataset.mean = (0.485, 0.456, 0.406)
    config.dataset.std = (0.229, 0.224, 0.225)
    # Read by alignmix_jax.data.imagenet only (new fields of the dataset section).
    config.dataset.image_size = 224  # RandomResizedCrop output and eval centre crop
    config.dataset.eval_resize = 256  # eval: shorter side resized to this before the crop
    config.dataset.pca_lighting = False  # AlexNet-style lighting noise (the public code: on)
    # Augmentation is done on the host: the train step must not augment (refused otherwise).
    config.dataset.crop_padding = 0
    config.dataset.random_flip = False

    config.model.name = 'resnet50'
    config.model.width = 1.0
    # ResNet-50 ends with BatchNorm + ReLU, but pooling it directly leaves alignment inert
    # (see the docstring): f's own BatchNorm + ReLU comes first.
    config.model.head_norm = True
    config.model.last_stride = 2  # A is 7x7x2048 at 224x224
    config.model.init = 'torchvision'  # the public code's own re-initialisation (see above)

    config.train.batch_size = 100  # global (see the docstring)
    config.train.num_epochs = 300
    config.train.learning_rate = 0.01  # every layer but the classifier g
    config.train.classifier_learning_rate = 0.1
    config.train.nesterov = False  # the public code uses Nesterov momentum
    config.train.lr_decay_epochs = (100, 200)
    config.train.lr_decay_factor = 0.1
    config.train.momentum = 0.9
    config.train.weight_decay = 1e-4
    # 50,000 validation images = 125 batches of 400; 400 divides over 1, 2, 4, 8 or 16 devices.
    config.train.eval_batch_size = 400
    config.train.eval_every_epochs = 5  # ~12,800 steps per epoch at batch 100
    config.train.log_every_steps = 500
    config.train.checkpoint_every_steps = 5000
    config.train.keep_checkpoints = 3
    return config
