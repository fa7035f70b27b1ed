"""Speed of the pieces of a training step: `python -m alignmix_jax.bench --config=... [overrides]`.

Measures, on the devices JAX sees and with the config's model, batch size and mixup settings:

- the median milliseconds of one training step of each mixup mode in `config.mixup.modes`,
  after warm-up (compilation and the first steps are excluded), with the result blocked on;
  the modes are timed in interleaved rounds, so that the machine's drift does not bias one;
- the alignment alone (Sinkhorn plan + Eq. 10 for every pair of a batch) on feature tensors of
  the shape the model's F produces for this batch;
- `train/alignment_effect`'s measurement alone (`alignment_effect.measure`: f without gradient
  on the unaligned mix, after capturing the batch statistics), on this batch's real A with the
  initial model, and its share of the first feature mode's step (it runs inside that step);
- the input pipeline: images per second from the dataset's batch iterator to arrays on the
  devices (the train step augments on the device; that cost is inside the step times).

Prints a table, then, as the last line, one JSON object with these figures.
"""

import json
import statistics
import time

from absl import app, flags, logging
from ml_collections import config_flags

from alignmix_jax.command_line import one_line_errors, parse_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Training configuration file.', lock_config=True)
flags.mark_flags_as_required(['config'])
flags.DEFINE_integer('steps', 5, 'Timed repetitions of each measurement (the median is kept).')
flags.DEFINE_integer('warmup', 2, 'Untimed repetitions first (the first one compiles).')
flags.DEFINE_integer('input_batches', 200, 'Batches read to time the input pipeline.')


def _milliseconds(run) -> float:
    """Wall time of `run()` in ms; `run` must block until its result is ready."""
    start = time.perf_counter()
    run()
    return 1000 * (time.perf_counter() - start)


def _median_milliseconds(run, *, warmup: int, repeats: int) -> float:
    """Median wall time of `run()` in ms after `warmup` untimed calls."""
    for _ in range(warmup):
        run()
    return statistics.median(_milliseconds(run) for _ in range(repeats))


def _interleaved_median_milliseconds(runs: dict, *, warmup: int, repeats: int) -> dict:
    """Median ms of each of `runs` ({name: run}), timed in rounds that call each once, so
    that a slow drift of the machine (another process, heat) weighs on all of them alike."""
    for run in runs.values():
        for _ in range(warmup):
            run()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            times[name].append(_milliseconds(run))
    return {name: statistics.median(values) for name, values in times.items()}


