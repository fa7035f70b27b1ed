"""Colour jitter and rotation in `augment`: off by default, and torchvision's semantics when on."""

import colorsys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignmix_jax.data import augmentation
from alignmix_jax.data.augmentation import _COLOR_JITTER_STREAM, _ROTATION_STREAM

# Jitted, as in the train step, and because op-by-op dispatch would compile every operation
# of a rotation or a hue shift separately: tens of seconds on a cold compilation cache.
augment = jax.jit(augmentation.augment, static_argnames=('padding', 'flip', 'color_jitter',
                                                          'rotation_degrees'))
draw_jitter_factors = jax.jit(augmentation.draw_jitter_factors,
                              static_argnames=('batch_size', 'color_jitter'))
jitter_colours = jax.jit(augmentation.jitter_colours)
rotate_images = jax.jit(augmentation.rotate_images)

LUMA = np.asarray([0.2989, 0.587, 0.114])  # torchvision's rgb_to_grayscale


def random_images(seed=0, shape=(8, 16, 16, 3), low=0, high=256):
    return np.random.default_rng(seed).integers(low, high, shape, dtype=np.uint8)


def as_float(images):
    return jnp.asarray(images, jnp.float32) / 255


def crop_and_flip_reference(key, images, padding):
    """augment's crop and flip in numpy, from the draws of `jax.random.split(key)`."""
    batch_size, height, width, _ = images.shape
    crop_key, flip_key = jax.random.split(key)
    offsets = np.asarray(jax.random.randint(crop_key, (batch_size, 2), 0, 2 * padding + 1))
    flipped = np.asarray(jax.random.bernoulli(flip_key, 0.5, (batch_size,)))
    padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    expected = []
    for image, (dy, dx), flip in zip(padded, offsets, flipped, strict=True):
        window = image[dy:dy + height, dx:dx + width]
        expected.append(window[:, ::-1] if flip else window)
    return np.stack(expected)


def test_defaults_give_exactly_the_crop_and_flip_of_the_same_key():
    images = random_images()
    eager = augmentation.augment
    for seed in range(3):
        key = jax.random.PRNGKey(seed)
        expected = crop_and_flip_reference(key, images, padding=4)
        assert len({image.tobytes() for image in expected}) == len(images)
        outputs = [eager(key, images),
                   eager(key, images, color_jitter=(0, 0, 0, 0), rotation_degrees=0.0),
                   eager(key, images, padding=4, flip=True, color_jitter=[0.0] * 4,
                         rotation_degrees=0),
                   augment(key, images),
                   augment(key, images, color_jitter=(0.0, 0.0, 0.0, 0.0), rotation_degrees=0.0)]
        for output in outputs:
            assert output.dtype == jnp.uint8
            np.testing.assert_array_equal(np.asarray(output), expected)


def test_new_keys_are_folded_in_clear_of_the_crop_and_flip_keys():
    key = jax.random.PRNGKey(3)
    used = {tuple(np.asarray(subkey).tolist()) for subkey in jax.random.split(key)}
    folded = {tuple(np.asarray(jax.random.fold_in(key, stream)).tolist())
              for stream in (_COLOR_JITTER_STREAM, _ROTATION_STREAM)}
    assert len(folded) == 2 and not folded & used


@pytest.mark.parametrize('color_jitter, rotation_degrees', [
    ((0.4, 0.0, 0.0, 0.0), 0.0),
    ((0.4, 0.4, 0.4, 0.1), 0.0),
    ((0.0, 0.0, 0.0, 0.0), 15.0),
    ((0.4, 0.4, 0.4, 0.1), 15.0),
])
def test_jitter_and_rotation_keep_uint8_batches_and_change_them(color_jitter, rotation_degrees):
    images = random_images(1)
    key = jax.random.PRNGKey(0)

    @jax.jit  # As in the train step: the settings are constants of the jitted function.
    def step(key, images):
        return augment(key, images, padding=4, flip=True, color_jitter=color_jitter,
                       rotation_degrees=rotation_degrees)

    output = step(key, images)
    assert output.shape == images.shape and output.dtype == jnp.uint8
    plain = np.asarray(augment(key, images))
    changed = np.any(np.asarray(output) != plain, axis=(1, 2, 3))
    assert changed.all()


