"""Speed of the pieces of a training step: `python -m alignmix_jax.experiments.bench --config=...
[overrides]`.

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
  devices (the train step augments on the device; that cost is inside the step times);
- per mode, the milliseconds of its first step (compilation included: `first_step_ms`),
  images per second (batch / step seconds), the share of a feature step the
  alignment of the batch would take (alignment ms / that step's ms) and the device's peak
  memory where the backend reports it (`memory_stats()['peak_bytes_in_use']`, GPUs; '-' on the
  CPU). JAX cannot reset that peak: each mode's figure is the running peak of the process read
  after the mode's warm-up, so it includes the modes (and dtypes) measured before it.

`--dtypes=float32,bfloat16` runs all of it once per computation dtype (config.model.dtype),
in turn, and tabulates them side by side.

`--torch` also times, in the same process, the same training step in PyTorch (on the GPU with
CUDA where JAX runs on a GPU and torch sees one, there in bfloat16 through autocast for a
bfloat16 config and with channels-last tensors, `bench_torch.torch_settings`; else on the CPU,
in float32, as below; on the GPU torch's peak memory is reported too): the
transcription of the public code in `alignmix_jax.pytorch.torch_reference` (its PreActResNet18, its
SGD, its Sinkhorn loop, the soft cross-entropy of the mixed labels), started from our initial
weights, with the config's width, batch size, lr, momentum, weight decay, epsilon, Sinkhorn
iterations and threshold. It times exactly the modes 'none', 'input' and 'feature' (whatever
config.mixup.modes lists: the three that both sides implement as the public code does), in
interleaved rounds (our step, then torch's, mode after mode), medians kept. Our side is set
to the step torch computes where the config differs (`bench_torch.TORCH_COMPARISON`: the
public head, pooling then the linear layer, and the public Sinkhorn loop, so that both run the same
iterations); the fields it changed are printed. Left as they are, and so in our times only:
the on-device crop + flip + normalisation of the batch (torch gets the batch augmented once,
as a DataLoader would hand it over), train/alignment_effect's measurement inside the feature
step (its share is printed) and the finite-state check. torch's Sinkhorn reads its stopping
test back to the host at every iteration (`.item()`, as the public code does); its feature
time includes those round trips. torch uses its default threads, one per core
(`--torch_threads=N` sets another count; `torch.get_num_threads()` is printed); on the CPU it
always runs in float32.

Prints a table (per dtype), then one JSON object per dtype, one a line, the last line the last
dtype's.
"""

import json
import statistics
import time

from absl import app, flags, logging
from ml_collections import config_flags

from alignmix_jax.pytorch import bench_torch
from alignmix_jax.runtime.command_line import one_line_errors, parse_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Training configuration file.', lock_config=True)
flags.mark_flags_as_required(['config'])
flags.DEFINE_integer('steps', 5, 'Timed repetitions of each measurement (the median is kept).')
flags.DEFINE_integer('warmup', 2, 'Untimed repetitions first (the first one compiles).')
flags.DEFINE_integer('input_batches', 200, 'Batches read to time the input pipeline.')
flags.DEFINE_bool('torch', False, 'Also time the same step in PyTorch (torch_reference) for '
                  'the modes none, input and feature, interleaved with ours.')
flags.DEFINE_integer('torch_threads', 0, 'With --torch: torch.set_num_threads(N) first (0: '
                     "torch's default, one thread per core).")
flags.DEFINE_list('dtypes', None, 'Computation dtypes to measure in turn, e.g. '
                  'float32,bfloat16 (default: the config\'s model.dtype only).')

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


def _interleaved_median_milliseconds(runs: dict, *, warmup: int, repeats: int,
                                     after_warmup=None) -> dict:
    """Median ms of each of `runs` ({name: run}), timed in rounds that call each once, so
    that a slow drift of the machine (another process, heat) weighs on all of them alike.
    `after_warmup(name, first_ms)` is called once each run's warm-up is done, before the next
    one's, with the ms of its first call (the compilation and one step)."""
    for name, run in runs.items():
        first_ms = _milliseconds(run)
        for _ in range(warmup - 1):
            run()
        if after_warmup is not None:
            after_warmup(name, first_ms)
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            times[name].append(_milliseconds(run))
    return {name: statistics.median(values) for name, values in times.items()}


