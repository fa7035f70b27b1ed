"""Weakly-supervised object localisation (WSOL): class activation maps, boxes, and their scores.

Class activation maps (CAM; Zhou et al., 2016, "Learning Deep Features for Discriminative
Localization", Sec. 2): for a network ending in global average pooling and a linear
classifier, the map of class c is M_c(x, y) = sum_k w_k^c f_k(x, y), the last feature maps f_k
weighted by the classifier's weights of c. As in the evaluation code of Choe et al. (2020),
"Evaluating Weakly Supervised Object Localization Methods Right" (wsolevaluation), the map is
taken as it is, without the classifier's bias (a constant, which the normalisation removes)
and without a ReLU (Choe et al. keep the negative part: clipping it would move the minimum the
normalisation starts from), resized to the image with bicubic interpolation, and min-max
normalised to [0, 1] (a constant map becomes all zeros).

Which class: the ground-truth class, as Choe et al. compute it (MaxBoxAcc measures
localisation alone). Top-1 localisation (Yun et al., 2019, CutMix, after Zhou et al.) uses the
map of the predicted class and counts an image only if that class is right, so for the images
it counts the two maps are the same map: the ground-truth map serves both scores.

Boxes (all coordinates are pixel-edge coordinates (x0, y0, x1, y1) in the resized image: a box
covering pixel columns a..b has x0 = a, x1 = b + 1; IoU is area(intersection) / area(union)):
- top-1 localisation: the map thresholded at 0.15 of its maximum (maps are normalised, so at
  0.15), the box around the largest 8-connected region (the paper, Sec. 4.4, after Yun et al.,
  2019); an image counts if the predicted class is right and IoU >= 0.5 with a ground-truth
  box. GT-known localisation drops the class condition.
- MaxBoxAcc-v2 (Choe et al., 2020, and the journal version's v2): for each threshold tau in
  {0, 0.01, ..., 0.99}, a box around every connected region of {M >= tau} ("all contours"),
  the best IoU of any of them with any ground-truth box; BoxAcc(tau, delta) is the fraction of
  images whose best IoU is >= delta; MaxBoxAcc(delta) = max over tau; MaxBoxAcc-v2 is the mean
  of MaxBoxAcc(delta) over delta in {0.3, 0.5, 0.7}.

Differences from wsolevaluation, which uses OpenCV (not a dependency here): regions are
8-connected components (scipy.ndimage) where OpenCV traces contours (RETR_TREE also returns the
contours of holes, whose boxes lie inside their region's box), "largest" counts pixels where
OpenCV's contourArea measures the polygon, boxes are exact pixel-edge boxes where
wsolevaluation adds 1 to widths of boxes whose right edge is already exclusive, and bicubic
resizing is JAX's (Keys, a = -0.5) where OpenCV's INTER_CUBIC uses a = -0.75. Each changes the
IoU of a box by a pixel's width at most; the scores move by a fraction of a percent.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

# Threshold of the top-1 localisation box (the paper, Sec. 4.4; Yun et al., 2019).
TOP1_CAM_THRESHOLD = 0.15
# IoU needed for a box to count as a localisation in top-1 localisation.
TOP1_IOU = 0.5
# MaxBoxAcc-v2 (Choe et al., 2020): IoU levels, and the thresholds searched (their default
# cam_curve_interval of 0.01).
MAXBOXACC_IOU_LEVELS = (0.3, 0.5, 0.7)
CAM_THRESHOLDS = np.round(np.arange(0.0, 1.0, 0.01), 2)
# Relative range below which a resized map is taken as constant (see normalize_maps).
_CONSTANT_MAP_TOLERANCE = 1e-5
# 8-connectivity, as the outer contours OpenCV traces.
_CONNECTIVITY = np.ones((3, 3), bool)


def class_activation_maps(features: jax.Array, classifier_kernel: jax.Array,
                          classes: jax.Array) -> jax.Array:
    """CAM (Zhou et al., 2016): M_c = sum_k w_k^c f_k for the class c of each image.

    `features` (b, h, w, k) are the last feature maps, `classifier_kernel` (k, num_classes) the
    weights of the linear classifier after global average pooling, `classes` (b,) int. Returns
    float32 (b, h, w).
    """
    weights = jnp.take(classifier_kernel.astype(jnp.float32), classes, axis=1).T  # (b, k)
    return jnp.einsum('bhwk,bk->bhw', features.astype(jnp.float32), weights)


def normalize_maps(maps: jax.Array, image_size: tuple[int, int]) -> jax.Array:
    """Maps (b, h, w) resized (bicubic) to `image_size` (height, width) and min-max normalised
    per map to [0, 1]; a constant map becomes zeros (as wsolevaluation's normalize_scoremap)."""
    maps = maps.astype(jnp.float32)
    resized = jax.image.resize(maps, (maps.shape[0], *image_size), method='cubic')
    low = jnp.min(resized, axis=(1, 2), keepdims=True)
    high = jnp.max(resized, axis=(1, 2), keepdims=True)
    span = high - low
    # Resizing a constant map leaves float32 rounding noise (~1e-7 relative) that min-max would
    # blow up to [0, 1]: a map whose range is within that noise counts as constant.
    varies = span > _CONSTANT_MAP_TOLERANCE * jnp.maximum(jnp.abs(low), jnp.abs(high))
    return jnp.where(varies, (resized - low) / jnp.where(varies, span, 1.0), 0.0)


def box_iou(boxes: np.ndarray, others: np.ndarray) -> np.ndarray:
    """IoU of every box of `boxes` (n, 4) with every box of `others` (m, 4): (n, m).

    Pixel-edge coordinates (x0, y0, x1, y1); a box of zero area has IoU 0 with everything.
    """
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    others = np.asarray(others, np.float64).reshape(-1, 4)
    left = np.maximum(boxes[:, None, 0], others[None, :, 0])
    top = np.maximum(boxes[:, None, 1], others[None, :, 1])
    right = np.minimum(boxes[:, None, 2], others[None, :, 2])
    bottom = np.minimum(boxes[:, None, 3], others[None, :, 3])
    intersection = np.clip(right - left, 0, None) * np.clip(bottom - top, 0, None)

    def area(b):
        return np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)

    union = area(boxes)[:, None] + area(others)[None, :] - intersection
    return np.where(union > 0, intersection / np.where(union > 0, union, 1.0), 0.0)