def test_bright_pixels_saturate_at_255_instead_of_wrapping_around():
    white = np.full((32, 4, 4, 3), 255, np.uint8)
    output = np.asarray(augment(jax.random.PRNGKey(1), white, padding=0, flip=False,
                                color_jitter=(0.9, 0.0, 0.0, 0.0)))
    per_image = output.reshape(32, -1)
    assert (per_image == per_image[:, :1]).all()  # one factor per image
    # Factors in [0.1, 1.9]: those above 1 leave 255 (a wrap would give 382 - 256 = 126 etc.).
    assert per_image.min() >= round(0.1 * 255)
    assert 8 <= np.sum(per_image[:, 0] == 255) <= 24
    assert len(set(per_image[:, 0].tolist())) > 8


def test_brightness_multiplies_the_pixels_by_its_factor():
    images = random_images(2, (3, 8, 8, 3))
    factors = np.asarray([0.5, 1.0, 2.0], np.float32)
    output = np.asarray(jitter_colours(as_float(images), brightness=factors)) * 255
    np.testing.assert_allclose(output[0], images[0] / 2, atol=1e-3)  # halved
    np.testing.assert_allclose(output[1], images[1], atol=1e-3)
    np.testing.assert_allclose(output[2], np.minimum(2.0 * images[2], 255), atol=1e-3)


def test_contrast_blends_each_image_with_the_mean_of_its_luma():
    images = random_images(3, (3, 8, 8, 3))
    factors = np.asarray([0.0, 0.5, 1.7], np.float32)
    output = np.asarray(jitter_colours(as_float(images), contrast=factors))
    pixels = images / 255
    mean_luma = (pixels @ LUMA).mean(axis=(1, 2))[:, None, None, None]
    expected = np.clip(factors[:, None, None, None] * pixels
                       + (1 - factors[:, None, None, None]) * mean_luma, 0, 1)
    np.testing.assert_allclose(output, expected, atol=1e-5)
    np.testing.assert_allclose(output[0], np.broadcast_to(mean_luma[0], (8, 8, 3)), atol=1e-5)
    # A channel-wise mean (tf.image's, pix.adjust_contrast's) would not give gray at factor 0.
    assert not np.allclose(pixels[0].mean(axis=(0, 1)), mean_luma[0, 0, 0], atol=1e-2)


def test_saturation_zero_gives_the_gray_image_of_the_luma():
    images = random_images(4, (3, 8, 8, 3))
    factors = np.asarray([0.0, 1.0, 2.0], np.float32)
    output = np.asarray(jitter_colours(as_float(images), saturation=factors))
    pixels = images / 255
    luma = (pixels @ LUMA)[..., None]
    np.testing.assert_allclose(output[0], np.broadcast_to(luma[0], (8, 8, 3)), atol=1e-5)
    assert (output[0] == output[0, ..., :1]).all()  # all channels equal
    np.testing.assert_allclose(output[1], pixels[1], atol=1e-6)
    np.testing.assert_allclose(output[2], np.clip(2 * pixels[2] - luma[2], 0, 1), atol=1e-5)


