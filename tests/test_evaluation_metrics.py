"""The evaluation metrics and attacks on fixed inputs, against values worked out by hand."""

import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from PIL import Image
from sklearn import metrics as sk_metrics

from alignmix_jax import data, evaluation
from alignmix_jax.evaluation import calibration, classification, common, ood, robustness
from alignmix_jax.runtime import sharding
from configs import default


def test_top_k_error_by_hand():
    logits = np.array([[0.1, 0.5, 0.2, 0.9, 0.3, 0.0],   # label 3 is the top-1
                       [0.6, 0.1, 0.2, 0.3, 0.4, 0.5],   # label 5 is second: top-5 only
                       [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]])  # label 5 is last: neither
    labels = np.array([3, 5, 5])
    assert classification.top_k_error(logits, labels, 1) == pytest.approx(2 / 3)
    assert classification.top_k_error(logits, labels, 5) == pytest.approx(1 / 3)
    # Fewer classes than k: every label is among the top k.
    assert classification.top_k_error(logits[:, :3], np.array([0, 1, 2]), 5) == 0.0


def test_ece_and_oe_on_a_constructed_case():
    # Bin (14/15, 1]: 4 predictions at confidence 0.95, 3 right: overconfident by 0.2.
    # Bin (8/15, 9/15]: 6 at 0.55, 5 right: underconfident by 5/6 - 0.55 (no OE).
    confidences = np.array([0.95] * 4 + [0.55] * 6)
    correct = np.array([1, 1, 1, 0] + [1, 1, 1, 1, 1, 0], bool)
    assert calibration.expected_calibration_error(confidences, correct, 15) == pytest.approx(
        0.4 * 0.2 + 0.6 * (5 / 6 - 0.55))  # 0.25
    assert calibration.overconfidence_error(confidences, correct, 15) == pytest.approx(
        0.4 * 0.95 * 0.2)  # 0.076
    counts, mean_confidence, accuracy = calibration.confidence_bins(confidences, correct, 15)
    assert counts[14] == 4 and counts[8] == 6 and counts.sum() == 10
    assert accuracy[14] == pytest.approx(0.75) and mean_confidence[8] == pytest.approx(0.55)
    assert np.isnan(accuracy[0])


def test_ece_is_zero_when_calibrated_and_bins_are_right_closed():
    # Half right at confidence 0.5 (bin (7/15, 8/15]) and all right at 1.0 (the last bin).
    confidences = np.array([0.5, 0.5, 1.0, 1.0])
    correct = np.array([1, 0, 1, 1], bool)
    assert calibration.expected_calibration_error(confidences, correct) == pytest.approx(0.0)
    assert calibration.overconfidence_error(confidences, correct) == pytest.approx(0.0)
    # A confidence on an edge belongs to the bin it closes: 0.2 = 3/15 is in bin 3 of 1..15.
    counts, _, _ = calibration.confidence_bins(np.array([0.2, 0.2 + 1e-9]), np.ones(2), 15)
    assert counts[2] == 1 and counts[3] == 1


def test_detection_metrics_by_hand():
    in_scores, out_scores = np.array([0.9, 0.8, 0.4]), np.array([0.5, 0.3])
    figures = ood.detection_metrics(in_scores, out_scores)
    # Threshold 0.5: 0.9, 0.8 of 3 ID scores >= it (0.4 is not); of the OOD scores 0.3 is
    # below it and 0.5 is not (>= counts as ID): (2/3 + 1/2) / 2 = 7/12.
    assert figures['detection_accuracy'] == pytest.approx(7 / 12)
    assert figures['detection_threshold'] == 0.5
    # Best threshold 0.8: 2 of 3 ID scores >= it, both OOD scores below: (2/3 + 1) / 2.
    assert figures['best_threshold_detection_accuracy'] == pytest.approx(5 / 6)
    # ID above OOD in 5 of the 6 pairs (0.4 < 0.5).
    assert figures['auroc'] == pytest.approx(5 / 6)
    # Ranked 0.9 in, 0.8 in, 0.5 out, 0.4 in, 0.3 out: precisions 1, 1, 3/4 at the ID hits.
    assert figures['aupr_in'] == pytest.approx((1 + 1 + 3 / 4) / 3)
    # Ranked by -score: 0.3 out, 0.4 in, 0.5 out: precisions 1 and 2/3 at the OOD hits.
    assert figures['aupr_out'] == pytest.approx((1 + 2 / 3) / 2)
    assert (figures['num_in'], figures['num_out']) == (3, 2)


