"""ImageNet's per-image TensorFlow functions (graph code, run inside tf.data's parallel map):
the host-side training augmentation and the evaluation resize of `data.imagenet`.

Training: torchvision's RandomResizedCrop (scale 0.08-1, aspect ratio 3/4-4/3 drawn
log-uniformly, ten attempts, then a centred crop), resized to `image_size` (bilinear,
antialiased like PIL), a horizontal flip with probability 1/2 and optionally AlexNet-style PCA
lighting noise; JPEGs are decoded only inside their crop window. Evaluation: the shorter side
resized to `eval_resize`, then the central `image_size` square. Randomness comes from
TensorFlow's stateless ops seeded by (seed, the image's key), so it is reproducible.
"""

import numpy as np

from alignmix_jax.data.common import decode_image, import_tensorflow

# torchvision's RandomResizedCrop defaults, the augmentation of the public ImageNet code.
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
CROP_ATTEMPTS = 10

# AlexNet-style lighting noise (Krizhevsky et al., 2012) with the constants of the public code:
# eigenvalues and eigenvectors (columns) of the RGB covariance of ImageNet pixels in [0, 1].
LIGHTING_STD = 0.1
LIGHTING_EIGVAL = (0.2175, 0.0188, 0.0045)
LIGHTING_EIGVEC = ((-0.5675, 0.7192, 0.4009),
                   (-0.5808, -0.0045, -0.8140),
                   (-0.5836, -0.6948, 0.4203))


def _crop_window(tf, height, width, seed):
    """torchvision's RandomResizedCrop window (top, left, height, width) of an image.

    Ten (area, aspect ratio) draws at once; the first whose box fits is used, with a uniform
    offset; if none fits, the largest centred box with a ratio in range.
    """
    attempts_seed, top_seed, left_seed = (tf.random.experimental.stateless_fold_in(seed, tag)
                                          for tag in range(3))
    draws = tf.random.stateless_uniform([2, CROP_ATTEMPTS], attempts_seed, dtype=tf.float64)
    height_f, width_f = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
    target_area = height_f * width_f * (CROP_SCALE[0] + (CROP_SCALE[1] - CROP_SCALE[0])
                                        * draws[0])
    log_low, log_high = np.log(CROP_RATIO[0]), np.log(CROP_RATIO[1])
    aspect = tf.exp(log_low + (log_high - log_low) * draws[1])
    # Round half to even, as Python's round().
    crop_widths = tf.cast(tf.round(tf.sqrt(target_area * aspect)), tf.int32)
    crop_heights = tf.cast(tf.round(tf.sqrt(target_area / aspect)), tf.int32)
    fits = ((crop_widths > 0) & (crop_widths <= width)
            & (crop_heights > 0) & (crop_heights <= height))
    first_fit = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)

    def random_window():
        crop_height, crop_width = crop_heights[first_fit], crop_widths[first_fit]
        top = tf.random.stateless_uniform([], top_seed, minval=0,
                                          maxval=height - crop_height + 1, dtype=tf.int32)
        left = tf.random.stateless_uniform([], left_seed, minval=0,
                                           maxval=width - crop_width + 1, dtype=tf.int32)
        return tf.stack([top, left, crop_height, crop_width])

    def central_window():
        # Only the side that makes the ratio out of range is cut; otherwise the whole image.
        image_ratio = width_f / height_f
        crop_height = tf.where(image_ratio < CROP_RATIO[0],
                               tf.cast(tf.round(width_f / CROP_RATIO[0]), tf.int32), height)
        crop_width = tf.where(image_ratio > CROP_RATIO[1],
                              tf.cast(tf.round(height_f * CROP_RATIO[1]), tf.int32), width)
        return tf.stack([(height - crop_height) // 2, (width - crop_width) // 2,
                         crop_height, crop_width])

    return tf.cond(tf.reduce_any(fits), random_window, central_window)


