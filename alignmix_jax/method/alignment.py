"""Feature tensor alignment by entropic optimal transport (paper Section 3.2, Eq. 7-11).

Two channels-last feature tensors A, A' of shape (..., h, w, c) are read as r = h*w feature
vectors each (positions flattened row-major). The transport plan P couples position i of A with
position j of A'; the assignment R = r P mixes the features of A' into the layout of A (Eq. 10).

The plan is computed with ott-jax's Sinkhorn solver, configured to reproduce the public PyTorch
AlignMixup loop rather than ott's defaults:

- absolute epsilon on the unscaled squared Euclidean cost (ott would otherwise pick epsilon
  relative to the cost's spread; its cost scale factor defaults to 1.0 in ott 0.6.0, and is set
  explicitly here so a future default cannot change the problem);
- exactly `num_iters` full iterations (a row and a column update each), no early stop;
- log domain, potentials initialised to zero, uniform marginals 1/r;
- the potential over A's positions is updated before the one over A''s positions in every
  iteration. After 100 iterations at realistic feature scales the plan has not converged, so the
  order of updates decides which marginal is exact (here: the column sums, over A''s positions).

No gradient flows through the plan: it is computed from stopped inputs and stopped again on
output, so gradients of `align` reach A' only through the features it combines.

Beyond the paper, `cost_scale='mean'` or `'max'` divides each pair's cost by its mean (or largest)
entry before Sinkhorn, so that epsilon is relative to the scale of the cost rather than
absolute. On trained features the squared distances are in the hundreds or thousands, and at an
absolute 0.1 a hundred iterations leave positions with several times their mass; relative to
the cost, the same hundred iterations reach doubly stochastic plans. The default, 'none', is the
paper's absolute epsilon on the unscaled cost.
"""

import functools

import jax
import jax.numpy as jnp
from ott.geometry import geometry
from ott.problems.linear import linear_problem
from ott.solvers.linear import sinkhorn

from alignmix_jax.settings.config_choices import COST_SCALES

# A threshold no marginal error can fall below. With min_iterations == max_iterations ott runs a
# fixed-length scan and never consults it; it is negative so that would stay true if it did.
_NEVER_CONVERGED = -1.0


def _positions(features: jax.Array) -> jax.Array:
    """(..., h, w, c) -> (..., r, c): one row per spatial position, row-major over (h, w)."""
    *leading, height, width, channels = features.shape
    return features.reshape(*leading, height * width, channels)


def _squared_distances(x: jax.Array, y: jax.Array) -> jax.Array:
    """Eq. (7) for all pairs: out[k, l] = ||x_k - y_l||^2, from differences.

    Differences rather than ||x||^2 + ||y||^2 - 2 x.y: the expansion cancels catastrophically
    in float32 when the features are far from the origin (post-ReLU features are), and its
    matmul runs at reduced precision by default on accelerators. XLA fuses the difference, the
    square and the sum, so the (r, r, c) intermediate is never stored.
    """
    return jnp.sum(jnp.square(x[:, None, :] - y[None, :, :]), axis=-1)


def _sinkhorn_solver(num_iters: int) -> sinkhorn.Sinkhorn:
    return sinkhorn.Sinkhorn(
        lse_mode=True,
        threshold=_NEVER_CONVERGED,
        # ott counts body calls: each call is one full update of both potentials, and
        # min == max makes its loop a scan of max_iterations // inner_iterations steps of
        # inner_iterations calls. inner_iterations=1 gives exactly num_iters iterations, and since
        # ott only computes its marginal error when iteration >= min_iterations or at the last
        # iteration, it does that extra work once.
        inner_iterations=1,
        min_iterations=num_iters,
        max_iterations=num_iters,
        # Unrolled rather than implicit differentiation; we never differentiate through the solve
        # (inputs are stopped), so no backward tape is built either.
        implicit_diff=None,
        momentum=None,
        anderson=None,
        parallel_dual_updates=False,
        recenter_potentials=False,
    )


