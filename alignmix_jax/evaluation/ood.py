"""Out-of-distribution detection with the maximum softmax probability (paper Tables 3 and 6).

    python -m alignmix_jax.evaluation.ood --config=configs/demo.py --workdir=DIR

The score of an image is its largest softmax probability (Hendrycks & Gimpel 2017): high for
in-distribution (ID) images, the test split, low for out-of-distribution (OOD) ones. For each
OOD set (`config.evals.ood.datasets`):

- `detection_accuracy` (the headline, the paper's protocol after Hendrycks and Gimpel): the
  balanced accuracy 0.5 * (TPR_ID(t) + TNR_OOD(t)) at the threshold t = 0.5 on the maximum
  softmax probability, TPR_ID(t) the fraction of ID scores >= t and TNR_OOD(t) that of OOD
  scores < t;
- `best_threshold_detection_accuracy`: the same maximised over every threshold (as in ODIN,
  Liang et al. 2018), an upper bound that uses the OOD labels to choose t, reported beside it;
- AUROC with ID as positive (the same number with OOD as positive and the negated score);
- AUPR with ID as positive (`aupr_in`, the score) and with OOD as positive (`aupr_out`, the
  negated score), as scikit-learn's average precision.

OOD sets:
- 'uniform': images of U(0, 1) pixels; 'gaussian': N(0.5, 0.5) pixels (mean and standard
  deviation 0.5), clipped to [0, 1] (paper Appendix C, Table 6). Drawn with a fixed key, as many
  as the test set has (`num_noise_images`), and stored as uint8 like any image (rounding moves a
  pixel by at most 1/510).
- The paper's OOD sets (Table 3), as ODIN (Liang et al. 2018) distributes them, by name:
  'lsun_crop:PATH', 'isun:PATH', 'tiny_imagenet_crop:PATH', PATH the folder their archive
  extracts to (docs/evaluation.md, "Out-of-distribution sets"). Their images (36x36) are
  centre-cropped to the input size (32x32) whatever `resize` says: the crop is part of these
  sets' protocol.
- 'tfds:NAME' or 'tfds:NAME:SPLIT' (default split 'test'): a tfds dataset prepared in
  `data_dir`; 'image_folder:PATH': every image file below PATH (e.g. LSUN, iSUN, Tiny-ImageNet
  test images). Both are fitted to the input size by `resize`: 'crop' takes the central window
  (after enlarging images smaller than it, keeping their aspect), 'resize' rescales the whole
  image (the paper's "crop" and "resize" variants of Table 3 and Table 6).
- 'held_out': the test images of `config.dataset.held_out_classes`, classes the model was not
  trained on (the held-out-classes protocol: train on some classes of a dataset, here any held
  in memory, and treat the others as OOD).
"""

import functools
import pathlib

import jax
import numpy as np
from sklearn import metrics as sk_metrics

from alignmix_jax import data
from alignmix_jax.data import common as data_common
from alignmix_jax.evaluation import common

_NOISE_STREAMS = {'uniform': 0, 'gaussian': 1}
# The paper's OOD sets of Table 3 (ODIN's archives), named sources of image folders that are
# centre-cropped to the input size: name -> what docs/evaluation.md calls the set.
PAPER_SETS = {'lsun_crop': 'LSUN (crop)', 'isun': 'iSUN',
              'tiny_imagenet_crop': 'Tiny-ImageNet (crop)'}
# The paper's threshold on the maximum softmax probability (after Hendrycks and Gimpel).
DETECTION_THRESHOLD = 0.5


def detection_accuracy(in_scores: np.ndarray, out_scores: np.ndarray,
                       threshold: float = DETECTION_THRESHOLD) -> float:
    """0.5 * (P(in score >= threshold) + P(out score < threshold))."""
    return float(0.5 * (np.mean(np.asarray(in_scores) >= threshold)
                        + np.mean(np.asarray(out_scores) < threshold)))


