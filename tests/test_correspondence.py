"""Checkable correspondences: partner maps, shifts, and the plan on exactly mirrored features."""

import numpy as np
import pytest

from alignmix_jax.evaluation import correspondence
from alignmix_jax.method import alignment

HEIGHT, WIDTH, CHANNELS = 4, 4, 32
NUM_CELLS = HEIGHT * WIDTH


def test_flip_partners_of_a_small_grid():
    # 2 x 3 grid, row-major: cells 0 1 2 / 3 4 5 mirror to 2 1 0 / 5 4 3.
    np.testing.assert_array_equal(correspondence.flip_partners(2, 3), [2, 1, 0, 5, 4, 3])


def test_shift_partners_of_a_small_grid():
    np.testing.assert_array_equal(correspondence.shift_partners(2, 3), [1, 2, -1, 4, 5, -1])
    np.testing.assert_array_equal(correspondence.shift_partners(2, 3, cells=2),
                                  [2, -1, -1, 5, -1, -1])


def test_shift_right_moves_the_content_and_zeroes_the_strip():
    images = np.arange(2 * 3 * 8 * 1, dtype=np.float32).reshape(2, 3, 8, 1) + 1
    shifted = np.asarray(correspondence.shift_right(images, 2))
    np.testing.assert_array_equal(shifted[:, :, :2], 0.0)
    np.testing.assert_array_equal(shifted[:, :, 2:], images[:, :, :-2])
    with pytest.raises(ValueError, match='shift must be between'):
        correspondence.shift_right(images, 8)


def off_partner_mass_bound(epsilon: float, gap: float, num_cells: int) -> float:
    """The largest mean off-partner mass m of R an entropic optimal plan can have.

    b's cells are a's in another order sigma, so the plan Q = Pi_sigma / r costs 0 and has
    entropy log r. The entropic plan P = R / r (rows R_i distributions) minimises
    <P, M> - eps H(P), so <P, M> <= eps (H(P) - log r) = eps mean_i H(R_i). Every cell that is
    not the partner costs at least `gap`, so <P, M> >= gap m, and a row leaving m_i off its
    partner has H(R_i) <= h(m_i) + m_i log(r - 1) (h the binary entropy), concave in m_i. So
    m (gap - eps log(r - 1)) <= eps h(m): the bound is the largest m in [0, 1] meeting it,
    found by bisection (the left side minus the right is negative below it, positive above).
    """
    def excess(m):
        binary_entropy = -m * np.log(m) - (1 - m) * np.log1p(-m)
        return m * (gap - epsilon * np.log(num_cells - 1)) - epsilon * binary_entropy

    low, high = 1e-12, 1 - 1e-12
    assert excess(high) > 0, 'the gap is too small for any bound'
    for _ in range(200):
        middle = 0.5 * (low + high)
        low, high = (middle, high) if excess(middle) <= 0 else (low, middle)
    return high


def mirrored_features(scale, batch=3, seed=0):
    """Cells of a: orthogonal vectors of squared norm scale (any two 2 scale apart); b = a
    flipped left-right, cell for cell."""
    rng = np.random.default_rng(seed)
    bases = [np.linalg.qr(rng.normal(size=(CHANNELS, NUM_CELLS)))[0].T for _ in range(batch)]
    a = np.sqrt(scale) * np.stack(bases).reshape(batch, HEIGHT, WIDTH, CHANNELS)
    return a.astype(np.float32), a[:, :, ::-1].astype(np.float32)


@pytest.mark.parametrize('scale, epsilon, cost_scale', [(1.0, 0.1, 'none'),
                                                        (0.3, 0.1, 'none'),
                                                        (500.0, 0.1, 'mean')])
def test_mirrored_features_put_their_mass_on_the_mirrored_cell(scale, epsilon, cost_scale):
    a, b = mirrored_features(scale)
    plan = alignment.transport_plan(a, b, epsilon=epsilon, cost_scale=cost_scale)
    # The bound is about the optimal plan: the 100 iterations must have converged.
    assert float(np.max(alignment.marginal_error(plan))) < 1e-4
    positions = a.reshape(len(a), NUM_CELLS, 1, CHANNELS).astype(np.float64)
    cost = np.sum((positions - b.reshape(len(b), 1, NUM_CELLS, CHANNELS)) ** 2, axis=-1)
    partners = correspondence.flip_partners(HEIGHT, WIDTH)
    np.testing.assert_allclose(cost[:, np.arange(NUM_CELLS), partners], 0.0, atol=1e-4)
    gap = np.min(np.where(np.eye(NUM_CELLS)[partners] > 0, np.inf, cost))
    # With cost_scale, epsilon applies to the cost divided by its mean: eps * mean on the raw.
    effective_epsilon = epsilon * (np.mean(cost) if cost_scale == 'mean' else 1.0)
    bound = off_partner_mass_bound(effective_epsilon, gap, NUM_CELLS)
    assert bound < 0.25  # a bound that says something
    # 1e-4: slack for the marginals, which are exact to that much only.
    shares = np.asarray(alignment.partner_share(plan, partners))
    assert np.all(shares >= 1 - bound - 1e-4)
    # The plan is not the identity: the same cell gets next to nothing.
    same_cell = np.asarray(alignment.partner_share(plan, np.arange(NUM_CELLS)))
    assert np.all(same_cell <= bound + 1e-4)
