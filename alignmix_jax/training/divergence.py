"""Telling a diverging run from a healthy one: non-finite state, exploding loss, and advice.

    # in the jitted step, on values it has anyway (one fused reduction, no host sync):
    step_metrics[divergence.STATE_FINITE] = divergence.all_finite(
        new_state.params, new_state.batch_stats, step_metrics)
    # in the loop, on the metrics it fetches every log_every_steps, before any checkpoint:
    detector = divergence.LossExplosionDetector(config.train.loss_explosion_factor)
    found = divergence.find_divergence(first_step, modes, fetched_metrics, detector)
    if found: stop without saving; message: f'{found}; {divergence.advice(config, found)}'

A non-finite value is found at the first step that has one, and within the step in the order
the step computes its values: the Sinkhorn plan's marginal error, then the losses, then the
other metrics, then the updated parameters and BatchNorm statistics. So a NaN plan that then
made the loss NaN is named as the plan, and finite metrics with non-finite new parameters
(an update that overflowed) as the state.

A loss that explodes while still finite is measured against the running median of that
mode's earlier losses (modes differ in scale: 'clean' is a reconstruction loss); see
`LossExplosionDetector` for why the median, why its lowest value, and the default factor.
"""

import collections
import dataclasses
import math
import statistics
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections

# The key under which the step reports `all_finite` of its new state and metrics.
STATE_FINITE = 'state_finite'
# The metrics in the order a step computes them (train.py's step): the plan first.
_COMPUTED_ORDER = ('marginal_error', 'lambda', 'loss', 'reconstruction_loss', 'kl_divergence',
                   'contrastive_loss', 'accuracy')
_STATE = 'the parameters or BatchNorm statistics'


def all_finite(*trees) -> jax.Array:
    """One boolean scalar: whether every floating-point leaf of `trees` is finite.

    Jit-able; the result is a single bool to fetch with the metrics. Integer leaves (step
    counts, keys) are skipped. The leaves of each dtype are flattened into one vector and
    reduced once: XLA fuses the concatenation into the reduction, so it reads each leaf once,
    as per-leaf reductions would, but compiles one fusion instead of one per leaf (133 for
    PreActResNet18's train state: ~0.6-1.0 s of a step's 2.4-3.4 s compilation on this
    project's CPU, with the same step time).
    """
    by_dtype = {}
    for leaf in jax.tree.leaves(trees):
        dtype = jnp.result_type(leaf)
        if jnp.issubdtype(dtype, jnp.inexact):
            by_dtype.setdefault(dtype, []).append(jnp.ravel(leaf))
    flags = [jnp.all(jnp.isfinite(jnp.concatenate(leaves))) for leaves in by_dtype.values()]
    return jnp.all(jnp.stack(flags)) if flags else jnp.asarray(True)


def objective(step_metrics: Mapping[str, float]) -> float:
    """The step's loss: the classification loss, or the reconstruction loss of 'clean'."""
    return step_metrics['loss'] if 'loss' in step_metrics else \
        step_metrics['reconstruction_loss']


def first_non_finite(step_metrics: Mapping[str, float]) -> str | None:
    """The name of the first non-finite value of one step (see the module docstring), or
    None; `_STATE` when only the new parameters or statistics are non-finite."""
    ordered = [name for name in _COMPUTED_ORDER if name in step_metrics]
    ordered += sorted(name for name in step_metrics
                      if name not in _COMPUTED_ORDER and name != STATE_FINITE)
    for name in ordered:
        if not math.isfinite(float(step_metrics[name])):
            return name
    if STATE_FINITE in step_metrics and not bool(step_metrics[STATE_FINITE]):
        return _STATE
    return None