def _cost_divisor(cost: jax.Array, cost_scale: str) -> jax.Array | float:
    """What the unshifted cost of one pair is divided by: 1.0, its mean or its largest entry."""
    if cost_scale == 'none':
        return 1.0
    scale = jnp.mean(cost) if cost_scale == 'mean' else jnp.max(cost)
    # All positions of both tensors equal (e.g. all-zero features): the cost is 0, and so is
    # every plan's; dividing by 1 keeps the plan uniform instead of NaN.
    return jnp.where(scale > 0, scale, 1.0)


def _plan_for_one_pair(a_positions: jax.Array, b_positions: jax.Array, *, epsilon: float,
                       num_iters: int, cost_scale: str = 'none') -> jax.Array:
    """(r, c), (r, c) -> (r, r) plan of Eq. (9), P[i, j] coupling a_i with b_j."""
    num_positions = a_positions.shape[0]
    # ott updates its column potential g before its row potential f in each iteration, while the
    # public AlignMixup code updates the potential over A's positions first. So ott solves the
    # transposed problem: its rows are A''s positions and its columns A's, cost M^T.
    cost_b_by_a = _squared_distances(b_positions, a_positions)
    # Taken before the shift below: the scale of the cost as Eq. (7) defines it.
    cost_divisor = _cost_divisor(cost_b_by_a, cost_scale)
    # Subtracting from each of A's positions its smallest cost leaves every Sinkhorn iterate's
    # plan unchanged in exact arithmetic: the first update of each iteration is the one over A's
    # positions, and it recomputes that potential from scratch, absorbing any shift that depends
    # on A's position only. In float32 it keeps the potentials small, which makes the plan several
    # times more accurate at large feature distances. (Shifting by B's positions would change
    # the iterates, because B's potential is still zero when A's is first computed.)
    cost_b_by_a = cost_b_by_a - jnp.min(cost_b_by_a, axis=0, keepdims=True)
    geom = geometry.Geometry(
        cost_matrix=cost_b_by_a,
        # Eq. (9): an absolute epsilon. ott's default (epsilon=None) is 0.05 times the standard
        # deviation of the cost, and relative_epsilon would rescale 0.1 the same way.
        epsilon=epsilon,
        relative_epsilon=None,
        # 1.0 (the paper's unscaled cost) unless cost_scale asks for a relative epsilon; ott
        # divides the cost by it, so epsilon then applies to cost / divisor.
        scale_cost=cost_divisor,
    )
    # Eq. (8): uniform marginals, every position carries mass 1/r.
    uniform = jnp.full((num_positions,), 1.0 / num_positions, dtype=jnp.float32)
    problem = linear_problem.LinearProblem(geom, a=uniform, b=uniform)
    output = _sinkhorn_solver(num_iters)(problem)
    return output.matrix.T


