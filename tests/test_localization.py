"""WSOL scores: IoU by hand, boxes of synthetic maps with known regions, CAM, MaxBoxAcc-v2."""

import jax.numpy as jnp
import numpy as np
import pytest

from alignmix_jax.evaluation import cam_localization


def box_map(size, box, value=1.0, base=None):
    """A (size, size) map, `value` inside the pixel-edge box (x0, y0, x1, y1)."""
    cam = np.zeros((size, size)) if base is None else base.copy()
    x0, y0, x1, y1 = box
    cam[y0:y1, x0:x1] = value
    return cam


def test_box_iou_by_hand():
    boxes = np.array([[0, 0, 10, 10]])
    others = np.array([[5, 5, 15, 15],    # 25 / (100 + 100 - 25)
                       [0, 0, 10, 10],    # identical
                       [2, 2, 6, 6],      # inside: 16 / 100
                       [10, 0, 20, 10],   # touching edges: no overlap
                       [3, 3, 3, 8],      # zero area
                       [0, 5, 10, 20]])   # 50 / (100 + 150 - 50)
    np.testing.assert_allclose(cam_localization.box_iou(boxes, others)[0],
                               [25 / 175, 1.0, 0.16, 0.0, 0.0, 0.25])
    assert cam_localization.box_iou(others, boxes).shape == (6, 1)


def test_region_boxes_are_8_connected_and_exact():
    mask = np.zeros((12, 12), bool)
    mask[1:4, 2:7] = True          # 3 x 5 rectangle: box (2, 1, 7, 4), 15 pixels
    mask[6, 6] = mask[7, 7] = True  # diagonal neighbours: one region (8-connectivity)
    mask[10:12, 0:1] = True        # a column touching the border
    boxes, sizes = cam_localization.region_boxes(mask)
    order = np.argsort(boxes[:, 1])
    np.testing.assert_array_equal(boxes[order], [[2, 1, 7, 4], [6, 6, 8, 8], [0, 10, 1, 12]])
    np.testing.assert_array_equal(sizes[order], [15, 2, 2])
    empty_boxes, empty_sizes = cam_localization.region_boxes(np.zeros((5, 5), bool))
    assert empty_boxes.shape == (0, 4) and empty_sizes.shape == (0,)


def test_largest_region_box_ignores_a_smaller_brighter_region():
    cam = box_map(64, (10, 20, 40, 50), 0.5)       # large object, 30 x 30
    cam = box_map(64, (50, 2, 54, 6), 1.0, cam)    # small, brighter spot
    np.testing.assert_array_equal(cam_localization.largest_region_box(cam), [10, 20, 40, 50])
    # Below the threshold everywhere: an empty box, IoU 0 with anything.
    empty = cam_localization.largest_region_box(np.full((8, 8), 0.1))
    assert cam_localization.box_iou(empty, [[0, 0, 8, 8]])[0, 0] == 0.0


def test_best_iou_per_threshold_on_nested_levels():
    # Inner box at 1.0 inside an outer box at 0.5; the ground truth is the outer box.
    outer, inner = (8, 8, 24, 24), (12, 12, 20, 20)
    cam = box_map(32, inner, 1.0, box_map(32, outer, 0.5))
    thresholds = np.array([0.0, 0.3, 0.5, 0.51, 0.9])
    best = cam_localization.best_iou_per_threshold(cam, np.array([outer]), thresholds)
    # 0: the whole image (256 / 1024); up to 0.5: the outer box; above: the inner one (64/256).
    np.testing.assert_allclose(best, [0.25, 1.0, 1.0, 0.25, 0.25])


def test_cam_weights_feature_maps_by_the_class_of_each_image():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(3, 4, 5, 6)).astype(np.float32)
    kernel = rng.normal(size=(6, 7)).astype(np.float32)
    classes = np.array([2, 0, 6])
    maps = np.asarray(cam_localization.class_activation_maps(
        jnp.asarray(features), jnp.asarray(kernel), jnp.asarray(classes)))
    for image, cls in enumerate(classes):
        np.testing.assert_allclose(maps[image], features[image] @ kernel[:, cls], rtol=1e-5,
                                   atol=1e-5)