def best_threshold_detection_accuracy(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """max_t 0.5 * (P(in score >= t) + P(out score < t)) over every distinct score and +inf."""
    in_sorted, out_sorted = np.sort(in_scores), np.sort(out_scores)
    thresholds = np.append(np.unique(np.concatenate([in_scores, out_scores])), np.inf)
    true_positive_rate = 1.0 - np.searchsorted(in_sorted, thresholds, 'left') / len(in_sorted)
    true_negative_rate = np.searchsorted(out_sorted, thresholds, 'left') / len(out_sorted)
    return float(np.max(0.5 * (true_positive_rate + true_negative_rate)))


def detection_metrics(in_scores: np.ndarray, out_scores: np.ndarray) -> dict:
    """The figures of the module docstring for ID scores against OOD scores."""
    in_scores, out_scores = np.asarray(in_scores), np.asarray(out_scores)
    is_in = np.concatenate([np.ones(len(in_scores)), np.zeros(len(out_scores))])
    scores = np.concatenate([in_scores, out_scores])
    return {
        'detection_accuracy': detection_accuracy(in_scores, out_scores),
        'detection_threshold': DETECTION_THRESHOLD,
        'best_threshold_detection_accuracy': best_threshold_detection_accuracy(
            in_scores, out_scores),
        'auroc': float(sk_metrics.roc_auc_score(is_in, scores)),
        'aupr_in': float(sk_metrics.average_precision_score(is_in, scores)),
        'aupr_out': float(sk_metrics.average_precision_score(1 - is_in, -scores)),
        'num_in': len(in_scores), 'num_out': len(out_scores)}


def noise_images(kind: str, num_images: int, image_shape, seed: int) -> np.ndarray:
    """uint8 noise images: 'uniform' U(0, 1) or 'gaussian' N(0.5, 0.5) clipped to [0, 1]."""
    key = jax.random.fold_in(jax.random.PRNGKey(seed), _NOISE_STREAMS[kind])
    shape = (num_images, *image_shape)
    if kind == 'uniform':
        pixels = jax.random.uniform(key, shape)
    else:
        pixels = 0.5 + 0.5 * jax.random.normal(key, shape)
    return np.asarray(np.round(255 * np.clip(np.asarray(pixels), 0.0, 1.0)), np.uint8)


def _fit_to_size(tf, image, height: int, width: int, mode: str):
    """A uint8 image of any size -> (height, width, 3), centre-cropped or resized."""
    image = tf.cast(image, tf.float32)
    if mode == 'resize':
        fitted = tf.image.resize(image, (height, width), antialias=True)
    else:
        shape = tf.cast(tf.shape(image)[:2], tf.float32)
        # Enlarge (keeping the aspect) only an image smaller than the window.
        scale = tf.maximum(1.0, tf.reduce_max(tf.constant([height, width], tf.float32) / shape))
        size = tf.cast(tf.math.ceil(shape * scale), tf.int32)
        image = tf.cond(scale > 1.0, lambda: tf.image.resize(image, size), lambda: image)
        top = (tf.shape(image)[0] - height) // 2
        left = (tf.shape(image)[1] - width) // 2
        fitted = tf.image.crop_to_bounding_box(image, top, left, height, width)
    return tf.cast(tf.clip_by_value(tf.round(fitted), 0.0, 255.0), tf.uint8)


def _fitted_images(tf, images, image_shape, mode: str) -> np.ndarray:
    """A tf.data dataset of uint8 images of any sizes -> one (n, h, w, 3) uint8 array."""
    height, width = image_shape[:2]
    fitted = images.map(lambda image: _fit_to_size(tf, image, height, width, mode),
                        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(1024)
    batches = list(fitted.as_numpy_iterator())
    if not batches:
        return np.zeros((0, *image_shape), np.uint8)
    return np.concatenate(batches)


def folder_images(path: str, image_shape, mode: str) -> np.ndarray:
    """Every image file below `path` (sorted by path), fitted to `image_shape`."""
    root = pathlib.Path(path).expanduser()
    files = sorted(str(file) for file in root.rglob('*')
                   if file.is_file() and file.suffix.lower() in data_common.IMAGE_SUFFIXES)
    if not files:
        raise data.DatasetNotFoundError(
            f'OOD image folder {root} holds no images ({", ".join(data_common.IMAGE_SUFFIXES)})')
    tf = data_common.import_tensorflow()
    decoded = tf.data.Dataset.from_tensor_slices(files).map(
        lambda file: data_common.decode_image(tf, tf.io.read_file(file)))
    return _fitted_images(tf, decoded, image_shape, mode)


def tfds_images(spec: str, data_dir: str | None, image_shape, mode: str) -> np.ndarray:
    """The images of a prepared tfds dataset, 'NAME' or 'NAME:SPLIT', fitted to the size."""
    name, _, split = spec.partition(':')
    tf = data_common.import_tensorflow()
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
        raise data.DatasetNotFoundError(
            f'OOD dataset {name} is not prepared in {builder.data_dir}: run `tfds build {name} '
            f'--data_dir=DIR` and pass --config.evals.ood.data_dir=DIR')
    examples = builder.as_dataset(split=split or 'test', shuffle_files=False)
    return _fitted_images(tf, examples.map(lambda example: example['image']), image_shape, mode)


def _max_softmax(context, variables, batch_index, images, labels):
    del batch_index, labels
    return {'score': jax.nn.softmax(context.logits(variables, images), axis=-1).max(axis=-1)}


class Evaluator:
    """Maximum-softmax OOD detection of each configured OOD set against the test split."""

    name = 'ood'

    def __init__(self, context: common.EvalContext, *, batch_size: int = 0,
                 datasets=('uniform', 'gaussian'), num_noise_images: int = 0, seed: int = 0,
                 resize: str = 'crop', data_dir: str | None = None):
        if resize not in ('crop', 'resize'):
            raise ValueError(f"evals.ood.resize must be 'crop' or 'resize', got {resize!r}")
        if not datasets:
            raise ValueError('evals.ood.datasets is empty: name at least one OOD set')
        self.context = context
        self.batch_size = batch_size or context.batch_size
        self._score_fn = jax.jit(functools.partial(_max_softmax, context))
        # OOD images are read once, here, so that `run` can be called repeatedly.
        self.ood_sets = {name: self._load(name, num_noise_images, seed, resize, data_dir)
                         for name in datasets}

    def _load(self, name, num_noise_images, seed, resize, data_dir) -> data.Split:
        image_shape = self.context.image_shape
        if name in _NOISE_STREAMS:
            if not num_noise_images:
                test = getattr(self.context.dataset, 'test', None)
                if test is None:
                    raise ValueError('set evals.ood.num_noise_images for a streamed test set')
                num_noise_images = len(test.labels)
            images = noise_images(name, num_noise_images, image_shape, seed)
        elif name == 'held_out':
            held_out = getattr(self.context.dataset, 'held_out_test', None)
            if held_out is None:
                raise ValueError("the OOD set 'held_out' needs classes held out of training: "
                                 "set config.dataset.held_out_classes as when training")
            images = held_out.images
        elif name.partition(':')[0] in PAPER_SETS and name.partition(':')[2]:
            images = folder_images(name.partition(':')[2], image_shape, 'crop')
        elif name.startswith('image_folder:'):
            images = folder_images(name.removeprefix('image_folder:'), image_shape, resize)
        elif name.startswith('tfds:'):
            images = tfds_images(name.removeprefix('tfds:'), data_dir, image_shape, resize)
        else:
            raise ValueError(f"unknown OOD set {name!r}; expected 'uniform', 'gaussian', "
                             "'held_out', 'lsun_crop:PATH', 'isun:PATH', "
                             "'tiny_imagenet_crop:PATH', 'image_folder:PATH' or "
                             "'tfds:NAME[:SPLIT]'")
        if not len(images):
            raise ValueError(f'the OOD set {name!r} holds no images')
        return data.Split(images=images, labels=np.zeros(len(images), np.int32))

    def _scores(self, variables, batches) -> np.ndarray:
        return common.map_batches(self._score_fn, variables, batches,
                                  self.context.mesh)['score']

    def run(self, variables: dict) -> dict:
        in_scores = self._scores(variables, self.context.test_batches(self.batch_size))
        results = {}
        for name, split in self.ood_sets.items():
            out_scores = self._scores(variables,
                                      self.context.split_batches(split, self.batch_size))
            results[name] = detection_metrics(in_scores, out_scores)
        return results

    def table(self, results: dict) -> str:
        columns = ('detection_accuracy', 'best_threshold_detection_accuracy', 'auroc',
                   'aupr_in', 'aupr_out')
        rows = [(name, *(100 * figures[column] for column in columns),
                 figures['num_out']) for name, figures in results.items()]
        header = ('OOD set (%)', 'Det Acc (t=0.5)', 'Det Acc (best t)', 'AUROC', 'AUPR (ID)',
                  'AUPR (OOD)', 'OOD images')
        num_in = next(iter(results.values()))['num_in']
        return common.format_table(header, rows) + f'\n(ID: {num_in} test images)'

    def write_files(self, results: dict, directory: str, name: str) -> list:
        del results, directory, name
        return []


if __name__ == '__main__':
    from alignmix_jax.evaluation import command

    command.run_command('ood')