# Jitted so eager callers (visualisation, tests) compile the solver once per shape instead of
# tracing ott's loop on every call; inside a caller's jit it is simply inlined.
@functools.partial(jax.jit, static_argnames=('num_iters', 'cost_scale'))
def transport_plan(a: jax.Array, b: jax.Array, *, epsilon: float = 0.1,
                   num_iters: int = 100, cost_scale: str = 'none') -> jax.Array:
    """The entropic transport plan between the positions of `a` and those of `b` (Eq. 7-9).

    Args:
      a: features of shape (..., h, w, c), any number of leading batch dimensions.
      b: features of the same shape as `a`.
      epsilon: absolute entropic regularisation on the unscaled squared Euclidean cost.
      num_iters: the exact number of Sinkhorn iterations (each a row then a column update).
      cost_scale: 'none' (the paper: `epsilon` absolute), or 'mean' / 'max': each pair's cost
        divided by its mean / largest entry first, so `epsilon` is relative to the cost's scale
        and the plan converges within ~100 iterations at any feature scale (beyond the paper).

    Returns:
      float32 plan of shape (..., r, r), r = h*w with positions flattened row-major, where
      P[..., i, j] couples position i of `a` with position j of `b`. Its column sums are 1/r
      up to float32 rounding (they are updated last); its row sums are 1/r once the iterations
      have converged. No gradient flows through it. Computed in float32 whatever the input dtype.
    """
    if a.shape != b.shape:
        raise ValueError(f'transport_plan needs equal shapes (..., h, w, c); got {a.shape} '
                         f'and {b.shape}')
    if a.ndim < 3:
        raise ValueError(f'transport_plan needs features of shape (..., h, w, c); got {a.shape}')
    if cost_scale not in COST_SCALES:
        raise ValueError(f'cost_scale must be one of {COST_SCALES}, got {cost_scale!r}')
    leading = a.shape[:-3]
    a_positions = _positions(jax.lax.stop_gradient(a).astype(jnp.float32))
    b_positions = _positions(jax.lax.stop_gradient(b).astype(jnp.float32))
    num_positions, channels = a_positions.shape[-2:]
    # One vmap over all leading dimensions flattened into one: batch shapes (), (B,), (B1, B2)
    # all become (N,).
    solve = functools.partial(_plan_for_one_pair, epsilon=epsilon, num_iters=num_iters,
                              cost_scale=cost_scale)
    plans = jax.vmap(solve)(a_positions.reshape(-1, num_positions, channels),
                            b_positions.reshape(-1, num_positions, channels))
    return jax.lax.stop_gradient(plans.reshape(*leading, num_positions, num_positions))


def apply_plan(plan: jax.Array, b: jax.Array) -> jax.Array:
    """Eq. (10): the R-weighted combination of `b`'s features at each position of the plan's rows.

    Args:
      plan: (..., r, r) transport plan, as returned by `transport_plan(a, b)`.
      b: features of shape (..., h, w, c), h*w = r.

    Returns:
      (..., h, w, c) array of `b`'s dtype whose position i is sum_j R[i, j] b_j with R = r P.
      Differentiable in `b` (and in `plan`, which `transport_plan` already stops).
    """
    *leading, height, width, channels = b.shape
    num_positions = height * width
    if plan.shape[-2:] != (num_positions, num_positions):
        raise ValueError(f'plan of shape {plan.shape} does not match features of shape {b.shape}')
    # R = r P* is doubly stochastic (once converged): each row is a convex combination.
    assignment = num_positions * plan.astype(jnp.float32)
    # In float32 so a bfloat16 model's mixed features are rounded once, not once per term; the
    # highest precision because accelerators otherwise round float32 matmul inputs to bf16/tf32.
    combined = jnp.einsum('...ij,...jc->...ic', assignment,
                          _positions(b).astype(jnp.float32),
                          precision=jax.lax.Precision.HIGHEST)
    return combined.reshape(*leading, height, width, channels).astype(b.dtype)


def align(a: jax.Array, b: jax.Array, *, epsilon: float = 0.1, num_iters: int = 100,
          cost_scale: str = 'none') -> jax.Array:
    """`a` aligned to `b` (Eq. 10; Eq. 11 is `align(b, a)`), same shape as `a`, dtype of `b`.

    At each position i of `a`: sum_j R[i, j] b_j, with R = r P and P = transport_plan(a, b).
    Gradients flow into `b` through this combination, never through the plan, so `a` itself gets
    no gradient from the result. Callers that also need the plan (e.g. to log
    `marginal_error`) should call `transport_plan` and `apply_plan` to solve only once.
    """
    plan = transport_plan(a, b, epsilon=epsilon, num_iters=num_iters, cost_scale=cost_scale)
    return apply_plan(plan, b)