def _labelled_boxes(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    labels, count = ndimage.label(mask, structure=_CONNECTIVITY)
    if count == 0:
        return np.zeros((0, 4)), labels, 0
    slices = ndimage.find_objects(labels)
    boxes = np.array([(cols.start, rows.start, cols.stop, rows.stop) for rows, cols in slices],
                     np.float64)
    return boxes, labels, count


def region_boxes(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (n, 4) around the 8-connected regions of a boolean (h, w) mask, and their sizes in
    pixels (n,). No region: empty arrays."""
    boxes, labels, count = _labelled_boxes(mask)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    return boxes, sizes


def largest_region_box(cam: np.ndarray, threshold: float = TOP1_CAM_THRESHOLD) -> np.ndarray:
    """The box (4,) around the largest 8-connected region of {cam >= threshold}; an empty
    (zero-area) box if no pixel reaches it. Ties go to the region found first (raster order)."""
    boxes, sizes = region_boxes(np.asarray(cam) >= threshold)
    if not len(sizes):
        return np.zeros(4)
    return boxes[int(np.argmax(sizes))]


def best_iou_per_threshold(cam: np.ndarray, gt_boxes: np.ndarray,
                           thresholds: np.ndarray = CAM_THRESHOLDS) -> np.ndarray:
    """For each threshold, the best IoU of the box of any region of {cam >= threshold} ("all
    contours") with any ground-truth box: (len(thresholds),), 0 where no pixel reaches it."""
    cam = np.asarray(cam)
    best = np.zeros(len(thresholds))
    for index, threshold in enumerate(thresholds):
        # ~1 ms per threshold at 224 x 224 (labelling): ~0.1 s per image for 100 thresholds.
        boxes, _, _ = _labelled_boxes(cam >= threshold)
        if len(boxes):
            best[index] = box_iou(boxes, gt_boxes).max()
    return best


@dataclasses.dataclass
class LocalizationScores:
    """Accumulates per-image results; `result()` gives the scores (fractions in [0, 1]).

    `add(cam, gt_boxes, correct)` takes one image's normalised map (h, w), its ground-truth
    boxes (m, 4) in the map's pixel-edge coordinates and whether its class was predicted right.
    """

    thresholds: np.ndarray = dataclasses.field(default_factory=lambda: CAM_THRESHOLDS.copy())
    iou_levels: tuple[float, ...] = MAXBOXACC_IOU_LEVELS
    top1_threshold: float = TOP1_CAM_THRESHOLD  # of the box of top-1 localisation
    _best_ious: list = dataclasses.field(default_factory=list)
    _top1_box_ious: list = dataclasses.field(default_factory=list)
    _correct: list = dataclasses.field(default_factory=list)

    def add(self, cam: np.ndarray, gt_boxes: np.ndarray, correct: bool) -> None:
        gt_boxes = np.asarray(gt_boxes, np.float64).reshape(-1, 4)
        self._best_ious.append(best_iou_per_threshold(cam, gt_boxes, self.thresholds))
        top1_box = largest_region_box(cam, self.top1_threshold)
        self._top1_box_ious.append(box_iou(top1_box, gt_boxes).max())
        self._correct.append(bool(correct))

    @property
    def count(self) -> int:
        return len(self._correct)

    def result(self) -> dict:
        if not self.count:
            raise ValueError('no image was added')
        best_ious = np.stack(self._best_ious)  # (n, thresholds)
        top1_box_ious = np.asarray(self._top1_box_ious)
        correct = np.asarray(self._correct)
        localized = top1_box_ious >= TOP1_IOU
        box_accuracy = {level: np.mean(best_ious >= level, axis=0) for level in self.iou_levels}
        max_box_accuracy = {level: float(np.max(curve)) for level, curve in box_accuracy.items()}
        best_threshold = {level: float(self.thresholds[int(np.argmax(curve))])
                          for level, curve in box_accuracy.items()}
        return {
            'num_images': self.count,
            'top1_classification': float(np.mean(correct)),
            'top1_localization': float(np.mean(correct & localized)),
            'gt_known_localization': float(np.mean(localized)),
            'max_box_acc_v2': float(np.mean(list(max_box_accuracy.values()))),
            **{f'max_box_acc_iou{level:g}': value for level, value in max_box_accuracy.items()},
            **{f'best_threshold_iou{level:g}': value for level, value in best_threshold.items()},
        }