def test_detection_metrics_on_random_scores_against_scikit_learn_and_pair_counts():
    rng = np.random.default_rng(0)
    in_scores = rng.beta(5, 2, 300)
    out_scores = rng.beta(2, 3, 200)
    figures = ood.detection_metrics(in_scores, out_scores)
    # AUROC: the probability that an ID score beats an OOD one (Mann-Whitney).
    assert figures['auroc'] == pytest.approx(np.mean(in_scores[:, None] > out_scores[None, :]))
    is_out = np.r_[np.zeros(300), np.ones(200)]
    scores = np.r_[in_scores, out_scores]
    assert figures['auroc'] == pytest.approx(sk_metrics.roc_auc_score(is_out, -scores))
    assert figures['aupr_in'] == pytest.approx(
        sk_metrics.average_precision_score(1 - is_out, scores))
    assert figures['aupr_out'] == pytest.approx(
        sk_metrics.average_precision_score(is_out, -scores))
    # Detection accuracy: the best of all thresholds, tried one by one.
    brute_force = max(0.5 * (np.mean(in_scores >= t) + np.mean(out_scores < t))
                      for t in np.r_[scores, np.inf])
    assert figures['best_threshold_detection_accuracy'] == pytest.approx(brute_force)
    assert figures['best_threshold_detection_accuracy'] > 0.5
    assert figures['detection_accuracy'] == pytest.approx(
        0.5 * (np.mean(in_scores >= 0.5) + np.mean(out_scores < 0.5)))


def test_detection_accuracy_at_threshold_on_fixed_scores():
    in_scores = np.array([0.95, 0.7, 0.5, 0.45, 0.2])
    out_scores = np.array([0.6, 0.49, 0.3, 0.1])
    # ID >= 0.5: 0.95, 0.7, 0.5 (3/5); OOD < 0.5: 0.49, 0.3, 0.1 (3/4): (0.6 + 0.75) / 2.
    assert ood.detection_accuracy(in_scores, out_scores) == pytest.approx(0.675)
    # At 0.65: ID 2/5, OOD 4/4: 0.7, the best of all thresholds (t = 0.45: ID 4/5, OOD 2/4,
    # 0.65; t = 0.2: ID 5/5, OOD 1/4, 0.625).
    assert ood.detection_accuracy(in_scores, out_scores, threshold=0.65) == pytest.approx(0.7)
    assert ood.best_threshold_detection_accuracy(in_scores, out_scores) == pytest.approx(0.7)


def _linear_model(num_classes=10, image_shape=(4, 4, 3), seed=0):
    rng = np.random.default_rng(seed)
    weights = rng.normal(size=(int(np.prod(image_shape)), num_classes)).astype(np.float32)
    bias = rng.normal(size=num_classes).astype(np.float32)

    def logits_fn(images):
        return images.reshape(images.shape[0], -1) @ weights + bias

    return logits_fn, weights, bias


def test_fgsm_moves_each_pixel_by_epsilon_along_the_gradient_sign():
    logits_fn, weights, bias = _linear_model()
    rng = np.random.default_rng(1)
    images = rng.uniform(0.1, 0.9, (8, 4, 4, 3)).astype(np.float32)  # no clipping at 8/255
    labels = rng.integers(0, 10, 8).astype(np.int32)
    epsilon = 8 / 255
    attacked = robustness.fgsm(robustness.cross_entropy_loss(logits_fn, labels),
                               jnp.asarray(images), epsilon=epsilon)
    # d CE / dx = W (softmax(z) - onehot(y)), in float64.
    logits = images.reshape(8, -1).astype(np.float64) @ weights + bias
    probabilities = np.exp(logits - logits.max(-1, keepdims=True))
    probabilities /= probabilities.sum(-1, keepdims=True)
    gradient = (probabilities - np.eye(10)[labels]) @ weights.T
    np.testing.assert_allclose(np.asarray(attacked) - images,
                               epsilon * np.sign(gradient).reshape(images.shape), atol=1e-6)
    # Pixels at the edges of [0, 1] stay inside it.
    edge_images = jnp.asarray(rng.integers(0, 2, (8, 4, 4, 3)), jnp.float32)
    attacked = robustness.fgsm(robustness.cross_entropy_loss(logits_fn, labels), edge_images,
                               epsilon=epsilon)
    assert float(attacked.min()) >= 0.0 and float(attacked.max()) <= 1.0