def marginal_error(plan: jax.Array) -> jax.Array:
    """The largest relative deviation of a row or column sum of `plan` from its target (Eq. 8).

    For an (..., n, m) plan with target row sums 1/n and column sums 1/m, returns, per plan
    (shape (...)), max(max_i |n sum_j P_ij - 1|, max_j |m sum_i P_ij - 1|). Zero for a plan in
    U_r; 0.2 means some position carries 20% more or less mass than it should. With the update
    order of `transport_plan` the column sums are exact up to float32 rounding, so this measures
    the row sums, i.e. how far the fixed number of Sinkhorn iterations is from convergence.
    """
    num_rows, num_cols = plan.shape[-2:]
    plan = plan.astype(jnp.float32)
    row_error = jnp.max(jnp.abs(num_rows * jnp.sum(plan, axis=-1) - 1.0), axis=-1)
    col_error = jnp.max(jnp.abs(num_cols * jnp.sum(plan, axis=-2) - 1.0), axis=-1)
    return jnp.maximum(row_error, col_error)


def _public_sinkhorn(cost: jax.Array, *, epsilon: float, max_iters: int,
                     threshold: float) -> tuple[jax.Array, jax.Array]:
    """The public code's loop on a batch of costs (n, r, r): (plans (n, r, r), iterations)."""
    num_positions = cost.shape[-1]
    # log(1/r + 1e-8) in float32, as the public code writes its uniform marginals.
    log_marginal = jnp.log(jnp.float32(1.0 / num_positions) + jnp.float32(1e-8))

    def exponent(u, v):
        # (-c_ij + u_i + v_j) / eps, the public code's "modified cost".
        return (-cost + u[..., :, None] + v[..., None, :]) / epsilon

    def body(state):
        u, v, _, iteration = state
        # Both updates in the public code's form, the old potential inside the logsumexp and
        # added back outside: equal to the usual update in exact arithmetic, and written the
        # same way so float32 rounding matches too. u (A's positions) first, then v.
        new_u = epsilon * (log_marginal - jax.nn.logsumexp(exponent(u, v), axis=-1)) + u
        new_v = epsilon * (log_marginal - jax.nn.logsumexp(exponent(new_u, v), axis=-2)) + v
        # Mean over the batch of the L1 change of u: one number decides for every pair.
        change = jnp.mean(jnp.sum(jnp.abs(new_u - u), axis=-1))
        return new_u, new_v, change, iteration + 1

    def keep_going(state):
        _, _, change, iteration = state
        # `not change < threshold` rather than `change >= threshold`: the public loop only
        # breaks on a comparison that holds, so a NaN change runs on to max_iters as it does.
        return jnp.logical_and(iteration < max_iters, jnp.logical_not(change < threshold))

    potentials = jnp.zeros(cost.shape[:-1], jnp.float32)
    initial = (potentials, potentials, jnp.float32(jnp.inf), jnp.int32(0))
    u, v, _, iterations = jax.lax.while_loop(keep_going, body, initial)
    return jnp.exp(exponent(u, v)), iterations