def _peak_bytes(jax) -> int | None:
    """The first local device's peak memory in bytes, or None where the backend has no figure."""
    stats = jax.local_devices()[0].memory_stats()
    return None if not stats or 'peak_bytes_in_use' not in stats else int(
        stats['peak_bytes_in_use'])


def benchmark(config, *, warmup: int = 2, repeats: int = 5, input_batches: int = 200,
              torch: bool = False, torch_threads: int = 0) -> dict:
    """The figures described in the module docstring, as a dict (`torch`: with PyTorch's,
    on `torch_threads` threads if > 0, else torch's default)."""
    torch_overrides = None
    settings = {'device': 'cpu'}  # torch's, with --torch (set below)
    if torch:
        torch_module = bench_torch.import_torch()
        if torch_threads > 0:
            torch_module.set_num_threads(torch_threads)
        config, torch_overrides = bench_torch.torch_comparison_config(config)
    import jax
    import jax.numpy as jnp

    from alignmix_jax import data
    from alignmix_jax.data import augmentation
    from alignmix_jax.method import alignment, mixup
    from alignmix_jax.runtime import sharding
    from alignmix_jax.settings import config_checks
    from alignmix_jax.training import alignment_effect, train, train_step
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
    last_metrics = {}  # mode -> the metrics of its last step (ours; 'torch:' + mode, torch's)

    def step_runner(mode):
        # The step donates its state: each call hands the new state to the next.
        holder = [train_step.create_train_state(config, model, dataset.image_shape, steps_per_epoch,
                                           mesh)]

        def run_step():
            holder[0], last_metrics[mode] = step_fn(holder[0], images, labels, mode=mode)
            jax.block_until_ready((holder[0].params, last_metrics[mode]))
        return run_step

    runs = {mode: step_runner(mode) for mode in modes}
    if torch:
        # The same batch, augmented and normalised once as our step does it on the device,
        # the same initial weights, one fixed permutation and lambda (the time depends on
        # neither, except through the Sinkhorn loop's stop, which both sides run alike).
        from alignmix_jax.pytorch import torch_reference
        settings = bench_torch.torch_settings(bench_torch.torch_device(jax.default_backend()),
                                              config.model.dtype)
        torch_module.backends.cudnn.benchmark = settings['cudnn_benchmark']
        initial = train_step.create_train_state(config, model, dataset.image_shape,
                                                steps_per_epoch, mesh)
        variables = jax.device_get({'params': initial.params,
                                    'batch_stats': initial.batch_stats})
        host_images, host_labels = jax.device_get((images, labels))
        augmented = augmentation.normalize(augmentation.augment(
            jax.random.PRNGKey(config.seed), jnp.asarray(host_images),
            padding=config.dataset.crop_padding, flip=config.dataset.random_flip,
            color_jitter=tuple(config.dataset.color_jitter),
            rotation_degrees=config.dataset.rotation_degrees),
            config.dataset.mean, config.dataset.std)
        torch_images = torch_reference.to_torch_images(augmented).to(
            settings['device'], memory_format=torch_module.channels_last
            if settings['channels_last'] else torch_module.contiguous_format)
        torch_batch = (torch_images,
                       torch_module.from_numpy(host_labels.astype('int64')).to(settings['device']),
                       torch_module.randperm(batch_size, generator=torch_module.Generator()
                                             .manual_seed(0)).to(settings['device']))

        def torch_runner(mode):
            torch_step = bench_torch.make_torch_step(
                config, variables, model.num_classes, device=settings['device'],
                autocast_bfloat16=settings['autocast_bfloat16'],
                channels_last=settings['channels_last'])

            def run_step():
                last_metrics['torch:' + mode] = torch_step(*torch_batch, 0.5, mode)
            return run_step

        runs = {name: run for mode in modes
                for name, run in ((mode, runs[mode]), ('torch:' + mode, torch_runner(mode)))}

    peak_bytes, first_call_ms = {}, {}

    def record_peak(name, first_ms):
        first_call_ms[name] = first_ms
        if not name.startswith('torch:'):
            peak_bytes[name] = _peak_bytes(jax)
        elif settings['device'] == 'cuda':  # torch's own peak over its mode's warm-up
            peak_bytes[name] = int(torch_module.cuda.max_memory_allocated())
            torch_module.cuda.reset_peak_memory_stats()

    all_ms = _interleaved_median_milliseconds(runs, warmup=warmup, repeats=repeats,
                                              after_warmup=record_peak)
    step_ms = {mode: all_ms[mode] for mode in modes}
    for name, ms in all_ms.items():
        logging.info('%s step: %.1f ms', name, ms)

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
        if config.mixup.sinkhorn == 'public':  # the step's loop (--torch sets it)
            plan, _ = alignment.public_transport_plan(
                anchor, partner, epsilon=config.mixup.epsilon,
                max_iters=config.mixup.sinkhorn_iters, threshold=config.mixup.sinkhorn_threshold)
        else:
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
        'images_per_second': {mode: batch_size / (ms / 1000) for mode, ms in step_ms.items()},
        'alignment_share': {mode: alignment_ms / ms for mode, ms in step_ms.items()
                            if mode in mixup.FEATURE_MODES},
        'peak_bytes': {mode: peak_bytes[mode] for mode in modes},
        # The first step of each mode: its compilation (and one step), ours only.
        'first_step_ms': {mode: first_call_ms[mode] for mode in modes},
    }
    if torch:
        result['torch'] = {
            'version': torch_module.__version__, 'threads': torch_module.get_num_threads(),
            'dtype': 'bfloat16 (autocast)' if settings['autocast_bfloat16'] else 'float32',
            'device': settings['device'], 'channels_last': settings['channels_last'],
            'overrides': torch_overrides,
        }
        if settings['device'] == 'cuda':
            result['torch'].update(
                device_name=torch_module.cuda.get_device_name(),
                # torch's float32 defaults, left as they are: TF32 in cuDNN's convolutions,
                # full float32 in matmuls.
                cudnn_allow_tf32=torch_module.backends.cudnn.allow_tf32,
                cudnn_benchmark=torch_module.backends.cudnn.benchmark,
                matmul_precision=torch_module.get_float32_matmul_precision())
            result['torch_peak_bytes'] = {mode: peak_bytes['torch:' + mode] for mode in modes}
        result['torch_step_ms'] = {mode: all_ms['torch:' + mode] for mode in modes}
        result['ratio_to_torch'] = {mode: step_ms[mode] / result['torch_step_ms'][mode]
                                    for mode in modes}
        # The Sinkhorn iterations of each side's last feature step (the public loop's stop).
        result['sinkhorn_iterations'] = {
            mode: {'ours': int(last_metrics[mode]['sinkhorn_iterations']),
                   'torch': last_metrics['torch:' + mode]['iterations']}
            for mode in modes if mode in mixup.FEATURE_MODES}
    if effect_ms is not None:
        result['alignment_effect_ms'] = effect_ms
        result['alignment_effect_share'] = effect_ms / step_ms[feature_modes[0]]
    if 'input' in step_ms:
        result['step_ratio_to_input'] = {mode: ms / step_ms['input']
                                         for mode, ms in step_ms.items()}
    return result


