"""AlignMix on CUB-200-2011 for weakly-supervised localisation (WSOL), ResNet-50 (Appendix B).

    python -m alignmix_jax.pytorch.convert_torchvision --arch=resnet50 \\
        --state_dict=resnet50-0676ba61.pth --output=weights/resnet50
    python -m alignmix_jax.main --config=configs/cub_resnet50.py --workdir=runs/cub_r50 \\
        --config.dataset.data_dir=DIR --config.model.pretrained=weights/resnet50
    python -m alignmix_jax.evaluation.localization --config=configs/cub_resnet50.py \\
        --workdir=runs/cub_r50 --config.dataset.data_dir=DIR

DIR holds the extracted official archive (DIR/CUB_200_2011/images.txt, ...), or is a tfds
data_dir where caltech_birds2011 is built (then add --config.dataset.name=caltech_birds2011).
The paper starts from ImageNet weights: convert torchvision's (any ResNet-50 state_dict in its
layout, e.g. the IMAGENET1K_V1 file above) and pass the output as `model.pretrained`; the
classifier (1,000 classes) is left at its initialisation for the 200 birds.

The paper reports (Table 4) top-1 localisation 57.8% and MaxBoxAcc-v2 65.9% for AlignMix with
ResNet-50 (CutMix: 54.8% and 64.8%). This code has not been run on CUB (no GPU here).

Appendix B, CUB200-2011: ResNet-50 pretrained on ImageNet as F, with the last stage (layer4)
at stride 1 so that A is 14x14x2048 at 224x224 (the appendix says "stride 2 instead of 1", the
wrong way round: it is torchvision's stride 2 that gives 7x7; Yun et al. (2019), whom it
follows, use stride 1); f = BatchNorm + ReLU, then global average pooling, g a linear
classifier of 200 classes. The paper's f pools the network's output (it ends with BatchNorm +
ReLU) directly; that head averages A linearly, so the feature modes would be exactly mixup of
the pooled features (the columns of R sum to one, measured by the start-up check,
alignmix_jax/training/inert_alignment.py); f's own BatchNorm + ReLU is the nonlinearity through
which alignment acts. The class activation maps are then taken after it, where the pooling is
(alignmix_jax/evaluation/localization.py), so CAM localisation is unchanged in kind.
`--config.model.head_norm=False --config.mixup.allow_inert_alignment=True` is the paper's head.
Training as for classification (all four mixup modes, lambda ~ Beta(2, 2), Sinkhorn eps = 0.1
for 100 iterations), without boxes. Images resized to 256x256 and randomly cropped to 224x224
(with a horizontal flip) in training, resized to 224x224 for testing. SGD for 600 epochs,
learning rate 0.01 for the classifier g and 0.001 for the other layers, both x0.1 every 150
epochs, momentum 0.9, weight decay 1e-4, batch size 16.

Localisation (alignmix_jax/evaluation/cam_localization.py): the class activation map of the last
feature maps and the classifier's weights, resized to 224x224 and min-max normalised; top-1
localisation with the box of the largest region above 0.15, and MaxBoxAcc-v2 (Choe et al., 2020).

Variants: the VGG-GAP backbone is configs/cub_vgg.py. A smoke run on the generated set of the
tests: see tests/test_localization_e2e.py.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()

    config.dataset.name = 'cub'  # the official archive; or 'caltech_birds2011' (tfds)
    config.dataset.download = False
    config.dataset.mean = (0.485, 0.456, 0.406)  # ImageNet's, as the pretrained weights expect
    config.dataset.std = (0.229, 0.224, 0.225)
    # Read by alignmix_jax.data.cub: train images resized to train_resize square, then a
    # random image_size crop and a flip (on the host); test images resized to image_size.
    config.dataset.image_size = 224
    config.dataset.train_resize = 256
    # The host does the crop and flip: the train step must not augment (refused otherwise).
    config.dataset.crop_padding = 0
    config.dataset.random_flip = False

    config.model.name = 'resnet50'
    config.model.width = 1.0
    config.model.head_norm = True  # alignment is inert without it (see the docstring)
    config.model.last_stride = 1  # layer4 at stride 1: A is 14x14 at 224x224
    # A directory written by `python -m alignmix_jax.pytorch.convert_torchvision`: ImageNet weights
    # that training starts from (all but a classifier of another number of classes).

    config.train.batch_size = 16
    config.train.num_epochs = 600
    config.train.learning_rate = 0.001  # every layer but the classifier g
    config.train.classifier_learning_rate = 0.01
    config.train.lr_decay_epochs = (150, 300, 450)
    config.train.lr_decay_factor = 0.1
    config.train.momentum = 0.9
    config.train.nesterov = False
    config.train.weight_decay = 1e-4
    config.train.eval_batch_size = 64  # 5,794 test images; the last batch is padded
    config.train.eval_every_epochs = 10  # 374 steps per epoch
    config.train.log_every_steps = 100
    config.train.checkpoint_every_steps = 5000

    # python -m alignmix_jax.evaluation.localization
    config.evals.localization = ml_collections.ConfigDict()
    config.evals.localization.batch_size = 0  # 0: train.eval_batch_size
    config.evals.localization.cam_threshold = 0.15  # top-1 localisation's box
    return config