def test_normalized_map_of_a_known_object_gives_its_box():
    # A 14 x 14 feature map that is on over cells rows 3-7, columns 4-9 in channel 0 only; the
    # class weighs channel 0 positively, so its CAM at 224 x 224 (x16) covers that region.
    features = np.zeros((1, 14, 14, 3), np.float32)
    features[0, 3:8, 4:10, 0] = 1.0
    features[0, :, :, 1] = 5.0  # a constant channel: shifts the map, normalisation removes it
    kernel = np.array([[2.0, -1.0], [0.3, 0.3], [9.0, 9.0]], np.float32)
    maps = cam_localization.class_activation_maps(jnp.asarray(features), jnp.asarray(kernel),
                                              jnp.array([0]))
    cam = np.asarray(cam_localization.normalize_maps(maps, (224, 224)))[0]
    assert cam.shape == (224, 224)
    assert cam.min() == pytest.approx(0.0, abs=1e-6) and cam.max() == pytest.approx(1.0)
    true_box = np.array([4 * 16, 3 * 16, 10 * 16, 8 * 16])
    # Interpolation between the centres of an off and an on cell crosses 0.5 at their common
    # edge (the cubic kernel is symmetric), so the box at 0.5 is the object's, to a pixel.
    box_at_half = cam_localization.largest_region_box(cam, 0.5)
    assert np.all(np.abs(box_at_half - true_box) <= 1), box_at_half
    # At 0.15 the box is wider by less than half a cell (8 pixels) on each side.
    box = cam_localization.largest_region_box(cam)
    assert np.all(box[:2] <= true_box[:2]) and np.all(box[2:] >= true_box[2:])
    assert np.all(np.abs(box - true_box) < 8), box


def test_constant_maps_normalize_to_zeros():
    cam = cam_localization.normalize_maps(jnp.full((2, 7, 7), 3.0), (28, 28))
    np.testing.assert_array_equal(np.asarray(cam), np.zeros((2, 28, 28)))


def test_scores_on_a_hand_built_set():
    size = 40
    gt = np.array([10, 10, 20, 20])  # 100 pixels; the whole image's box has IoU 100/1600
    cams = [
        box_map(size, gt),                     # IoU 1
        box_map(size, (10, 10, 20, 16)),       # 60 / 100 = 0.6
        box_map(size, (10, 10, 20, 14)),       # 0.4
        box_map(size, (10, 10, 11, 20)),       # 0.1
    ]
    correct = [True, False, True, True]
    scores = cam_localization.LocalizationScores()
    for cam, is_correct in zip(cams, correct, strict=True):
        scores.add(cam, gt, is_correct)
    result = scores.result()
    assert result['num_images'] == 4
    assert result['top1_classification'] == 0.75
    assert result['gt_known_localization'] == 0.5     # images 0 and 1
    assert result['top1_localization'] == 0.25        # image 1's class is wrong
    assert result['max_box_acc_iou0.3'] == 0.75
    assert result['max_box_acc_iou0.5'] == 0.5
    assert result['max_box_acc_iou0.7'] == 0.25
    assert result['max_box_acc_v2'] == pytest.approx(0.5)
    # Any threshold in (0, 1) gives these boxes; 0 gives the whole image: the first one wins.
    assert result['best_threshold_iou0.5'] == 0.01


def test_maxboxacc_searches_thresholds_and_all_regions():
    """The object is the fainter, smaller of two regions: top-1's largest box misses it, but
    MaxBoxAcc finds it among all regions, and only at thresholds that do not drop it."""
    object_box = np.array([30, 30, 38, 38])
    cam = box_map(48, (0, 0, 20, 20), 1.0)          # large distractor
    cam = box_map(48, object_box, 0.4, cam)          # the object, fainter
    scores = cam_localization.LocalizationScores()
    scores.add(cam, object_box, True)
    result = scores.result()
    assert result['top1_localization'] == 0.0
    assert result['max_box_acc_v2'] == 1.0
    best = cam_localization.best_iou_per_threshold(cam, object_box[None])
    thresholds = cam_localization.CAM_THRESHOLDS
    np.testing.assert_array_equal(best[(thresholds > 0) & (thresholds <= 0.4)], 1.0)
    assert np.all(best[thresholds > 0.4] < 0.01)  # only the distractor is left


def test_no_images_is_an_error():
    with pytest.raises(ValueError, match='no image'):
        cam_localization.LocalizationScores().result()