def test_hue_shifts_the_colour_wheel():
    primaries = np.asarray([[255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)[:, None, None]
    half_turn = np.asarray(jitter_colours(as_float(primaries), hue=np.full(3, 0.5)))
    np.testing.assert_allclose(half_turn[:, 0, 0] * 255,
                               [[0, 255, 255], [255, 0, 255], [255, 255, 0]], atol=1)
    third_turn = np.asarray(jitter_colours(as_float(primaries[:1]), hue=np.asarray([1 / 3])))
    np.testing.assert_allclose(third_turn[0, 0, 0] * 255, [0, 255, 0], atol=1)  # red to green
    # Any colour and shift, against Python's own HSV conversion.
    images = random_images(5, (4, 6, 6, 3))
    shifts = np.asarray([-0.5, -0.2, 0.05, 0.45], np.float32)
    output = np.asarray(jitter_colours(as_float(images), hue=shifts))
    expected = np.empty(images.shape)
    for index in np.ndindex(images.shape[:3]):
        hue, saturation, value = colorsys.rgb_to_hsv(*(images[index] / 255))
        expected[index] = colorsys.hsv_to_rgb((hue + shifts[index[0]]) % 1, saturation, value)
    np.testing.assert_allclose(output, expected, atol=1e-5)


def test_rotation_turns_counter_clockwise_about_the_centre():
    images = random_images(6, (4, 16, 16, 3))
    rotated = np.asarray(rotate_images(as_float(images), jnp.asarray([90.0, -90.0, 180.0, 0.0])))
    levels = rotated * 255
    for image, output, turns in zip(images[:3], levels[:3], (1, -1, 2), strict=True):
        # Every pixel, the border included (the zero frame spares it from float error).
        np.testing.assert_allclose(output, np.rot90(image, turns), atol=1)
    np.testing.assert_array_equal(rotated[3], as_float(images[3]))  # exactly the identity
    white = jnp.ones((2, 16, 16, 3))
    tilted = np.asarray(rotate_images(white, jnp.asarray([45.0, 3.0])))
    assert (tilted[0, 0, 0] == 0).all() and (tilted[0, 6:10, 6:10] == 1).all()  # black fill
    # A small rotation keeps the border, fading only past the outer pixel centres.
    assert tilted[1, 0, 8, 0] > 0.9 and tilted[1, 8, 0, 0] > 0.9


def test_drawn_factors_are_uniform_over_torchvision_ranges():
    key = jax.random.PRNGKey(2)
    factors = draw_jitter_factors(key, 2000, (0.4, 0.2, 1.5, 0.1))
    ranges = {'brightness': (0.6, 1.4), 'contrast': (0.8, 1.2), 'saturation': (0.0, 2.5),
              'hue': (-0.1, 0.1)}
    assert set(factors) == set(ranges)
    for name, (low, high) in ranges.items():
        values = np.asarray(factors[name])
        assert values.shape == (2000,)
        assert low <= values.min() < low + 0.01 * (high - low), name
        assert high - 0.01 * (high - low) < values.max() <= high, name
        assert abs(values.mean() - (low + high) / 2) < 0.03 * (high - low), name
    # A component that is off is left out; the others keep their draws.
    only_brightness = draw_jitter_factors(key, 2000, (0.4, 0.0, 0.0, 0.0))
    assert set(only_brightness) == {'brightness'}
    np.testing.assert_array_equal(only_brightness['brightness'], factors['brightness'])


def test_augment_brightens_each_crop_by_one_factor_in_range():
    images = random_images(7, low=100, high=151)  # mid-gray: no clipping even at factor 1.4
    key = jax.random.PRNGKey(4)
    plain = np.asarray(augment(key, images)).astype(np.float64)
    jittered = np.asarray(augment(key, images, color_jitter=(0.4, 0.0, 0.0, 0.0)))
    factors = jittered.sum(axis=(1, 2, 3)) / plain.sum(axis=(1, 2, 3))
    assert ((0.6 - 1e-3 <= factors) & (factors <= 1.4 + 1e-3)).all()
    assert factors.std() > 0.05  # drawn per image
    # The same crop and flip as without jitter (padding zeros stay 0), scaled and rounded.
    np.testing.assert_allclose(jittered, factors[:, None, None, None] * plain, atol=0.6)


def test_augment_rotates_by_at_most_rotation_degrees():
    white = np.full((32, 16, 16, 3), 255, np.uint8)
    output = np.asarray(augment(jax.random.PRNGKey(5), white, padding=0, flip=False,
                                rotation_degrees=10.0))
    # A rotated white square loses more of its area to the black corners the larger the angle.
    kept = output.astype(np.float64).sum(axis=(1, 2, 3)) / 255

    def kept_at(degrees):
        return float(rotate_images(as_float(white[:1]), jnp.asarray([degrees])).sum())

    rounding = 16 * 16 * 3 * 0.5 / 255
    assert (kept >= kept_at(10.0) - rounding).all()
    assert (kept < kept_at(5.0)).sum() >= 8
    assert (kept > kept_at(5.0)).sum() >= 8
    assert (output[:, 0, 0] < 255).all()  # a turned corner fades to black


@pytest.mark.parametrize('arguments, message', [
    ({'color_jitter': (0.4, 0.4, 0.4)}, r'color_jitter must be 4 non-negative numbers'),
    ({'color_jitter': (0.4, -0.1, 0.0, 0.0)}, r'color_jitter must be 4 non-negative numbers'),
    ({'color_jitter': (0.0, 0.0, 0.0, 0.6)}, r'with hue <= 0\.5'),
    ({'color_jitter': (float('nan'), 0.0, 0.0, 0.0)}, r'color_jitter must be'),
    ({'color_jitter': 0.4}, r'color_jitter must be'),
    ({'rotation_degrees': -5.0}, r'rotation_degrees must be in \[0, 180\]'),
    ({'rotation_degrees': 181.0}, r'rotation_degrees must be in \[0, 180\]'),
])
def test_invalid_settings_are_refused_saying_what_is_expected(arguments, message):
    with pytest.raises(ValueError, match=message) as raised:
        augmentation.augment(jax.random.PRNGKey(0), random_images(0, (2, 4, 4, 3)), **arguments)
    assert '\n' not in str(raised.value)


def test_jitter_needs_rgb_but_rotation_takes_any_channels():
    gray = random_images(0, (2, 8, 8, 1))
    with pytest.raises(ValueError, match=r'color_jitter needs RGB images \(3 channels\), got 1'):
        augmentation.augment(jax.random.PRNGKey(0), gray, color_jitter=(0.4, 0.0, 0.0, 0.0))
    rotated = augment(jax.random.PRNGKey(0), gray, rotation_degrees=10.0)
    assert rotated.shape == gray.shape and rotated.dtype == jnp.uint8


def test_device_augmentation_of_a_host_augmented_dataset_is_refused():
    from alignmix_jax import data
    from alignmix_jax.data import cub, imagenet
    from configs import cub_resnet50, demo

    # The in-memory datasets are augmented by the train step; ImageNet and CUB by their own
    # pipelines.
    assert data.Dataset.device_augmentation
    assert not imagenet.StreamingDataset.device_augmentation
    assert not cub.LocalizationDataset.device_augmentation

    host_augmented = cub_resnet50.get_config()
    augmentation.check_device_augmentation(host_augmented.dataset, cub.LocalizationDataset)
    # demo's dataset section asks for crop + flip: on CUB that would augment twice.
    doubled = demo.get_config().dataset
    doubled.name = 'cub'
    with pytest.raises(ValueError, match=r"^dataset 'cub' is augmented by its own pipeline: "
                                         r'set --config.dataset.crop_padding=0'):
        augmentation.check_device_augmentation(doubled, cub.LocalizationDataset)
    for field, value in (('rotation_degrees', 10.0), ('color_jitter', (0.4, 0.0, 0.0, 0.0)),
                         ('random_flip', True), ('crop_padding', 4)):
        asking = host_augmented.dataset.copy_and_resolve_references()
        setattr(asking, field, value)
        with pytest.raises(ValueError, match='augmented by its own pipeline'):
            augmentation.check_device_augmentation(asking, imagenet.StreamingDataset)
    # The same config on an in-memory dataset is fine.
    augmentation.check_device_augmentation(doubled, data.Dataset)
