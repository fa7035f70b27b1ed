"""Transport plan and alignment (Eq. 7-10) against an independent float64 Sinkhorn."""

import functools
import hashlib
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignmix_jax.method import alignment

# Plan entries lie in [0, 1/r] and most are vanishingly small, so a relative tolerance would be
# meaningless for them; 1e-4 absolute is 0.16% of the largest possible entry at r = 16.
PLAN_ATOL = 1e-4
HEIGHT, WIDTH, CHANNELS = 4, 4, 32
NUM_POSITIONS = HEIGHT * WIDTH


def _logsumexp(x, axis):
    top = np.max(x, axis=axis, keepdims=True)
    return np.squeeze(top, axis) + np.log(np.sum(np.exp(x - top), axis=axis))


def reference_plan(a, b, epsilon=0.1, num_iters=100, rows_first=True):
    """Log-domain Sinkhorn in float64 on (r, c) features, potentials starting at zero.

    rows_first=True is the public AlignMixup order: the potential u over a's positions, then the
    potential v over b's positions, in every iteration.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    cost = np.sum((a[:, None, :] - b[None, :, :]) ** 2, axis=-1)
    log_marginal = np.log(1.0 / cost.shape[0])
    u, v = np.zeros(cost.shape[0]), np.zeros(cost.shape[1])

    def log_kernel():
        return (-cost + u[:, None] + v[None, :]) / epsilon

    for _ in range(num_iters):
        if rows_first:
            u = epsilon * (log_marginal - _logsumexp(log_kernel(), 1)) + u
            v = epsilon * (log_marginal - _logsumexp(log_kernel(), 0)) + v
        else:
            v = epsilon * (log_marginal - _logsumexp(log_kernel(), 0)) + v
            u = epsilon * (log_marginal - _logsumexp(log_kernel(), 1)) + u
    return np.exp(log_kernel())


def reference_plans(a, b, **kwargs):
    """reference_plan over a batch (n, h, w, c) -> (n, r, r)."""
    return np.stack([reference_plan(x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1]),
                                    **kwargs) for x, y in zip(a, b, strict=True)])


def feature_pair(cost_scale, batch=8, seed=0):
    """Post-ReLU-like float32 features (batch, 4, 4, 32), mean pairwise cost m_ij ~ cost_scale."""
    rng = np.random.default_rng(seed)
    shape = (batch, HEIGHT, WIDTH, CHANNELS)
    a, b = (np.maximum(rng.normal(size=shape), 0.0) for _ in range(2))
    a_positions = a.reshape(batch, NUM_POSITIONS, 1, CHANNELS)
    b_positions = b.reshape(batch, 1, NUM_POSITIONS, CHANNELS)
    mean_cost = np.mean(np.sum((a_positions - b_positions) ** 2, axis=-1))
    factor = np.sqrt(cost_scale / mean_cost)
    return (a * factor).astype(np.float32), (b * factor).astype(np.float32)


@pytest.mark.parametrize('cost_scale, epsilon', [(1.0, 0.1), (100.0, 0.1), (1000.0, 0.1),
                                                 (100.0, 1.0)])
def test_plan_matches_float64_reference(cost_scale, epsilon):
    a, b = feature_pair(cost_scale)
    plan = np.asarray(alignment.transport_plan(a, b, epsilon=epsilon))
    assert plan.shape == (8, NUM_POSITIONS, NUM_POSITIONS)
    assert plan.dtype == np.float32
    np.testing.assert_allclose(plan, reference_plans(a, b, epsilon=epsilon), rtol=0,
                               atol=PLAN_ATOL)


def test_update_order_matches_public_code_not_the_opposite():
    a, b = feature_pair(1000.0)
    plan = np.asarray(alignment.transport_plan(a, b))
    opposite = reference_plans(a, b, rows_first=False)
    # 100 iterations are far from converged at this scale, so the order decides the plan: here
    # the two orders disagree by 1/r (a whole entry) somewhere.
    assert np.max(np.abs(plan - opposite)) > 100 * PLAN_ATOL
    np.testing.assert_allclose(plan, reference_plans(a, b), rtol=0, atol=PLAN_ATOL)


@pytest.mark.parametrize('num_iters', [1, 2, 7, 100])
def test_runs_exactly_num_iters_iterations(num_iters):
    a, b = feature_pair(100.0, batch=4)
    plan = np.asarray(alignment.transport_plan(a, b, num_iters=num_iters))
    np.testing.assert_allclose(plan, reference_plans(a, b, num_iters=num_iters), rtol=0,
                               atol=PLAN_ATOL)
    for other in (num_iters - 1, num_iters + 1):
        if other > 0:
            assert np.max(np.abs(plan - reference_plans(a, b, num_iters=other))) > 10 * PLAN_ATOL


def test_marginals_are_uniform_once_converged():
    # At m_ij ~ 1, 100 iterations converge: both marginals are 1/r (Eq. 8).
    plan = alignment.transport_plan(*feature_pair(1.0))
    np.testing.assert_allclose(np.sum(plan, axis=-1), 1.0 / NUM_POSITIONS, rtol=1e-5)
    np.testing.assert_allclose(np.sum(plan, axis=-2), 1.0 / NUM_POSITIONS, rtol=1e-5)
    assert float(jnp.max(alignment.marginal_error(plan))) < 1e-5


def test_column_sums_are_exact_even_before_convergence():
    # At m_ij ~ 1000 the column potential is updated last, so the columns are right (up to
    # float32 rounding of potentials ~1000) while some rows are off by more than 50%.
    plan = alignment.transport_plan(*feature_pair(1000.0))
    np.testing.assert_allclose(np.sum(plan, axis=-2), 1.0 / NUM_POSITIONS, rtol=1e-3)
    row_error = np.abs(NUM_POSITIONS * np.sum(plan, axis=-1) - 1.0)
    assert np.max(row_error) > 0.5
    np.testing.assert_allclose(alignment.marginal_error(plan), np.max(row_error, axis=-1),
                               rtol=1e-5)


def test_align_recovers_spatially_permuted_features():
    rng = np.random.default_rng(1)
    # Well separated: distinct positions are ~64 apart in squared distance, e^(-640) ~ 0.
    a = rng.normal(size=(3, HEIGHT, WIDTH, CHANNELS)).astype(np.float32)
    permutations = [rng.permutation(NUM_POSITIONS) for _ in range(3)]
    b = np.stack([x.reshape(NUM_POSITIONS, CHANNELS)[p].reshape(HEIGHT, WIDTH, CHANNELS)
                  for x, p in zip(a, permutations, strict=True)])
    aligned = alignment.align(a, b)
    assert aligned.shape == a.shape
    np.testing.assert_allclose(aligned, a, rtol=0, atol=1e-3)
    # The plan is the permutation: position i of a sits at position p^-1(i) of b.
    plan = alignment.transport_plan(a, b)
    for plan_k, permutation in zip(plan, permutations, strict=True):
        expected = np.zeros((NUM_POSITIONS, NUM_POSITIONS))
        expected[permutation, np.arange(NUM_POSITIONS)] = 1.0 / NUM_POSITIONS
        np.testing.assert_allclose(plan_k, expected, rtol=0, atol=1e-6)


def test_no_gradient_flows_through_the_plan():
    a, b = feature_pair(100.0, batch=4)
    weights = np.random.default_rng(2).normal(size=a.shape).astype(np.float32)

    def loss(a, b):
        return jnp.sum(weights * alignment.align(a, b))

    grad_a, grad_b = jax.grad(loss, argnums=(0, 1))(a, b)
    # The output depends on a only through the plan, which carries no gradient.
    np.testing.assert_array_equal(grad_a, np.zeros_like(a))

    plan = alignment.transport_plan(a, b)
    grad_b_constant_plan = jax.grad(lambda b: jnp.sum(weights * alignment.apply_plan(plan, b)))(b)
    np.testing.assert_allclose(grad_b, grad_b_constant_plan, rtol=1e-6, atol=1e-6)
    # With R fixed, d/db_j of sum_i w_i . (sum_j R_ij b_j) is sum_i R_ij w_i.
    assignment = NUM_POSITIONS * np.asarray(plan, np.float64)
    expected = np.einsum('nij,nic->njc', assignment, weights.reshape(4, NUM_POSITIONS, CHANNELS))
    np.testing.assert_allclose(np.asarray(grad_b).reshape(expected.shape), expected, rtol=1e-4,
                               atol=1e-5)

    # Mixing with a, as Eq. (12) does, gives a exactly its own share of the gradient.
    lam = 0.3
    grad_a_mixed = jax.grad(
        lambda a: jnp.sum(weights * (lam * a + (1 - lam) * alignment.align(a, b))))(a)
    np.testing.assert_allclose(grad_a_mixed, lam * weights, rtol=1e-6)


def test_bfloat16_inputs_give_a_float32_plan():
    a, b = feature_pair(100.0, batch=4)
    a_bf16, b_bf16 = jnp.asarray(a, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16)
    plan = alignment.transport_plan(a_bf16, b_bf16)
    assert plan.dtype == jnp.float32
    rounded_plan = alignment.transport_plan(a_bf16.astype(jnp.float32),
                                            b_bf16.astype(jnp.float32))
    np.testing.assert_allclose(plan, rounded_plan, rtol=0, atol=1e-7)
    # bfloat16 rounding moves the costs by ~0.1-1 at this scale: the plan really is different.
    assert np.max(np.abs(np.asarray(plan) - np.asarray(alignment.transport_plan(a, b)))) > 1e-3
    aligned = alignment.align(a_bf16, b_bf16)
    assert aligned.dtype == jnp.bfloat16
    expected = alignment.apply_plan(rounded_plan, b_bf16.astype(jnp.float32))
    np.testing.assert_allclose(aligned.astype(jnp.float32), expected, rtol=1e-2, atol=1e-2)
    assert alignment.align(a, b).dtype == jnp.float32


def test_leading_dimensions_are_batch_dimensions():
    a, b = feature_pair(100.0, batch=6)
    per_example = np.stack([alignment.transport_plan(x, y) for x, y in zip(a, b, strict=True)])
    assert per_example.shape == (6, NUM_POSITIONS, NUM_POSITIONS)
    np.testing.assert_allclose(alignment.transport_plan(a, b), per_example, rtol=0, atol=1e-6)
    grid_a, grid_b = a.reshape(2, 3, HEIGHT, WIDTH, CHANNELS), b.reshape(2, 3, HEIGHT, WIDTH,
                                                                         CHANNELS)
    np.testing.assert_allclose(alignment.transport_plan(grid_a, grid_b),
                               per_example.reshape(2, 3, NUM_POSITIONS, NUM_POSITIONS), rtol=0,
                               atol=1e-6)
    aligned_grid = alignment.align(grid_a, grid_b)
    assert aligned_grid.shape == grid_a.shape
    np.testing.assert_allclose(aligned_grid[1, 2], alignment.align(a[5], b[5]), rtol=1e-5,
                               atol=1e-5)
    assert alignment.marginal_error(alignment.transport_plan(grid_a, grid_b)).shape == (2, 3)


def test_marginal_error_of_a_known_matrix():
    plans = np.array([
        # Rows sum to 0.65 and 0.35 (relative error 0.3), columns to 0.45 and 0.55 (0.1).
        [[0.35, 0.30], [0.10, 0.25]],
        # Rows sum to 0.55 and 0.45 (0.1), columns to 0.70 and 0.30 (0.4).
        [[0.30, 0.25], [0.40, 0.05]],
        # Uniform marginals.
        [[0.50, 0.00], [0.00, 0.50]],
    ], np.float32)
    np.testing.assert_allclose(alignment.marginal_error(plans), [0.3, 0.4, 0.0], rtol=1e-6,
                               atol=1e-7)
    assert alignment.marginal_error(plans[0]).shape == ()


def test_transport_plan_under_jit():
    a, b = feature_pair(100.0, batch=2)
    jitted = jax.jit(alignment.transport_plan)(a, b)
    np.testing.assert_allclose(jitted, alignment.transport_plan(a, b), rtol=0, atol=1e-7)
    few_iters = jax.jit(functools.partial(alignment.transport_plan, num_iters=3))(a, b)
    np.testing.assert_allclose(few_iters, reference_plans(a, b, num_iters=3), rtol=0,
                               atol=PLAN_ATOL)
    aligned = jax.jit(alignment.align)(a, b)
    np.testing.assert_allclose(aligned, alignment.align(a, b), rtol=1e-6, atol=1e-6)


def test_mismatched_shapes_are_rejected():
    a, b = feature_pair(1.0, batch=2)
    with pytest.raises(ValueError, match='equal shapes'):
        alignment.transport_plan(a, b[:, :2])


# The plans transport_plan(*feature_pair(scale, batch=2)) gave with the default arguments at
# commit 9f5e781, before the cost_scale option existed (CPU, jax 0.10.2, ott-jax 0.6.0), and
# the SHA-256 of their float32 bytes then: the default must stay the paper's plan.
DEFAULT_PLANS = pathlib.Path(__file__).with_name('default_plans_before_cost_scale.npz')
PLAN_SHA256_BEFORE_COST_SCALE = {
    1.0: 'dbf9cd85177ee1825faf42c9bd812b8710c40a2fd94af8c5285c77ff7e4e8f6d',
    1000.0: '733f448a490064dae5d66b9121a99ecd872cfd8e5b3598135cd7c0f32b3eeefd',
}
# Bit for bit only on CPUs that compile the loop alike: CPUs with AVX2 and FMA (AVX-512 ones
# too) give these bytes, and XLA limited to AVX or SSE4.2 (--xla_cpu_max_isa) moves entries
# by up to 4.8e-6 at scale 1000, where 100 iterations at eps 0.1 are far from converged. Left
# out, the shift of the cost by its row minimum moves them by 3.7e-5.
DEFAULT_PLAN_ATOL = 1e-5


@pytest.mark.parametrize('cost_scale', [1.0, 1000.0])
def test_default_plan_is_unchanged(cost_scale):
    stored = np.load(DEFAULT_PLANS)[f'cost_scale_{cost_scale:g}']
    assert hashlib.sha256(stored.tobytes()).hexdigest() == \
        PLAN_SHA256_BEFORE_COST_SCALE[cost_scale]
    a, b = feature_pair(cost_scale, batch=2)
    plan = np.asarray(alignment.transport_plan(a, b))
    np.testing.assert_allclose(plan, stored, rtol=0, atol=DEFAULT_PLAN_ATOL)
    np.testing.assert_array_equal(alignment.transport_plan(a, b, cost_scale='none'), plan)


@pytest.mark.parametrize('relative_to', ['mean', 'max'])
@pytest.mark.parametrize('cost_scale', [1.0, 100.0, 1000.0])
def test_relative_epsilon_converges_at_any_cost_scale(relative_to, cost_scale):
    a, b = feature_pair(cost_scale)
    plan = alignment.transport_plan(a, b, num_iters=100, cost_scale=relative_to)
    assert float(jnp.max(alignment.marginal_error(plan))) < 0.01
    if cost_scale == 1000.0:
        # Where the paper's absolute epsilon is far from converged after the same 100.
        assert float(jnp.max(alignment.marginal_error(alignment.transport_plan(a, b)))) > 0.5


@pytest.mark.parametrize('relative_to, statistic', [('mean', np.mean), ('max', np.max)])
def test_relative_epsilon_is_the_absolute_plan_with_epsilon_times_the_scale(relative_to,
                                                                            statistic):
    # Dividing the cost by s is the same entropic problem as epsilon * s on the raw cost, so
    # the float64 reference with that epsilon must give the same plan, pair by pair, with s the
    # statistic of that pair's own unshifted cost (Eq. 7).
    a, b = feature_pair(100.0, batch=4)
    plan = np.asarray(alignment.transport_plan(a, b, epsilon=0.1, cost_scale=relative_to))
    for plan_k, x, y in zip(plan, a, b, strict=True):
        x, y = x.reshape(NUM_POSITIONS, CHANNELS), y.reshape(NUM_POSITIONS, CHANNELS)
        cost = np.sum((x[:, None, :].astype(np.float64) - y[None, :, :]) ** 2, axis=-1)
        np.testing.assert_allclose(plan_k, reference_plan(x, y, epsilon=0.1 * statistic(cost)),
                                   rtol=0, atol=PLAN_ATOL)


def test_relative_epsilon_on_identical_positions_is_uniform_not_nan():
    constant = np.ones((2, HEIGHT, WIDTH, CHANNELS), np.float32)
    for relative_to in ('mean', 'max'):
        plan = alignment.transport_plan(constant, constant, cost_scale=relative_to)
        np.testing.assert_allclose(plan, 1.0 / NUM_POSITIONS**2, rtol=1e-6)


def test_unknown_cost_scale_is_rejected():
    a, b = feature_pair(1.0, batch=1)
    with pytest.raises(ValueError, match='cost_scale must be one of'):
        alignment.transport_plan(a, b, cost_scale='median')


def test_partner_share_of_known_plans():
    r = 4
    permutation = np.array([2, 0, 3, 1])
    exact = np.zeros((r, r), np.float32)
    exact[np.arange(r), permutation] = 1.0 / r
    uniform = np.full((r, r), 1.0 / r**2, np.float32)
    # Position 0 sends 3/4 of its mass to its partner, positions 1-3 all of it.
    blurred = exact.copy()
    blurred[0] = [0.0, 0.0, 0.75 / r, 0.25 / r]
    # Unconverged rows: position 0 sends 2/r, half of it to its partner; position 1 sends 0.2/r,
    # all of it to its partner; the share is of each row's own mass, not of 1/r.
    unconverged = exact.copy()
    unconverged[0] = [0.0, 0.0, 1.0 / r, 1.0 / r]
    unconverged[1] = [0.2 / r, 0.0, 0.0, 0.0]
    plans = np.stack([exact, uniform, blurred, unconverged])
    np.testing.assert_allclose(alignment.partner_share(plans, permutation),
                               [1.0, 1.0 / r, (0.75 + 3) / 4, (0.5 + 3) / 4], rtol=1e-6)
    # -1: no partner, left out of the mean (position 0 only has the blurred row).
    np.testing.assert_allclose(
        alignment.partner_share(plans, np.array([-1, 0, 3, 1])), [1.0, 1.0 / r, 1.0, 1.0],
        rtol=1e-6)
    with pytest.raises(ValueError, match='partner_share needs'):
        alignment.partner_share(plans, permutation[:3])