def test_pgd_stays_in_the_ball_and_the_unit_cube_and_beats_fgsm():
    logits_fn, _, _ = _linear_model()
    rng = np.random.default_rng(2)
    # uint8-like pixels, many at 0 or 1, where the ball meets the edge of [0, 1].
    images = jnp.asarray(np.round(rng.uniform(-0.3, 1.3, (64, 4, 4, 3)).clip(0, 1) * 255)
                         / 255, jnp.float32)
    labels = jnp.asarray(rng.integers(0, 10, 64), jnp.int32)
    loss_fn = robustness.cross_entropy_loss(logits_fn, labels)
    epsilon = 8 / 255
    attacked = robustness.pgd(loss_fn, images, jax.random.PRNGKey(0), epsilon=epsilon,
                              step_size=2 / 255, num_steps=20)
    assert float(jnp.max(jnp.abs(attacked - images))) <= epsilon + 1e-6
    assert float(attacked.min()) >= 0.0 and float(attacked.max()) <= 1.0
    assert not np.allclose(attacked, images)

    def per_example_loss(attacked_images):
        return np.asarray(optax.softmax_cross_entropy_with_integer_labels(
            logits_fn(attacked_images), labels))

    clean_loss = per_example_loss(images)
    fgsm_loss = per_example_loss(robustness.fgsm(loss_fn, images, epsilon=epsilon))
    pgd_loss = per_example_loss(attacked)
    assert np.all(fgsm_loss > clean_loss)
    # PGD's loss is at least FGSM's in the same ball, example by example.
    assert np.all(pgd_loss >= fgsm_loss - 1e-5), np.min(pgd_loss - fgsm_loss)
    # The random start: another key, another (equally valid) result.
    other = robustness.pgd(loss_fn, images, jax.random.PRNGKey(1), epsilon=epsilon,
                           step_size=2 / 255, num_steps=1)
    first = robustness.pgd(loss_fn, images, jax.random.PRNGKey(0), epsilon=epsilon,
                           step_size=2 / 255, num_steps=1)
    assert not np.allclose(other, first)


def _context():
    config = default.get_config()
    return common.EvalContext(config=config, model=None, dataset=None,
                              mesh=sharding.make_mesh())


def test_normalize_agrees_for_uint8_and_unit_float_pixels():
    context = _context()
    pixels = jnp.asarray(np.random.default_rng(3).integers(0, 256, (2, 5, 5, 3)), jnp.uint8)
    np.testing.assert_allclose(context.normalize(pixels),
                               context.normalize(pixels.astype(jnp.float32) / 255), atol=2e-6)


