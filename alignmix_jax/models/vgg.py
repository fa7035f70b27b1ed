"""VGG-GAP: VGG-16 with a global-average-pooling head, the CAM backbone of WSOL (224x224 inputs).

Which variant, and why: the paper (Appendix B) takes "the modified architecture of VGG-GAP as
described in Zhou et al. (2016)", "Learning Deep Features for Discriminative Localization":
the thirteen 3x3 convolutions of VGG-16 (configuration D of Simonyan & Zisserman, 2015), the
layers after conv5_3 removed (the last max pool and the three fully connected layers), and one
new 3x3 convolution with 1024 channels (stride 1, padding 1) followed by ReLU. Choe et al.
(2020), "Evaluating Weakly Supervised Object Localization Methods Right", use the same network
as their VGG16 CAM baseline (their conv6), so weights trained in either setting load here.
At 224x224 the feature tensor A is (b, 14, 14, 1024); the Classifier's head f must be plain
pooling (`model.head_norm=False`: A is already rectified) and g the linear classifier whose
weights make the class activation maps (alignmix_jax/evaluation/cam_localization.py).

`last_stride=2` keeps the fifth max pool before conv6 (A at 7x7, as VGG-16's own feature
output), `last_stride=1` removes it (14x14, the WSOL network): the same meaning as ResNet-50's
`last_stride`, the stride of the last downsampling. configs/cub_vgg.py sets 1.

No BatchNorm (torchvision's `vgg16`, whose ImageNet weights WSOL starts from, has none), so the
model has no 'batch_stats' collection; `batch_norm_axis` is accepted for the common encoder
signature and unused.

Parameter names, for converters from torchvision state_dicts (alignmix_jax/convert_torchvision):
'conv{block}_{index}' for VGG-16's convolutions (conv1_1 ... conv5_3, torchvision's
`features.{0, 2, 5, ..., 28}`) and 'conv6' for the added one.

Initialisation as torchvision's VGG: He normal (fan_out) kernels, zero biases.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from alignmix_jax.models.layers import conv_kernel_init, pool_features, scaled_channels

# VGG-16 (configuration D): output channels of the convolutions of each of the five blocks;
# every block ends with a 2x2 stride-2 max pool.
VGG16_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
# Channels of the convolution Zhou et al. (2016) add after conv5_3.
GAP_CHANNELS = 1024


def vgg16_layer_names() -> list[str]:
    """The names of VGG-16's convolutions in order: conv1_1, conv1_2, conv2_1, ..., conv5_3."""
    return [f'conv{block}_{index}' for block, channels in enumerate(VGG16_BLOCKS, start=1)
            for index in range(1, len(channels) + 1)]


def _conv3x3(channels: int, dtype: Any, name: str) -> nn.Conv:
    # Symmetric one-pixel padding, as PyTorch's padding=1.
    return nn.Conv(channels, (3, 3), padding=((1, 1), (1, 1)), use_bias=True,
                   kernel_init=conv_kernel_init, bias_init=nn.initializers.zeros, dtype=dtype,
                   name=name)


class VGG16GAP(nn.Module):
    """F: normalised NHWC images -> A of shape (b, 14, 14, 1024 * width) at 224x224."""

    width: float = 1.0
    last_stride: int = 1
    feature_pool: int = 1
    dtype: Any = jnp.float32
    batch_norm_axis: str | None = None  # unused: no BatchNorm

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        del train  # no BatchNorm or dropout: the same function in training and evaluation
        if self.last_stride not in (1, 2):
            raise ValueError(f'vgg16_gap takes last_stride 1 (no fifth max pool, 14x14 at '
                             f'224) or 2 (7x7), got {self.last_stride}')
        out = x
        names = iter(vgg16_layer_names())
        for block, block_channels in enumerate(VGG16_BLOCKS, start=1):
            for channels in block_channels:
                out = nn.relu(_conv3x3(scaled_channels(channels, self.width), self.dtype,
                                       next(names))(out))
            if block < len(VGG16_BLOCKS) or self.last_stride == 2:
                out = nn.max_pool(out, (2, 2), strides=(2, 2))
        out = nn.relu(_conv3x3(scaled_channels(GAP_CHANNELS, self.width), self.dtype,
                               'conv6')(out))
        return pool_features(out, self.feature_pool)
