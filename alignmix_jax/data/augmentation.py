"""Device-side image work inside the jitted train and eval steps: augmentation and normalisation.

`augment` (4-pixel zero padding + random crop, horizontal flip; optionally torchvision-style
colour jitter and small rotations, off by default) and `normalize` are pure jax functions:
augmentation runs on the device, so a GPU is never left waiting for host-side image processing,
and the host only ships uint8 batches. Only datasets whose `device_augmentation` is True are
augmented here (the in-memory ones); `check_device_augmentation` refuses a config that asks
device augmentation of a dataset whose own pipeline augments (ImageNet, CUB).
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax import lax


def device_augmentation_requested(dataset_config: ml_collections.ConfigDict) -> bool:
    """Whether `config.dataset` asks for any device-side augmentation."""
    return bool(dataset_config.crop_padding > 0 or dataset_config.random_flip
                or any(dataset_config.color_jitter) or dataset_config.rotation_degrees > 0)


def check_device_augmentation(dataset_config: ml_collections.ConfigDict, dataset) -> None:
    """Refuses device augmentation of a dataset that its own pipeline already augments."""
    if not dataset.device_augmentation and device_augmentation_requested(dataset_config):
        raise ValueError(
            f'dataset {dataset_config.name!r} is augmented by its own pipeline: set '
            '--config.dataset.crop_padding=0 --config.dataset.random_flip=False '
            '(and no color_jitter or rotation_degrees) so it is not augmented twice')


# The optional augmentations draw from keys folded out of `augment`'s key. With the default
# (partitionable) threefry, `jax.random.fold_in(key, i)` is `jax.random.split(key, n)[i]`, so
# folding in 0 or 1 would reuse the crop or flip key: these constants keep clear of both. The
# crop and flip keep their `jax.random.split(key)`, so turning jitter or rotation on or off
# changes no crop or flip.
_COLOR_JITTER_STREAM = 0xC010
_ROTATION_STREAM = 0x4074
JITTER_COMPONENTS = ('brightness', 'contrast', 'saturation', 'hue')


def augment(key: jax.Array, images: jax.Array, *, padding: int = 4, flip: bool = True,
            color_jitter: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
            rotation_degrees: float = 0.0) -> jax.Array:
    """Random crop of the zero-padded image, random horizontal flip, optionally colour jitter
    and rotation, per example.

    As torchvision's RandomCrop(size, padding=padding) + RandomHorizontalFlip(): crop offsets
    are uniform in [0, 2 * padding] on each axis, flips have probability 1/2. Then, if any of
    `color_jitter` = (brightness, contrast, saturation, hue) is positive, ColorJitter's
    per-image factors (`draw_jitter_factors`, `jitter_colours`); then, if `rotation_degrees` is
    positive, RandomRotation(rotation_degrees): a rotation by an angle uniform in
    [-rotation_degrees, rotation_degrees], counter-clockwise for positive angles, bilinear,
    with black outside the image (`rotate_images`). Jitter and rotation work on floats in
    [0, 1], rounded to the nearest level once at the end. Their settings must be Python numbers
    (not traced): a component that is 0 is skipped, so the defaults give exactly the crop and
    flip, bit for bit. `images` is a uint8 (b, h, w, c) batch; the result has the same shape
    and dtype.
    """
    color_jitter = _checked_color_jitter(color_jitter)
    rotation_degrees = float(rotation_degrees)
    if not 0.0 <= rotation_degrees <= 180.0:
        raise ValueError(f'rotation_degrees must be in [0, 180] (0: no rotation), got '
                         f'{rotation_degrees}')
    batch_size, height, width, channels = images.shape
    if any(color_jitter) and channels != 3:
        raise ValueError(f'color_jitter needs RGB images (3 channels), got {channels}: set it '
                         'to (0, 0, 0, 0)')
    crop_key, flip_key = jax.random.split(key)
    if padding > 0:
        padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
        offsets = jax.random.randint(crop_key, (batch_size, 2), 0, 2 * padding + 1)

        def crop(image, offset):
            return lax.dynamic_slice(image, (offset[0], offset[1], 0), (height, width, channels))

        images = jax.vmap(crop)(padded, offsets)
    if flip:
        flipped = jax.random.bernoulli(flip_key, 0.5, (batch_size,))
        images = jnp.where(flipped[:, None, None, None], images[:, :, ::-1, :], images)
    if not any(color_jitter) and rotation_degrees == 0.0:
        return images
    pixels = images.astype(jnp.float32) / 255.0
    if any(color_jitter):
        factors = draw_jitter_factors(jax.random.fold_in(key, _COLOR_JITTER_STREAM), batch_size,
                                      color_jitter)
        pixels = jitter_colours(pixels, **factors)
    if rotation_degrees > 0.0:
        angles = jax.random.uniform(jax.random.fold_in(key, _ROTATION_STREAM), (batch_size,),
                                    minval=-rotation_degrees, maxval=rotation_degrees)
        pixels = rotate_images(pixels, angles)
    # jnp.round rounds halves to even; the clip only guards against float error at 0 and 1.
    return jnp.clip(jnp.round(pixels * 255.0), 0, 255).astype(jnp.uint8)


def _checked_color_jitter(color_jitter: Sequence[float]) -> tuple[float, ...]:
    message = ('color_jitter must be 4 non-negative numbers (brightness, contrast, saturation, '
               f'hue) with hue <= 0.5, as torchvision\'s ColorJitter; got {color_jitter!r}')
    try:
        values = tuple(float(value) for value in color_jitter)
    except (TypeError, ValueError) as error:
        raise ValueError(message) from error
    # `not >=` also refuses NaN.
    if len(values) != 4 or not all(value >= 0.0 for value in values) or not values[3] <= 0.5:
        raise ValueError(message)
    return values


def draw_jitter_factors(key: jax.Array, batch_size: int,
                        color_jitter: Sequence[float]) -> dict[str, jax.Array]:
    """Per-image factors of torchvision's ColorJitter, as `jitter_colours` keywords.

    For (brightness, contrast, saturation) = (b, c, s): factors uniform in [max(0, 1 - b),
    1 + b], etc.; for hue h: a shift uniform in [-h, h]. Each is a float32 (batch_size,) array;
    a component that is 0 is left out (torchvision skips it too). One uniform draw per image
    and component, so a component's factors do not depend on which others are on.
    """
    color_jitter = _checked_color_jitter(color_jitter)
    uniform = jax.random.uniform(key, (batch_size, len(JITTER_COMPONENTS)))
    factors = {}
    for column, (name, amount) in enumerate(zip(JITTER_COMPONENTS, color_jitter, strict=True)):
        if amount == 0.0:
            continue
        low, high = (-amount, amount) if name == 'hue' else (max(0.0, 1.0 - amount), 1.0 + amount)
        factors[name] = low + (high - low) * uniform[:, column]
    return factors


def jitter_colours(images: jax.Array, *, brightness: jax.Array | None = None,
                   contrast: jax.Array | None = None, saturation: jax.Array | None = None,
                   hue: jax.Array | None = None) -> jax.Array:
    """torchvision's colour adjustments, with per-image factors, on float RGB images in [0, 1].

    `images` is (b, h, w, 3); each factor is (b,) or None (skipped). Applied in the fixed order
    brightness, contrast, saturation, hue (torchvision's ColorJitter permutes the order randomly
    per call), each clipped to [0, 1] as torchvision's adjust_* do. With `gray` the luma
    0.2989 R + 0.587 G + 0.114 B (torchvision's rgb_to_grayscale, pix's rec601):
    - brightness f: f * image (pix.adjust_brightness adds a delta instead: tf.image's);
    - contrast f: f * image + (1 - f) * mean(gray) over the whole image, one scalar per image
      (pix.adjust_contrast blends with each channel's own mean instead: tf.image's);
    - saturation f: f * image + (1 - f) * gray (pix.adjust_saturation scales the HSV saturation
      instead: tf.image's; f = 0 gives r = g = b = max(r, g, b) there, the luma here);
    - hue d: the HSV hue shifted by d turns of the colour wheel, (h + d) mod 1: pix.adjust_hue,
      which is torchvision's adjust_hue.
    """
    # dm-pix only for the options that need it (off by default), so the rest needs none.
    import dm_pix as pix

    def per_image(factor):
        return jnp.asarray(factor, images.dtype)[:, None, None, None]

    def gray(image):
        return pix.rgb_to_grayscale(image, luma_standard='rec601')

    if brightness is not None:
        images = jnp.clip(per_image(brightness) * images, 0.0, 1.0)
    if contrast is not None:
        mean = jnp.mean(gray(images), axis=(1, 2, 3), keepdims=True)
        factor = per_image(contrast)
        images = jnp.clip(factor * images + (1.0 - factor) * mean, 0.0, 1.0)
    if saturation is not None:
        factor = per_image(saturation)
        images = jnp.clip(factor * images + (1.0 - factor) * gray(images), 0.0, 1.0)
    if hue is not None:
        images = jnp.clip(jax.vmap(pix.adjust_hue)(images, jnp.asarray(hue, images.dtype)),
                          0.0, 1.0)
    return images


def rotate_images(images: jax.Array, degrees: jax.Array) -> jax.Array:
    """Rotates each float (h, w, c) image of the batch by its angle in `degrees`, (b,).

    Counter-clockwise for positive angles, as seen with row 0 at the top (so 90 degrees is
    `jnp.rot90(image)`), about the image centre, as torchvision's rotate (pix.rotate, which does
    it, takes radians). Bilinear, with 0 (black) outside the image, as RandomRotation's default
    fill (whose default interpolation is nearest, though).
    """
    import dm_pix as pix  # only for this option, as in jitter_colours

    # pix.rotate's mode='constant' gives cval wherever the source position is past the outer
    # pixel centres, so even a tiny rotation would blacken half of the border pixels. Inside a
    # 1-pixel frame of zeros, the edge fades out over that last pixel instead, as torchvision's
    # bilinear sampling with zero padding does; the frame is cut off again afterwards.
    framed = jnp.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)))

    def rotate(image, angle):
        return pix.rotate(image, angle, order=1, mode='constant', cval=0.0)[1:-1, 1:-1]

    radians = jnp.deg2rad(jnp.asarray(degrees, images.dtype))
    return jax.vmap(rotate)(framed, radians)


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
    """(images / 255 - mean) / std per channel, in float32, for uint8 (..., c) images.

    `mean` and `std` are constants (config values), not traced arrays.
    """
    if images.dtype != jnp.uint8:
        raise TypeError(f'normalize takes uint8 images, got {images.dtype}')
    num_channels = images.shape[-1]
    # A uint8 pixel takes 256 values, so a table computed in float64 gives the correctly rounded
    # result, the same eagerly, under jit and on any backend; float32 arithmetic would not be:
    # XLA turns division by a constant into multiplication by its reciprocal (off by an ulp).
    levels = np.arange(256, dtype=np.float64)[None, :]
    table = (levels / 255 - np.asarray(mean, np.float64)[:, None]) \
        / np.asarray(std, np.float64)[:, None]
    flat_table = jnp.asarray(table.astype(np.float32).reshape(num_channels * 256))
    channel_offsets = 256 * jnp.arange(num_channels, dtype=jnp.int32)
    return flat_table[jnp.asarray(images).astype(jnp.int32) + channel_offsets]

