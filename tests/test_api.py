"""alignmix_jax.method.api: the mixed batch and soft targets, against the equations written out
here."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignmix_jax.method import alignment, api

LABELS = jnp.array([0, 1, 2, 1, 3])


def features(shape=(5, 2, 2, 3)):
    return jax.nn.relu(jax.random.normal(jax.random.PRNGKey(2), shape))


def one_hot(labels, num_classes=4, smoothing=0.0):
    # timm's targets, written out: s/k everywhere, 1 - s + s/k on the class.
    targets = np.full((len(labels), num_classes), smoothing / num_classes)
    targets[np.arange(len(labels)), np.asarray(labels)] = 1 - smoothing + smoothing / num_classes
    return targets


@pytest.mark.parametrize('lambda_per', ['batch', 'example'])
def test_mix_inputs_is_eq_3_with_eq_1_targets(lambda_per):
    images = jax.random.uniform(jax.random.PRNGKey(0), (5, 4, 4, 3))
    batch = api.mix_inputs(jax.random.PRNGKey(1), images, LABELS, 4, alpha=1.0,
                           label_smoothing=0.2, lambda_per=lambda_per)
    assert batch.plan is None
    assert batch.lam.shape == ((5,) if lambda_per == 'example' else ())
    lam = np.broadcast_to(np.asarray(batch.lam), (5,))
    partner = np.asarray(batch.permutation)
    assert sorted(partner.tolist()) == list(range(5))
    expected = (lam[:, None, None, None] * np.asarray(images)
                + (1 - lam[:, None, None, None]) * np.asarray(images)[partner])
    np.testing.assert_allclose(batch.mixed, expected, rtol=1e-6)
    smoothed = one_hot(LABELS, smoothing=0.2)
    np.testing.assert_allclose(batch.targets, lam[:, None] * smoothed
                               + (1 - lam[:, None]) * smoothed[partner], rtol=1e-6)


@pytest.mark.parametrize('prime', [False, True])
def test_mix_aligned_features_is_eq_12_or_13(prime):
    tensors = features()
    batch = api.mix_aligned_features(jax.random.PRNGKey(3), tensors, LABELS, 4, 2.0,
                                     prime=prime, lambda_per='example')
    lam, partner = np.asarray(batch.lam), np.asarray(batch.permutation)
    hard = one_hot(LABELS)
    for i in range(5):
        anchor, other = tensors[i], tensors[partner[i]]
        anchor_label, other_label = hard[i], hard[partner[i]]
        if prime:  # Eq. (13): A' mixed with A' aligned to A, and y' weighted by lambda
            anchor, other = other, anchor
            anchor_label, other_label = other_label, anchor_label
        aligned = alignment.align(anchor, other)  # Eq. (10)
        np.testing.assert_allclose(batch.plan[i], alignment.transport_plan(anchor, other),
                                   rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(batch.mixed[i], lam[i] * anchor + (1 - lam[i]) * aligned,
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(batch.targets[i],
                                   lam[i] * anchor_label + (1 - lam[i]) * other_label, rtol=1e-6)
    assert batch.plan.shape == (5, 4, 4)


def test_unaligned_feature_mixing_and_jit():
    tensors = features()
    mix = jax.jit(api.mix_aligned_features, static_argnums=3,
                  static_argnames=('prime', 'align', 'num_iters', 'lambda_per'))
    batch = mix(jax.random.PRNGKey(4), tensors, LABELS, 4, 2.0, align=False)
    lam, partner = float(batch.lam), np.asarray(batch.permutation)
    assert batch.plan is None
    np.testing.assert_allclose(batch.mixed, lam * tensors + (1 - lam) * tensors[partner],
                               rtol=1e-6)


def test_gradients_reach_the_features_through_the_mixed_batch():
    def loss(tensors):
        batch = api.mix_aligned_features(jax.random.PRNGKey(5), tensors, LABELS, 4, 2.0)
        return jnp.sum(batch.mixed ** 2)

    gradient = jax.grad(loss)(features())
    assert np.all(np.isfinite(gradient)) and float(jnp.abs(gradient).sum()) > 0