class LossExplosionDetector:
    """Flags a finite loss more than `factor` times the lowest running median of its mode.

    The median of the last `window` losses of a mode ignores the per-batch spread (mixup
    losses swing with lambda); its lowest value so far is the reference, so a loss that
    climbs for hundreds of steps cannot drag the reference up with it. The reference is at
    least `floor`: a fitted no-mixup baseline's loss can sink to ~1e-3 (or underflow to 0),
    where a batch with a few confidently wrong images is a normal 20-50x spike.

    Default factor 1000 (`config.train.loss_explosion_factor`): with the floor 0.01 the loss
    must pass 10 nats, above the cross-entropy of a uniform guess for any class count up to
    e^10 (ImageNet's is ln 1000 = 6.9), and 1000 times a mixup run's typical loss (~1-2);
    a batch mean of 128 images reaching 1000 m needs most of the batch confidently wrong.
    A run that diverges passes it within a few steps: a diverging loss
    grows by orders of magnitude from one fetch to the next.
    """

    def __init__(self, factor: float = 1000.0, *, window: int = 100, floor: float = 0.01):
        # factor > 1: config_checks.validate checks config.train.loss_explosion_factor.
        self.factor, self.window, self.floor = factor, window, floor
        self._recent = collections.defaultdict(lambda: collections.deque(maxlen=window))
        self._reference = {}

    def reference(self, mode: str) -> float | None:
        """The lowest running median of `mode`'s losses so far (None before the first)."""
        return self._reference.get(mode)

    def observe(self, mode: str, loss: float) -> bool:
        """Records a finite loss of `mode`; True if it exploded (then it is not recorded)."""
        reference = self._reference.get(mode)
        if reference is not None and loss > self.factor * max(reference, self.floor):
            return True
        recent = self._recent[mode]
        recent.append(float(loss))
        median = statistics.median(recent)
        self._reference[mode] = median if reference is None else min(reference, median)
        return False


@dataclasses.dataclass(frozen=True)
class Divergence:
    """Where and how a run went wrong; `str()` is the first half of the stop message."""

    step: int
    mode: str
    what: str  # the first non-finite metric, _STATE, or 'loss' for an explosion
    value: float | None = None  # the non-finite or exploded value (None for the state)
    reference: float | None = None  # an explosion's running median

    @property
    def explosion(self) -> bool:
        return self.reference is not None

    def __str__(self) -> str:
        where = f'at step {self.step} (mode {self.mode!r})'
        if self.explosion:
            return (f'the training loss exploded {where}: {self.value:.4g}, its running median '
                    f'{self.reference:.4g}')
        if self.what == _STATE:
            return f'{_STATE} became non-finite {where}, with finite metrics'
        return f'train/{self.what} became {self.value} {where}'


def find_divergence(first_step: int, modes: Sequence[str],
                    fetched_metrics: Sequence[Mapping[str, float]],
                    detector: LossExplosionDetector | None = None) -> Divergence | None:
    """The first divergence among consecutive steps `first_step`, `first_step` + 1, ...

    `modes[i]` and `fetched_metrics[i]` (host values, with STATE_FINITE if the step reports
    it) are step `first_step + i`'s. Each finite loss is fed to `detector` in step order.
    """
    for offset, (mode, step_metrics) in enumerate(zip(modes, fetched_metrics, strict=True)):
        step = first_step + offset
        what = first_non_finite(step_metrics)
        if what is not None:
            value = None if what == _STATE else float(step_metrics[what])
            return Divergence(step=step, mode=mode, what=what, value=value)
        loss = float(objective(step_metrics))
        if detector is not None and detector.observe(mode, loss):
            return Divergence(step=step, mode=mode, what='loss', value=loss,
                              reference=detector.reference(mode))
    return None


def advice(config: ml_collections.ConfigDict, divergence: Divergence) -> str:
    """What to change before restarting, for this run's settings and this divergence."""
    steps = []
    if divergence.what == 'marginal_error':
        epsilon = config.mixup.epsilon
        # Doubled; from 0 (possible only past config_checks.validate) the paper's 0.1.
        raised = 2 * epsilon if epsilon > 0 else 0.1
        steps.append(f'the Sinkhorn plan was the first non-finite value: raise the alignment\'s '
                     f'entropic regularisation (--config.mixup.epsilon={raised:g}, now '
                     f'{epsilon:g}) or leave out the feature modes (config.mixup.modes)')
    learning_rate = config.train.learning_rate
    steps.append(f'lower the learning rate (--config.train.learning_rate='
                 f'{learning_rate / 10:g}, now {learning_rate:g})')
    if config.model.dtype == 'bfloat16':
        steps.append('train in float32 (--config.model.dtype=float32)')
    # The workdir refuses changed settings unless told (alignmix_jax/runtime/run_config.py).
    return '; or '.join(steps) + '; then restart with --config.train.allow_config_change=True'
