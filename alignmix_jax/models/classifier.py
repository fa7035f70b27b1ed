"""The classifier as three separately callable stages, so mixup can enter between any two.

    features  F: x -> A       the encoder (PreActResNet18, WideResNet, ...); also a part of
                              it, from one stage's output to another's (manifold mixup's
                              hidden representations)
    embed     f: A -> e       [BatchNorm + ReLU], global average pooling, [Dense];
                              or, with `flatten_features`, a Dense layer on the whole tensor;
                              for an encoder with a `head` of its own (the transformers), that
                              head in place of the normalisation and pooling, then [Dense]
    classify  g: e -> logits  Dense to the classes

`__call__` composes the three. The model knows nothing about mixup: the train step applies the
stages one by one (`model.apply(variables, a, train=True, method='embed')`) and mixes between
them. Parameter tree: 'encoder', 'head_norm' (if `use_head_norm`), 'embedding' (if
`embedding_dim` > 0), 'classifier'.

Optional stages of the paper's Table 8 (AlignMixup/AE and its ablations):

    decode          D: e -> x_hat     `decoder_type` 'ae' or 'vae' (parameters 'decoder')
    embed_to_tensor A -> E            `embedding_tensor_channels` > 0: E (b, h/2, w/2, channels)
                                      by a 2x2 stride-2 convolution (parameters 'tensor_embedding')
    flatten_embedding E -> e          e is then E flattened, and `embed` is the two in turn

With `decoder_type='vae'`, e is the Gaussian posterior (mu, log sigma) concatenated (parameters
'posterior'); g classifies mu, D decodes mu + sigma * noise (mu itself without noise).

`dtype` is the computation dtype (e.g. bfloat16); parameters and BatchNorm statistics stay
float32. `features` and `embed` return the computation dtype; `classify` returns float32 logits
so the loss is computed in float32.

Dense layers draw their kernels from PyTorch's nn.Linear default, U(+-1/sqrt(fan_in)), and start
with zero bias, so no class is preferred at initialisation.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from alignmix_jax.models.decoder import ResidualDecoder
from alignmix_jax.models.layers import BN_EPSILON, BN_MOMENTUM, conv_kernel_init
from alignmix_jax.models.mobilenet_v2 import MobileNetV2
from alignmix_jax.models.preact_resnet import PreActResNet18
from alignmix_jax.models.resnet import ResNet50
from alignmix_jax.models.swin import SwinTransformer
from alignmix_jax.models.vgg import VGG16GAP
from alignmix_jax.models.vit import VisionTransformer
from alignmix_jax.models.wide_resnet import WideResNet
from alignmix_jax.settings.config_choices import DECODER_TYPES, check_model_name

# config.model.name -> encoder constructor; WRN16-8 is WideResNet's default depth and widening.
ENCODERS = {
    'preact_resnet18': PreActResNet18,
    'wide_resnet16_8': WideResNet,
    # Post-activation (ends normalised): use it with use_head_norm=False (configs/imagenet.py).
    'resnet50': ResNet50,
    # VGG-16 + conv6 (Zhou et al., 2016), the WSOL backbone; no BatchNorm: use_head_norm=False.
    'vgg16_gap': VGG16GAP,
    # Post-activation (A after BatchNorm + ReLU6): use it with use_head_norm=False.
    'mobilenet_v2': MobileNetV2,
    # Transformers with a head of their own (f starts with encoder.head): head_norm=False.
    # DeiT-S/16: A is PatchTokens (the grid of patch tokens and the class token).
    'vit_small': VisionTransformer,
    # Swin-T: A is the last stage's map (b, h, w, 8C), before the final LayerNorm.
    'swin_tiny': SwinTransformer,
}

# Encoders configured by a section of their own (config.model.<section>), passed to the
# encoder's constructor as keyword arguments: config.model.name -> section.
ENCODER_OPTIONS = {
    'preact_resnet18': 'preact_resnet18',
    'mobilenet_v2': 'mobilenet_v2',
    'vit_small': 'vit',
    'swin_tiny': 'swin',
}


# Variance 1 / (3 fan_in) from a uniform distribution is U(+-1/sqrt(fan_in)).
dense_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def encoder_class(name: str) -> type[nn.Module]:
    check_model_name(name)  # config_choices.ENCODER_STAGES has the same names as ENCODERS
    return ENCODERS[name]


def has_own_head(name: str) -> bool:
    """Whether the encoder normalises and pools A itself (`encoder.head(a, train)`), as the
    transformers do; f is then that head and the optional Dense layer."""
    return hasattr(encoder_class(name), 'head')


def encoder_stages(name: str) -> int:
    """How many stages F of this encoder has; representations 1..stages-1 are hidden ones.

    PreActResNet18, ResNet-50, MobileNetV2, the ViT and Swin: 4, WRN: 3 (groups); VGG-GAP is
    not split (1).
    """
    return getattr(encoder_class(name), 'num_stages', 1)


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
    # The paper's f (Section 3.1; its Table 8 study): a fully connected layer from the whole
    # c x h x w tensor A to e, instead of global average pooling. Pooling forgets where each
    # feature is, so behind it mixing A aligned equals mixing it unaligned up to the head's
    # BatchNorm + ReLU; a Dense layer on the flattened A sees the alignment. Needs
    # embedding_dim > 0.
    flatten_features: bool = False
    dtype: Any = jnp.float32
    # A mesh axis name: training BatchNorm statistics are then means over all devices of that
    # axis (the global batch) instead of each device's slice. Only usable under shard_map.
    batch_norm_axis: str | None = None
    # AlignMixup/AE: 'none', 'ae' or 'vae' (see the module docstring and models/decoder.py).
    decoder_type: str = 'none'
    decoder_channels: int = 512  # channels of D's starting map (already scaled by width)
    image_size: int = 32  # side of the square images D produces
    # The normalisation of the images F sees: D's outputs lie in the same range.
    image_mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    image_std: tuple[float, ...] = (1.0, 1.0, 1.0)
    # > 0: e is the tensor E made from A by a 2x2 stride-2 convolution (Table 8's {x, E}).
    embedding_tensor_channels: int = 0
    # The encoder's own options (its section of config.model, ENCODER_OPTIONS), as
    # (name, value) pairs.
    encoder_options: tuple[tuple[str, Any], ...] = ()

    def setup(self):
        if has_own_head(self.encoder_name) and (self.use_head_norm or self.flatten_features
                                                or self.embedding_tensor_channels > 0):
            raise ValueError(f'{self.encoder_name} brings its own head (normalisation and '
                             'pooling of A): set model.head_norm=False, and leave '
                             'model.flatten_features and model.embedding_tensor_channels off')
        if self.decoder_type not in DECODER_TYPES:
            raise ValueError(f'unknown decoder {self.decoder_type!r}; valid: '
                             f'{", ".join(DECODER_TYPES)}')
        if self.embedding_tensor_channels > 0 and (self.embedding_dim > 0
                                                   or self.decoder_type == 'vae'):
            raise ValueError('an embedding tensor E (embedding_tensor_channels > 0) replaces the '
                             'embedding vector: it excludes embedding_dim > 0 and the VAE')
        if self.flatten_features and (self.embedding_dim <= 0
                                      or self.embedding_tensor_channels > 0):
            raise ValueError('flatten_features (f a Dense layer on the whole A) needs '
                             'embedding_dim > 0 and no embedding tensor E')
        if self.embedding_tensor_channels > 0:
            self.tensor_embedding = nn.Conv(
                self.embedding_tensor_channels, (2, 2), strides=(2, 2), padding='VALID',
                kernel_init=conv_kernel_init, dtype=self.dtype)
        if self.decoder_type == 'vae':
            self.posterior = GaussianPosterior(dtype=self.dtype)
        if self.decoder_type != 'none':
            self.decoder = ResidualDecoder(
                image_size=self.image_size, base_channels=self.decoder_channels,
                mean=self.image_mean, std=self.image_std, dtype=self.dtype,
                batch_norm_axis=self.batch_norm_axis)
        self.encoder = encoder_class(self.encoder_name)(
            width=self.width, last_stride=self.last_stride, feature_pool=self.feature_pool,
            dtype=self.dtype, batch_norm_axis=self.batch_norm_axis,
            **dict(self.encoder_options))
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

    def features(self, x: jnp.ndarray, train: bool, start: int = 0, stop: int | None = None):
        """F: normalised images (b, h, w, 3) -> feature tensor A (b, h', w', c), unnormalised;
        for the ViT, its tokens (`vit.PatchTokens`: the patch grid and the class token).

        With `start`/`stop`, a part of F: from representation `start` (0: the images) to
        representation `stop` (None: A), where representation k is the output of the encoder's
        stage k (`encoder_stages`). `features(features(x, stop=k), start=k)` is `features(x)`:
        manifold mixup mixes in between.
        """
        if start == 0 and stop is None:
            return self.encoder(x, train=train)
        if encoder_stages(self.encoder_name) < 2:
            raise ValueError(f'{self.encoder_name} does not expose hidden stages')
        return self.encoder(x, train=train, start=start, stop=stop)

    def _head(self, a: jnp.ndarray, train: bool) -> jnp.ndarray:
        if self.use_head_norm:
            a = nn.relu(self.head_norm(a, use_running_average=not train))
        return a.astype(self.dtype)

    def embed(self, a, train: bool) -> jnp.ndarray:
        """f: feature tensor A (b, h', w', c), or a ViT's tokens -> embedding e (b, d);
        (mu, log sigma) for a VAE."""
        if self.embedding_tensor_channels > 0:
            return self.flatten_embedding(self.embed_to_tensor(a, train))
        if has_own_head(self.encoder_name):
            embedding = self.encoder.head(a, train=train)
        else:
            embedding = self._embedding_vector(a, train)
        if self.embedding_dim > 0:
            embedding = self.embedding(embedding)
        if self.decoder_type == 'vae':
            embedding = self.posterior(embedding)
        return embedding

    def _embedding_vector(self, a: jnp.ndarray, train: bool) -> jnp.ndarray:
        head = self._head(a, train)
        if self.flatten_features:
            # Row-major over (h, w, c): position i of A feeds its own rows of the Dense kernel.
            return head.reshape(head.shape[0], -1)
        return jnp.mean(head, axis=(1, 2))

    def embed_to_tensor(self, a: jnp.ndarray, train: bool) -> jnp.ndarray:
        """A (b, h', w', c) -> E (b, h'/2, w'/2, embedding_tensor_channels), to mix or align."""
        if self.embedding_tensor_channels <= 0:
            raise ValueError('embed_to_tensor needs embedding_tensor_channels > 0')
        return self.tensor_embedding(self._head(a, train))

    def flatten_embedding(self, tensor: jnp.ndarray) -> jnp.ndarray:
        """E (b, h, w, c) -> e (b, h * w * c), the input of g and D."""
        return tensor.reshape(tensor.shape[0], -1)

    def classify(self, e: jnp.ndarray) -> jnp.ndarray:
        """g: embedding e (b, d) -> float32 logits (b, num_classes); a VAE's g reads mu."""
        if self.decoder_type == 'vae':
            e = self.posterior_parts(e)[0]
        return self.classifier(e).astype(jnp.float32)

    def posterior_parts(self, e: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        """A VAE's embedding (b, 2d) -> (mu, log sigma), each (b, d)."""
        mean, log_sigma = jnp.split(e, 2, axis=-1)
        return mean, log_sigma

    def decode(self, e: jnp.ndarray, train: bool, noise: jnp.ndarray | None = None):
        """D: e (b, d) -> x_hat (b, image_size, image_size, 3), normalised like the input.

        A VAE decodes the reparameterised sample z = mu + sigma * noise (`noise`: standard
        normal, (b, d)), or mu when `noise` is None (evaluation, pictures).
        """
        if self.decoder_type == 'none':
            raise ValueError('decode needs a decoder: set model.decoder to "ae" or "vae"')
        if self.decoder_type == 'vae':
            mean, log_sigma = self.posterior_parts(e)
            e = mean if noise is None else mean + jnp.exp(log_sigma) * noise.astype(mean.dtype)
        return self.decoder(e, train=train)

    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        embedding = self.embed(self.features(x, train), train)
        if self.decoder_type != 'none' and self.is_initializing():
            self.decode(embedding, train)  # creates D's variables with the others
        return self.classify(embedding)


class GaussianPosterior(nn.Module):
    """A VAE's q(z | x): a vector (b, d) -> (mu, log sigma) concatenated, (b, 2d)."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        latent_dim = x.shape[-1]
        mean = nn.Dense(latent_dim, kernel_init=dense_kernel_init, dtype=self.dtype,
                        name='mean')(x)
        # Zero kernel and bias: log sigma starts at 0, the prior's unit variance.
        log_sigma = nn.Dense(latent_dim, kernel_init=nn.initializers.zeros, dtype=self.dtype,
                             name='log_sigma')(x)
        return jnp.concatenate([mean, log_sigma], axis=-1)