def benchmark(config, *, warmup: int = 2, repeats: int = 5, input_batches: int = 200) -> dict:
    """The figures described in the module docstring, as a dict."""
    import jax
    import jax.numpy as jnp

    from alignmix_jax import (
        alignment,
        alignment_effect,
        augmentation,
        config_checks,
        data,
        mixup,
        sharding,
        train,
        train_step,
    )
    config_checks.validate(config, num_devices=jax.device_count())
    modes = tuple(dict.fromkeys(train.training_modes(config)))  # each once, in order
    dataset = data.load_dataset(config.dataset)
    config_checks.check_training_set(config, dataset.num_train_examples)
    batch_size = config.train.batch_size
    model = train_step.build_training_model(config, dataset)
    mesh = sharding.make_mesh()
    sharding.check_batch_size(batch_size, mesh, 'config.train.batch_size')
    steps_per_epoch = data.steps_per_epoch(dataset.num_train_examples, batch_size)
    batches = dataset.train_batches(batch_size, seed=config.seed)
    images, labels = sharding.global_batch(next(batches), mesh)

    step_fn = train_step.make_train_step(model, config, mesh)

    def step_runner(mode):
        # The step donates its state: each call hands the new state to the next.
        holder = [train_step.create_train_state(config, model, dataset.image_shape, steps_per_epoch,
                                           mesh)]

        def run_step():
            holder[0], step_metrics = step_fn(holder[0], images, labels, mode=mode)
            jax.block_until_ready((holder[0].params, step_metrics))
        return run_step

    step_ms = _interleaved_median_milliseconds({mode: step_runner(mode) for mode in modes},
                                               warmup=warmup, repeats=repeats)
    for mode, ms in step_ms.items():
        logging.info('%s step: %.1f ms', mode, ms)

    # The alignment alone, on post-ReLU-like features of F's output shape for this batch.
    abstract_features = jax.eval_shape(
        lambda x: model.apply(
            model.init(jax.random.PRNGKey(0), x[:1], train=False), x, train=False,
            method='features'),
        jax.ShapeDtypeStruct((batch_size, *dataset.image_shape), jnp.float32))
    # A transformer's A is (patch grid, class token): the plan aligns the grid.
    feature_shape = (abstract_features[0] if isinstance(abstract_features, tuple)
                     else abstract_features).shape
    features = jax.nn.relu(jax.random.normal(jax.random.PRNGKey(1), feature_shape))
    permutation = jax.random.permutation(jax.random.PRNGKey(2), batch_size)

    @jax.jit
    def align_batch(features):
        anchor, partner = mixup.pair(features, permutation)
        plan = alignment.transport_plan(anchor, partner, epsilon=config.mixup.epsilon,
                                        num_iters=config.mixup.sinkhorn_iters)
        return alignment.apply_plan(plan, partner)

    alignment_ms = _median_milliseconds(lambda: align_batch(features).block_until_ready(),
                                        warmup=warmup, repeats=repeats)

    effect_ms = None
    feature_modes = [mode for mode in modes if mode in mixup.FEATURE_MODES]
    if feature_modes and config.mixup.align:
        # The measurement on its own, from the real A and e of this batch's first feature
        # mode (BatchNorm over the whole batch, outside shard_map).
        single = model.clone(batch_norm_axis=None)
        variables = single.init(jax.random.PRNGKey(0), jnp.zeros((1, *dataset.image_shape)),
                                train=False)
        params, batch_stats = variables['params'], variables.get('batch_stats', {})
        normalized = augmentation.normalize(images, config.dataset.mean, config.dataset.std)
        real_features = single.apply(variables, normalized, train=True, method='features',
                                     mutable=['batch_stats'])[0]
        lam = jnp.float32(0.5)
        mixed, _ = mixup.mix_features(
            real_features, permutation, lam, swap=feature_modes[0] in mixup.SWAPPED_MODES,
            align=True, epsilon=config.mixup.epsilon, num_iters=config.mixup.sinkhorn_iters,
            cost_scale=config.mixup.cost_scale)
        embedding = single.apply(variables, mixed, train=True, method='embed',
                                 mutable=['batch_stats'])[0]
        measure = jax.jit(lambda *args: alignment_effect.measure(
            feature_modes[0], single, params, batch_stats, *args,
            swap=feature_modes[0] in mixup.SWAPPED_MODES))
        effect_ms = _median_milliseconds(
            lambda: measure(real_features, permutation, lam, mixed,
                            embedding).block_until_ready(), warmup=warmup, repeats=repeats)

    # Host batches to device arrays, as the training loop feeds them.
    def feed():
        fed = [sharding.global_batch(next(batches), mesh) for _ in range(input_batches)]
        jax.block_until_ready(fed)

    feed()  # warm-up: first transfers, any lazy dataset work
    start = time.perf_counter()
    feed()
    input_images_per_second = input_batches * batch_size / (time.perf_counter() - start)

    result = {
        'platform': jax.devices()[0].platform, 'devices': mesh.size,
        'model': config.model.name, 'width': config.model.width, 'dtype': config.model.dtype,
        'batch_size': batch_size, 'feature_shape': list(feature_shape),
        'step_ms': step_ms, 'alignment_ms': alignment_ms,
        'input_images_per_second': input_images_per_second,
    }
    if effect_ms is not None:
        result['alignment_effect_ms'] = effect_ms
        result['alignment_effect_share'] = effect_ms / step_ms[feature_modes[0]]
    if 'input' in step_ms:
        result['step_ratio_to_input'] = {mode: ms / step_ms['input']
                                         for mode, ms in step_ms.items()}
    return result


def format_table(result: dict) -> str:
    lines = [f'{result["model"]} x{result["width"]} ({result["dtype"]}), batch '
             f'{result["batch_size"]}, {result["devices"]} {result["platform"]} device(s); '
             f'A is {"x".join(map(str, result["feature_shape"][1:]))}',
             f'{"what":<34}{"median ms":>12}{"x input step":>14}']
    ratios = result.get('step_ratio_to_input', {})
    for mode, ms in result['step_ms'].items():
        ratio = f'{ratios[mode]:.3f}' if mode in ratios else '-'
        lines.append(f'{"train step, " + mode:<34}{ms:>12.1f}{ratio:>14}')
    lines.append(f'{"alignment of the batch":<34}{result["alignment_ms"]:>12.1f}{"-":>14}')
    if 'alignment_effect_ms' in result:
        share = 100 * result['alignment_effect_share']
        lines.append(f'{"alignment_effect measurement":<34}{result["alignment_effect_ms"]:>12.1f}'
                     f'{"-":>14}  ({share:.2f}% of a feature step)')
    lines.append(f'input pipeline: {result["input_images_per_second"]:,.0f} images/s')
    return '\n'.join(lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
    with one_line_errors():
        from alignmix_jax import config_checks
        config_checks.validate(FLAGS.config)  # before TensorFlow, the devices or the data
        import tensorflow as tf
        tf.config.set_visible_devices([], 'GPU')  # TensorFlow only reads data

        result = benchmark(FLAGS.config, warmup=FLAGS.warmup, repeats=FLAGS.steps,
                           input_batches=FLAGS.input_batches)
    print(format_table(result))
    print(json.dumps(result))


if __name__ == '__main__':
    app.run(main, flags_parser=parse_flags)
