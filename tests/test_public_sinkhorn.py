"""The public AlignMixup Sinkhorn loop: alignment.public_transport_plan and the PyTorch
transcription in torch_reference, each against a NumPy transcription of the loop written here
(float64, the public code's arithmetic, its stopping rule)."""

import numpy as np
import pytest

from alignmix_jax.method import alignment


def numpy_public_sinkhorn(a, b, *, epsilon=0.1, max_iters=100, threshold=0.1):
    """(plan (n, r, r), iterations) for feature batches a, b (n, h, w, c), in float64."""
    a = a.reshape(a.shape[0], -1, a.shape[-1]).astype(np.float64)
    b = b.reshape(b.shape[0], -1, b.shape[-1]).astype(np.float64)
    cost = np.sum(np.abs(a[:, :, None, :] - b[:, None, :, :]) ** 2, axis=-1)
    log_marginal = np.log(1.0 / cost.shape[-1] + 1e-8)

    def logsumexp(x, axis):
        top = np.max(x, axis=axis, keepdims=True)
        return np.squeeze(top + np.log(np.sum(np.exp(x - top), axis=axis, keepdims=True)), axis)

    def exponent(u, v):
        return (-cost + u[:, :, None] + v[:, None, :]) / epsilon

    u = np.zeros(cost.shape[:-1])
    v = np.zeros(cost.shape[:-1])
    iterations = 0
    for _ in range(max_iters):
        previous_u = u
        u = epsilon * (log_marginal - logsumexp(exponent(u, v), -1)) + u
        v = epsilon * (log_marginal - logsumexp(exponent(u, v), -2)) + v
        iterations += 1
        if np.mean(np.sum(np.abs(u - previous_u), axis=-1)) < threshold:
            break
    return np.exp(exponent(u, v)), iterations


def features_at_cost_scale(seed, scale, batch=8, channels=16):
    """Two (batch, 4, 4, channels) float32 batches whose mean squared distance is ~scale."""
    rng = np.random.default_rng(seed)
    spread = np.sqrt(scale / (2 * channels))
    return tuple((spread * rng.standard_normal((batch, 4, 4, channels))).astype(np.float32)
                 for _ in range(2))


# (cost scale, expected iterations, plan tolerance). The counts are the NumPy reference's,
# asserted so that a change of stopping rule shows; at ~30 the loop stops part-way. The
# tolerances are float32's: the potentials grow with the cost and eps = 0.1 divides them.
CASES = [(1.0, 4, 1e-7), (30.0, 70, 1e-5), (100.0, 100, 2e-5), (1000.0, 100, 1e-4)]


@pytest.mark.parametrize('scale,expected_iterations,tolerance', CASES)
def test_public_transport_plan_matches_numpy_loop(scale, expected_iterations, tolerance):
    a, b = features_at_cost_scale(0, scale)
    reference_plan, reference_iterations = numpy_public_sinkhorn(a, b)
    plan, iterations = alignment.public_transport_plan(a, b)
    assert reference_iterations == expected_iterations
    assert int(iterations) == reference_iterations
    assert plan.shape == (8, 16, 16)
    np.testing.assert_allclose(np.asarray(plan), reference_plan, rtol=0, atol=tolerance)
    # v is updated last, so the column sums are the marginals 1/r (+1e-8 inside the log).
    np.testing.assert_allclose(np.asarray(plan).sum(-2), 1 / 16, rtol=1e-4)


def test_the_whole_batch_stops_together():
    # An easy pair (small cost: converges in a few iterations alone) in a batch with hard ones
    # (large cost): the batch runs as long as the mean change says, the easy pair with it.
    easy_a, easy_b = features_at_cost_scale(1, 1.0, batch=1)
    hard_a, hard_b = features_at_cost_scale(2, 30.0, batch=3)
    a, b = np.concatenate([easy_a, hard_a]), np.concatenate([easy_b, hard_b])
    _, alone = alignment.public_transport_plan(easy_a, easy_b)
    reference_plan, reference_iterations = numpy_public_sinkhorn(a, b)
    plan, iterations = alignment.public_transport_plan(a, b)
    assert int(alone) < int(iterations) == reference_iterations
    np.testing.assert_allclose(np.asarray(plan), reference_plan, rtol=0, atol=1e-5)


def test_max_iters_and_threshold_are_honoured():
    a, b = features_at_cost_scale(3, 30.0)
    for max_iters, threshold in ((10, 0.1), (100, 1.0), (100, 0.0)):
        reference_plan, reference_iterations = numpy_public_sinkhorn(
            a, b, max_iters=max_iters, threshold=threshold)
        plan, iterations = alignment.public_transport_plan(a, b, max_iters=max_iters,
                                                           threshold=threshold)
        assert int(iterations) == reference_iterations
        np.testing.assert_allclose(np.asarray(plan), reference_plan, rtol=0, atol=1e-5)


def test_leading_dimensions_and_errors():
    a, b = features_at_cost_scale(4, 1.0, batch=6)
    flat_plan, flat_iterations = alignment.public_transport_plan(a, b)
    plan, iterations = alignment.public_transport_plan(a.reshape(2, 3, 4, 4, 16),
                                                       b.reshape(2, 3, 4, 4, 16))
    assert plan.shape == (2, 3, 16, 16) and int(iterations) == int(flat_iterations)
    np.testing.assert_array_equal(np.asarray(plan).reshape(6, 16, 16), np.asarray(flat_plan))
    with pytest.raises(ValueError, match='equal shapes'):
        alignment.public_transport_plan(a, b[:, :2])
    with pytest.raises(ValueError, match='max_iters'):
        alignment.public_transport_plan(a, b, max_iters=0)


@pytest.mark.parametrize('scale,expected_iterations,tolerance', CASES)
def test_torch_reference_sinkhorn_matches_numpy_loop(scale, expected_iterations, tolerance):
    torch = pytest.importorskip('torch', reason='torch_reference needs PyTorch (pip install '
                                'torch, CPU build)')
    from alignmix_jax.pytorch import torch_reference

    a, b = features_at_cost_scale(0, scale)
    reference_plan, reference_iterations = numpy_public_sinkhorn(a, b)
    plan, iterations = torch_reference.sinkhorn_plan(torch.from_numpy(a.reshape(8, 16, 16)),
                                                     torch.from_numpy(b.reshape(8, 16, 16)))
    assert iterations == reference_iterations == expected_iterations
    np.testing.assert_allclose(plan.numpy(), reference_plan, rtol=0, atol=tolerance)