@functools.partial(jax.jit, static_argnames=('max_iters',))
def public_transport_plan(a: jax.Array, b: jax.Array, *, epsilon: float = 0.1,
                          max_iters: int = 100,
                          threshold: float = 0.1) -> tuple[jax.Array, jax.Array]:
    """The transport plan as the public AlignMixup CIFAR code computes it (its utils/OT.py).

    The same problem as `transport_plan` (Eq. 7-9: squared Euclidean cost between the
    positions of `a` and `b`, absolute epsilon, uniform marginals, log domain, u over `a`'s
    positions updated before v over `b`'s), solved by the public loop: at most `max_iters`
    iterations, stopping after the first iteration at which the mean over the batch of
    sum_i |u_i - u_i_previous| falls below `threshold`; `1e-8` added to the marginals inside
    their logarithms; the cost used as it is (not shifted as `transport_plan` shifts it).

    Written by hand rather than with ott-jax: ott's Sinkhorn stops each problem on its own
    marginal error (a p-norm of a marginal's deviation from its target, checked every
    `inner_iterations`), and under vmap every problem of a batch stops separately. The public
    rule, one decision for the whole batch from the change of the first potential averaged
    over the batch, is not a criterion ott can be given. The loop is a `jax.lax.while_loop` on
    the device: no host round trip, the whole batch stops together.

    Args:
      a, b: features of equal shape (..., h, w, c); the leading dimensions are the batch over
        which the stopping rule averages (under `shard_map`: each device's slice, as each
        replica of PyTorch's DataParallel runs the loop on its own slice).
      epsilon, max_iters, threshold: the public code's eps 0.1, max_iter 100, thresh 0.1.

    Returns:
      (plan, iterations): the float32 plan (..., r, r), P[..., i, j] coupling position i of
      `a` with position j of `b`, under stop_gradient; and the int32 number of iterations run.
      Its column sums are 1/r (v is updated last); its row sums are off by as much as the loop
      stopped short of convergence.
    """
    if a.shape != b.shape:
        raise ValueError(f'public_transport_plan needs equal shapes (..., h, w, c); got '
                         f'{a.shape} and {b.shape}')
    if a.ndim < 3:
        raise ValueError(f'public_transport_plan needs features of shape (..., h, w, c); got '
                         f'{a.shape}')
    if max_iters < 1:
        raise ValueError(f'public_transport_plan needs max_iters >= 1; got {max_iters}')
    leading = a.shape[:-3]
    a_positions = _positions(jax.lax.stop_gradient(a).astype(jnp.float32))
    b_positions = _positions(jax.lax.stop_gradient(b).astype(jnp.float32))
    num_positions, channels = a_positions.shape[-2:]
    cost = jax.vmap(_squared_distances)(a_positions.reshape(-1, num_positions, channels),
                                        b_positions.reshape(-1, num_positions, channels))
    plans, iterations = _public_sinkhorn(cost, epsilon=epsilon, max_iters=max_iters,
                                         threshold=threshold)
    plans = plans.reshape(*leading, num_positions, num_positions)
    return jax.lax.stop_gradient(plans), iterations


def partner_share(plan: jax.Array, partner: jax.Array) -> jax.Array:
    """The share of R's mass on each position's true partner, averaged over the positions.

    Args:
      plan: (..., r, r) plan between `a` and `b`, as returned by `transport_plan(a, b)`.
      partner: (r,) int, partner[i] the position of `b` that truly corresponds to position i
        of `a` (e.g. its mirror image when `b` shows `a` flipped), or -1 where `a`'s position
        has no counterpart in `b` (shifted out of the frame); those are left out of the mean.

    Returns:
      (...) float32: the mean over positions i with a partner of P[i, partner[i]] / sum_j
      P[i, j], the share of the mass position i sends that reaches its partner (R[i,
      partner[i]] once the row sums have converged to 1/r; divided by the row's own mass so
      that an unconverged plan, whose rows carry up to several times 1/r, still gives a share
      in [0, 1]). 1 when every position sends all its mass to its partner; 1/r for a uniform
      plan.
    """
    num_positions = plan.shape[-1]
    partner = jnp.asarray(partner, jnp.int32)
    if plan.shape[-2:] != (num_positions, num_positions) or partner.shape != (num_positions,):
        raise ValueError(f'partner_share needs a plan (..., r, r) and partners (r,); got '
                         f'{plan.shape} and {partner.shape}')
    has_partner = partner >= 0
    # Row i is where position i of `a` sends its mass; the share of it on the partner's entry.
    plan = plan.astype(jnp.float32)
    row_mass = jnp.maximum(jnp.sum(plan, axis=-1), jnp.finfo(jnp.float32).tiny)
    on_partner = plan[..., jnp.arange(num_positions),
                      jnp.where(has_partner, partner, 0)] / row_mass
    return jnp.sum(jnp.where(has_partner, on_partner, 0.0), axis=-1) / jnp.sum(has_partner)