def _mebibytes(value) -> str:
    return '-' if value is None else f'{value / 2 ** 20:,.0f}'


def _mode_figures(result: dict, mode: str) -> str:
    """The images/s, alignment share and peak MiB columns of `mode`, as both tables print them."""
    share = result['alignment_share'].get(mode)
    share = '-' if share is None else f'{100 * share:.1f}%'
    return (f'{result["images_per_second"][mode]:>11,.0f}{share:>13}'
            f'{_mebibytes(result["peak_bytes"][mode]):>10}')


def format_table(result: dict) -> str:
    lines = [f'{result["model"]} x{result["width"]} ({result["dtype"]}), batch '
             f'{result["batch_size"]}, {result["devices"]} {result["platform"]} device(s); '
             f'A is {"x".join(map(str, result["feature_shape"][1:]))}',
             f'{"what":<34}{"median ms":>12}{"x input step":>14}{"images/s":>11}'
             f'{"align share":>13}{"peak MiB":>10}']
    ratios = result.get('step_ratio_to_input', {})
    for mode, ms in result['step_ms'].items():
        ratio = f'{ratios[mode]:.3f}' if mode in ratios else '-'
        lines.append(f'{"train step, " + mode:<34}{ms:>12.1f}{ratio:>14}'
                     + _mode_figures(result, mode))
    lines.append(f'{"alignment of the batch":<34}{result["alignment_ms"]:>12.1f}{"-":>14}')
    if 'alignment_effect_ms' in result:
        share = 100 * result['alignment_effect_share']
        lines.append(f'{"alignment_effect measurement":<34}{result["alignment_effect_ms"]:>12.1f}'
                     f'{"-":>14}  ({share:.2f}% of a feature step)')
    lines.append(f'input pipeline: {result["input_images_per_second"]:,.0f} images/s')
    lines.append('peak MiB: the device\'s running peak after each mode\'s warm-up (includes '
                 'what ran before; - where the backend reports none)')
    if 'torch_step_ms' in result:
        lines.extend(bench_torch.format_torch_table(result))
    return '\n'.join(lines)