def test_map_batches_drops_padding_and_keeps_order():
    context = _context()
    images = np.arange(7, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
    split = data.Split(images=images, labels=np.arange(7, dtype=np.int32) + 10)

    @jax.jit
    def first_pixel(variables, batch_index, batch_images, labels):
        del variables
        return {'pixel': batch_images[:, 0, 0, 0], 'batch': jnp.full(labels.shape, batch_index)}

    outputs = common.map_batches(first_pixel, {}, context.split_batches(split, 4), context.mesh)
    np.testing.assert_array_equal(outputs['pixel'], np.arange(7))
    np.testing.assert_array_equal(outputs['labels'], np.arange(7) + 10)
    np.testing.assert_array_equal(outputs['batch'], [0, 0, 0, 0, 1, 1, 1])


def test_subset_is_fixed_sorted_and_checked():
    split = data.Split(images=np.zeros((50, 2, 2, 3), np.uint8),
                                 labels=np.arange(50, dtype=np.int32))
    chosen = common.subset(split, 10).labels
    assert len(set(chosen)) == 10 and np.all(np.diff(chosen) > 0)
    np.testing.assert_array_equal(chosen, common.subset(split, 10).labels)
    with pytest.raises(ValueError, match='num_examples'):
        common.subset(split, 51)


def test_noise_images_have_the_paper_distributions():
    uniform = ood.noise_images('uniform', 200, (8, 8, 3), seed=0) / 255
    gaussian = ood.noise_images('gaussian', 200, (8, 8, 3), seed=0) / 255
    assert uniform.shape == (200, 8, 8, 3)
    assert abs(uniform.mean() - 0.5) < 0.01 and abs(uniform.var() - 1 / 12) < 0.005
    # N(0.5, 0.5) clipped to [0, 1]: P(0) = P(1) = P(z > 1) = 0.1587.
    assert abs(np.mean(gaussian == 0) - 0.1587) < 0.01
    assert abs(np.mean(gaussian == 1) - 0.1587) < 0.01
    np.testing.assert_array_equal(ood.noise_images('uniform', 200, (8, 8, 3), seed=0) / 255,
                                  uniform)


@pytest.mark.slow  # compiles or trains for many seconds (see docs/testing.md)
def test_folder_images_are_centre_cropped_or_resized(tmp_path):
    gradient = np.arange(40 * 50 * 3, dtype=np.int64).reshape(40, 50, 3) % 251
    (tmp_path / 'sub').mkdir()
    Image.fromarray(gradient.astype(np.uint8)).save(tmp_path / 'sub' / 'large.png')
    Image.fromarray(np.full((16, 20, 3), 77, np.uint8)).save(tmp_path / 'small.png')
    cropped = ood.folder_images(str(tmp_path), (32, 32, 3), 'crop')
    assert cropped.shape == (2, 32, 32, 3) and cropped.dtype == np.uint8
    # Sorted by path: small.png, then sub/large.png, whose central 32x32 window is [4:36, 9:41].
    np.testing.assert_array_equal(cropped[1], gradient[4:36, 9:41])
    assert np.all(cropped[0] == 77)  # enlarged to 32x40, then cropped
    resized = ood.folder_images(str(tmp_path), (8, 8, 3), 'resize')
    assert resized.shape == (2, 8, 8, 3)
    with pytest.raises(data.DatasetNotFoundError, match='holds no images'):
        ood.folder_images(str(tmp_path / 'sub' / 'nothing'), (8, 8, 3), 'crop')


def _four_class_dataset():
    labels = np.array([0, 1, 2, 3] * 3, np.int32)
    images = np.broadcast_to(labels[:, None, None, None], (12, 2, 2, 3)).astype(np.uint8)
    split = data.Split(images=images, labels=labels)
    return data.Dataset(train=split, test=split, num_classes=4,
                                  class_names=('a', 'b', 'c', 'd'))


def test_hold_out_classes_relabels_contiguously():
    dataset = data.hold_out_classes(_four_class_dataset(), ('b', 3))
    assert dataset.class_names == ('a', 'c') and dataset.num_classes == 2
    np.testing.assert_array_equal(dataset.train.labels, [0, 1] * 3)
    # The images of class 'c' (pixel value 2) now carry label 1.
    np.testing.assert_array_equal(dataset.test.images[dataset.test.labels == 1], 2)
    np.testing.assert_array_equal(dataset.held_out_test.labels, [1, 3] * 3)
    with pytest.raises(data.DatasetError, match="no class 'e'"):
        data.hold_out_classes(_four_class_dataset(), ('e',))


def test_unknown_kind_and_options_are_one_line_errors():
    with pytest.raises(ValueError, match="unknown evaluation kind 'foo'"):
        evaluation.evaluator_class('foo')
    assert evaluation.evaluator_class('ood') is ood.Evaluator
    evals = ml_collections.ConfigDict({'ood': {'datasets': ('nonsense',)}})
    context = common.EvalContext(config=default.get_config(), model=None,
                                 dataset=_four_class_dataset(), mesh=sharding.make_mesh())
    with pytest.raises(ValueError, match="unknown OOD set 'nonsense'"):
        evaluation.make_evaluator('ood', context, evals)


def test_format_table():
    table = common.format_table(('name', 'value'), [('a', 1.23456), ('bbb', 7)])
    assert table.splitlines() == ['name  value', '----  -----', 'a     1.23', 'bbb   7']


@pytest.mark.parametrize('source', ['lsun_crop', 'isun', 'tiny_imagenet_crop'])
def test_paper_ood_sets_are_centre_cropped_folders(tmp_path, source):
    rng = np.random.default_rng(0)
    pictures = rng.integers(0, 256, (3, 36, 36, 3), dtype=np.uint8)  # ODIN's 36x36 images
    (tmp_path / 'test').mkdir()
    for index, picture in enumerate(pictures):
        Image.fromarray(picture).save(tmp_path / 'test' / f'{index}.png')
    context = types.SimpleNamespace(image_shape=(32, 32, 3), batch_size=10, dataset=None)
    # resize='resize' is ignored: the crop is these sets' protocol.
    evaluator = ood.Evaluator(context, datasets=(f'{source}:{tmp_path}',), resize='resize')
    images = evaluator.ood_sets[f'{source}:{tmp_path}'].images
    np.testing.assert_array_equal(images, pictures[:, 2:34, 2:34])


def test_pgd_without_random_start_starts_at_the_image_and_one_step_is_fgsm_sized():
    images = jnp.asarray(np.random.default_rng(0).uniform(0.1, 0.9, (2, 4, 4, 3)), jnp.float32)
    weights = jnp.asarray(np.random.default_rng(1).normal(size=(48, 3)), jnp.float32)
    labels = jnp.array([0, 2])
    loss_fn = robustness.cross_entropy_loss(lambda x: x.reshape(2, -1) @ weights, labels)
    unmoved = robustness.pgd(loss_fn, images, jax.random.PRNGKey(0), epsilon=4 / 255,
                             step_size=2 / 255, num_steps=0, random_start=False)
    np.testing.assert_array_equal(unmoved, images)
    # One step from x of 4/255 in a 4/255 ball is FGSM at 4/255 (pixels far from 0 and 1).
    one_step = robustness.pgd(loss_fn, images, jax.random.PRNGKey(0), epsilon=4 / 255,
                              step_size=4 / 255, num_steps=1, random_start=False)
    np.testing.assert_allclose(one_step, robustness.fgsm(loss_fn, images, epsilon=4 / 255),
                               atol=1e-7)