def _decode_random_crop(tf, data, seed):
    """The RandomResizedCrop window of an encoded image, decoded (JPEGs: only the window)."""

    def jpeg():
        shape = tf.image.extract_jpeg_shape(data)
        window = _crop_window(tf, shape[0], shape[1], seed)
        return tf.image.decode_and_crop_jpeg(data, window, channels=3,
                                             dct_method='INTEGER_ACCURATE')

    def other():
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
        shape = tf.shape(image)
        window = _crop_window(tf, shape[0], shape[1], seed)
        return tf.slice(image, [window[0], window[1], 0], [window[2], window[3], 3])

    return tf.cond(tf.io.is_jpeg(data), jpeg, other)


def _to_uint8(tf, image):
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def make_train_example_fn(image_size: int, seed: int, *, pca_lighting: bool, from_files: bool):
    """(path or encoded image, label, key) -> (uint8 augmented image, int32 label).

    `key` (int64) names the draw: the same (seed, key) gives the same crop, flip and lighting.
    """
    tf = import_tensorflow()
    eigvec = tf.constant(LIGHTING_EIGVEC, tf.float32)
    eigval = tf.constant(LIGHTING_EIGVAL, tf.float32)

    @tf.autograph.experimental.do_not_convert
    def train_example(source, label, key):
        data = tf.io.read_file(source) if from_files else source
        example_seed = tf.stack([tf.constant(seed, tf.int64), key])
        crop = _decode_random_crop(tf, data, tf.random.experimental.stateless_fold_in(
            example_seed, 0))
        image = tf.image.resize(crop, [image_size, image_size], method='bilinear',
                                antialias=True)
        flip_seed = tf.random.experimental.stateless_fold_in(example_seed, 1)
        flip = tf.random.stateless_uniform([], flip_seed) < 0.5
        image = tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)
        if pca_lighting:
            lighting_seed = tf.random.experimental.stateless_fold_in(example_seed, 2)
            alpha = tf.random.stateless_normal([3], lighting_seed, stddev=LIGHTING_STD)
            # Channel c gains sum_j eigvec[c, j] alpha_j eigval_j, on the [0, 1] scale.
            shift = tf.linalg.matvec(eigvec, alpha * eigval)
            image = image + 255.0 * shift
        image = tf.ensure_shape(_to_uint8(tf, image), (image_size, image_size, 3))
        return image, tf.cast(label, tf.int32)

    return train_example


def make_eval_example_fn(image_size: int, eval_resize: int, *, from_files: bool):
    """(path or encoded image, label) -> (uint8 resized, centre-cropped image, int32 label)."""
    tf = import_tensorflow()

    @tf.autograph.experimental.do_not_convert
    def eval_example(source, label):
        data = tf.io.read_file(source) if from_files else source
        image = decode_image(tf, data)
        shape = tf.shape(image)
        height, width = tf.cast(shape[0], tf.float64), tf.cast(shape[1], tf.float64)
        # torchvision's Resize(eval_resize): the shorter side to eval_resize, the longer one
        # in proportion, truncated (computed in float64, as Python does).
        long_side_of_height = tf.cast(tf.floor(eval_resize * height / width), tf.int32)
        long_side_of_width = tf.cast(tf.floor(eval_resize * width / height), tf.int32)
        portrait = shape[1] <= shape[0]
        new_height = tf.where(portrait, long_side_of_height, eval_resize)
        new_width = tf.where(portrait, eval_resize, long_side_of_width)
        image = tf.image.resize(image, [new_height, new_width], method='bilinear',
                                antialias=True)
        # torchvision's CenterCrop: offsets round((size - crop) / 2), half to even.
        top = tf.cast(tf.round(tf.cast(new_height - image_size, tf.float64) / 2), tf.int32)
        left = tf.cast(tf.round(tf.cast(new_width - image_size, tf.float64) / 2), tf.int32)
        image = tf.slice(image, [top, left, 0], [image_size, image_size, 3])
        image = tf.ensure_shape(_to_uint8(tf, image), (image_size, image_size, 3))
        return image, tf.cast(label, tf.int32)

    return eval_example