def format_dtype_table(results: list) -> str:
    """Several dtypes' results side by side: per mode, each dtype's step ms, images/s,
    alignment share and peak memory (and torch's ratio, when timed)."""
    with_torch = all('ratio_to_torch' in result for result in results)
    header = f'{"mode":<16}{"dtype":<10}{"step ms":>10}{"images/s":>11}{"align share":>13}' \
             f'{"peak MiB":>10}' + (f'{"ours/torch":>12}' if with_torch else '')
    lines = ['', 'by dtype', header]
    for mode in results[0]['step_ms']:
        for result in results:
            line = (f'{mode:<16}{result["dtype"]:<10}{result["step_ms"][mode]:>10.1f}'
                    + _mode_figures(result, mode))
            if with_torch:
                line += f'{result["ratio_to_torch"][mode]:>12.3f}'
            lines.append(line)
    return '\n'.join(lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
    with one_line_errors():
        from alignmix_jax.settings import config_checks, config_choices
        dtypes = FLAGS.dtypes or [FLAGS.config.model.dtype]
        unknown = [dtype for dtype in dtypes if dtype not in config_choices.DTYPES]
        if unknown:
            raise ValueError(f'--dtypes: unknown dtype {unknown[0]!r}; valid: '
                             f'{", ".join(config_choices.DTYPES)}')
        configs = []
        for dtype in dict.fromkeys(dtypes):  # each once, in the order given
            config = FLAGS.config.copy_and_resolve_references()
            config.model.dtype = dtype
            configs.append(config)
            config_checks.validate(config)  # before TensorFlow, the devices or the data
        if FLAGS.torch:
            bench_torch.import_torch()  # its error before JAX's and TensorFlow's imports

        results = []
        for config in configs:
            results.append(benchmark(config, warmup=FLAGS.warmup, repeats=FLAGS.steps,
                                     input_batches=FLAGS.input_batches, torch=FLAGS.torch,
                                     torch_threads=FLAGS.torch_threads))
            print(format_table(results[-1]), flush=True)
            print(flush=True)
    if len(results) > 1:
        print(format_dtype_table(results))
    for result in results:
        print(json.dumps(result))


if __name__ == '__main__':
    app.run(main, flags_parser=parse_flags)
