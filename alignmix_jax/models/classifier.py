"""The classifier as three separately callable stages, so mixup can enter between any two.

    features  F: x -> A       the convolutional encoder (PreActResNet18 or WideResNet)
    embed     f: A -> e       [BatchNorm + ReLU], global average pooling, [Dense]
    classify  g: e -> logits  Dense to the classes

`__call__` composes the three. The model knows nothing about mixup: the train step applies the
stages one by one (`model.apply(variables, a, train=True, method='embed')`) and mixes between
them. Parameter tree: 'encoder', 'head_norm' (if `use_head_norm`), 'embedding' (if
`embedding_dim` > 0), 'classifier'.

`dtype` is the computation dtype (e.g. bfloat16); parameters and BatchNorm statistics stay
float32. `features` and `embed` return the computation dtype; `classify` returns float32 logits
so the loss is computed in float32.

Dense layers draw their kernels from PyTorch's nn.Linear default, U(+-1/sqrt(fan_in)), and start
with zero bias, so no class is preferred at initialisation.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from alignmix_jax.models.preact_resnet import BN_EPSILON, BN_MOMENTUM, PreActResNet18
from alignmix_jax.models.resnet import ResNet50
from alignmix_jax.models.vgg import VGG16GAP
from alignmix_jax.models.wide_resnet import WideResNet

# config.model.name -> encoder constructor; WRN16-8 is WideResNet's default depth and widening.
ENCODERS = {
    'preact_resnet18': PreActResNet18,
    'wide_resnet16_8': WideResNet,
    # Post-activation (ends normalised): use it with use_head_norm=False (configs/imagenet.py).
    'resnet50': ResNet50,
    # VGG-16 + conv6 (Zhou et al., 2016), the WSOL backbone; no BatchNorm: use_head_norm=False.
    'vgg16_gap': VGG16GAP,
}

# Variance 1 / (3 fan_in) from a uniform distribution is U(+-1/sqrt(fan_in)).
dense_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def encoder_class(name: str) -> type[nn.Module]:
    if name not in ENCODERS:
        raise ValueError(f'unknown model name {name!r}; valid names: {", ".join(ENCODERS)}')
    return ENCODERS[name]


class Classifier(nn.Module):
    """An encoder F, a stage-2 encoder f and a linear classifier g; see the module docstring."""

    num_classes: int
    encoder_name: str = 'preact_resnet18'
    width: float = 1.0
    last_stride: int = 2
    feature_pool: int = 1
    # 0: e is the pooled feature vector itself; > 0: a Dense layer maps it to this many dims.
    embedding_dim: int = 0
    # Pre-activation encoders end unnormalised, so f starts with BatchNorm + ReLU.
    use_head_norm: bool = True
    dtype: Any = jnp.float32
    # A mesh axis name: training BatchNorm statistics are then means over all devices of that
    # axis (the global batch) instead of each device's slice. Only usable under shard_map.
    batch_norm_axis: str | None = None

    def setup(self):
        self.encoder = encoder_class(self.encoder_name)(
            width=self.width, last_stride=self.last_stride, feature_pool=self.feature_pool,
            dtype=self.dtype, batch_norm_axis=self.batch_norm_axis)
        if self.use_head_norm:
            # use_running_average is given per call: the same layer serves train and eval.
            self.head_norm = nn.BatchNorm(momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                                          use_fast_variance=False, dtype=self.dtype,
                                          axis_name=self.batch_norm_axis)
        if self.embedding_dim > 0:
            self.embedding = nn.Dense(self.embedding_dim, kernel_init=dense_kernel_init,
                                      dtype=self.dtype)
        self.classifier = nn.Dense(self.num_classes, kernel_init=dense_kernel_init,
                                   dtype=self.dtype)

    def features(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        """F: normalised images (b, h, w, 3) -> feature tensor A (b, h', w', c), unnormalised."""
        return self.encoder(x, train=train)

    def embed(self, a: jnp.ndarray, train: bool) -> jnp.ndarray:
        """f: feature tensor A (b, h', w', c) -> embedding e (b, d)."""
        if self.use_head_norm:
            a = nn.relu(self.head_norm(a, use_running_average=not train))
        embedding = jnp.mean(a.astype(self.dtype), axis=(1, 2))
        if self.embedding_dim > 0:
            embedding = self.embedding(embedding)
        return embedding

    def classify(self, e: jnp.ndarray) -> jnp.ndarray:
        """g: embedding e (b, d) -> float32 logits (b, num_classes)."""
        return self.classifier(e).astype(jnp.float32)

    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        return self.classify(self.embed(self.features(x, train), train))
