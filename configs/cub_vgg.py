"""AlignMix on CUB-200-2011 for weakly-supervised localisation, VGG-GAP (Appendix B).

    python -m alignmix_jax.pytorch.convert_torchvision --arch=vgg16 \\
        --state_dict=vgg16-397923af.pth --output=weights/vgg16
    python -m alignmix_jax.main --config=configs/cub_vgg.py --workdir=runs/cub_vgg \\
        --config.dataset.data_dir=DIR --config.model.pretrained=weights/vgg16
    python -m alignmix_jax.evaluation.localization --config=configs/cub_vgg.py \\
        --workdir=runs/cub_vgg --config.dataset.data_dir=DIR

Everything as configs/cub_resnet50.py (data, augmentation, schedule, localisation), except:
- F is VGG-GAP (alignmix_jax/models/vgg.py): VGG-16's thirteen convolutions without the last
  max pool, plus a 3x3 convolution of 1024 channels and ReLU (Zhou et al., 2016, whose
  "modified architecture" the appendix names), so A is 14x14x1024 at 224x224. torchvision's
  VGG-16 weights initialise the thirteen convolutions; the added one starts from He init.
- f's BatchNorm + ReLU on conv6's ReLU output, as for ResNet-50 and for the same reason: without
  it f averages A linearly and alignment changes nothing.
- learning rate 0.001 for the classifier g and 0.0001 for the other layers (Appendix B),
  x0.1 every 150 epochs, 600 epochs, batch 16.

Doubt: the appendix gives the new convolution (conv6) no learning rate of its own, so it is
trained at 0.0001 with the pretrained layers; Choe et al. (2020) train the layers that are new
(conv6 and the classifier) with a 10x learning rate.

The paper reports (Table 4) top-1 localisation 53.7% and MaxBoxAcc-v2 64.5% for AlignMix with
VGG-GAP (CutMix: 52.5% and 62.6%). Not run here (no GPU).
"""

from configs import cub_resnet50


def get_config():
    config = cub_resnet50.get_config()
    config.model.name = 'vgg16_gap'
    config.model.head_norm = True  # A is conv6's ReLU output; inert without (docstring)
    config.model.last_stride = 1  # no fifth max pool: 14x14
    config.train.learning_rate = 0.0001
    config.train.classifier_learning_rate = 0.001
    return config
