"""The GPU check: the benchmark and short CIFAR-10 trainings on one GPU, every figure as JSON.

    bash launch/gpu_check.sh            # on the GPU machine (launch/README.md: the `run` call)
    bash launch/gpu_check.sh --tiny     # the same on this CPU, at a tiny size

Steps, each in its own process (so no process but the one measuring holds the GPU), each
given what is left of `--budget_s`, its figures written to `OUT/summary.json` as soon as
they exist (a check stopped at its limit still leaves everything measured before):

1. the environment: the devices JAX sees, the versions of JAX, its CUDA plugin, Flax, Optax,
   Orbax, ott-jax, PyTorch and the others the run imports;
2. the data: the CIFAR-10 archive (`.gpu_data/cifar10.npz`, the embedded demo's format, built
   by launch/gpu_prepare.sh from the shared JPEGs) unpacked into an image folder;
3. `python -m alignmix_jax.experiments.bench` on configs/cifar10.py (the full-width PreActResNet18)
on
   that folder, at each batch of `--bench_batches`, float32 and bfloat16, with `--torch`
   (the same step in PyTorch on the same GPU): per mode (none, input, feature) step ms,
   images/s, the alignment's share, peak memory, ours/torch, the input pipeline's images/s;
4. training (`--part=train`, one process for the three runs, the data decoded once): the
   baseline, input mixup and AlignMix (configs/methods.py) with the settings of
   configs/mini_reproduction.py at full width on the whole archive, each for the same number
   of epochs, as many as fit in what is left of the budget (estimated from step 3's step
   and compilation times); per run the final test accuracy, wall time, steps/s and images/s,
   and once the input pipeline's images/s at the training batch. From all of it, the targets
   of the check (`targets` in the summary).

`--tiny`: the same steps on the CPU, at a sixteenth of the width, batches of 8 and 16, one
timed step, a few images of the embedded demo data, one epoch (tests/test_gpu_check.py runs
it with TensorFlow blocked, as on the GPU machine).
"""

import argparse
import json
import math
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
ARCHIVE = REPO_ROOT / '.gpu_data' / 'cifar10.npz'
# The embedded demo data (alignmix_jax.data.in_memory.DEMO_DATA_PATH), the same format.
DEMO_ARCHIVE = REPO_ROOT / 'alignmix_jax' / 'data' / 'demo' / 'cifar10_demo.npz'
METHODS = ('baseline', 'input_mixup', 'alignmix')
# The packages whose versions the environment step reports (distribution names).
PACKAGES = ('jax', 'jaxlib', 'jax-cuda13-plugin', 'jax-cuda12-plugin', 'flax', 'optax',
            'orbax-checkpoint', 'chex', 'ott-jax', 'jaxopt', 'ml-collections', 'lineax',
            'equinox', 'torch', 'numpy', 'pillow', 'tensorboard', 'absl-py', 'etils')
# The targets of the check: AlignMix's step against the input step at batch 128, ours
# against torch, bfloat16 against float32 at batch 512, the pipeline against the step.
FEATURE_OVER_INPUT_MAX = 1.05
OURS_OVER_TORCH_MAX = 1.0
BFLOAT16_SPEEDUP_MIN = 1.5
PIPELINE_OVER_STEP_MIN = 5.0


def sizes(tiny: bool) -> dict:
    """The sizes of a GPU check, or of its tiny CPU rehearsal."""
    if tiny:
        return dict(width=0.0625, bench_batches=(8, 16), steps=1, warmup=1, input_batches=4,
                    train_batch=16, eval_batch=20, images_per_class={'train': 8, 'test': 4},
                    max_epochs=1)
    return dict(width=1.0, bench_batches=(128, 512), steps=20, warmup=3, input_batches=100,
                train_batch=128, eval_batch=1000, images_per_class=None, max_epochs=200)


class Summary:
    """OUT/summary.json, rewritten whenever a step adds its figures."""

    def __init__(self, path: pathlib.Path, figures: dict):
        self.path, self.figures = path, figures
        self.write()

    def add(self, key: str, value):
        self.figures[key] = value
        self.write()

    def write(self):
        temporary = self.path.with_suffix('.tmp')
        temporary.write_text(json.dumps(self.figures, indent=2))
        temporary.replace(self.path)


def run_step(name: str, command: list[str], *, deadline: float, env: dict,
             summary: Summary) -> subprocess.CompletedProcess | None:
    """Runs `command` in the repository with what is left until `deadline`; its output goes
    to this process's (the log), and a failure or timeout is recorded under `errors`."""
    left = deadline - time.monotonic()
    if left < 10:
        summary.figures.setdefault('errors', {})[name] = 'skipped: no time left'
        summary.write()
        return None
    print(f'\n=== {name}: {" ".join(command)} (at most {left:.0f} s)', flush=True)
    started = time.monotonic()
    try:
        result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True,
                                text=True, timeout=left)
    except subprocess.TimeoutExpired as expired:
        output = expired.stdout or ''
        print(output[-4000:] if isinstance(output, str) else output[-4000:].decode(
            errors='replace'), flush=True)
        summary.figures.setdefault('errors', {})[name] = f'stopped at the budget, {left:.0f} s'
        summary.write()
        return None
    print(result.stdout[-6000:], flush=True)
    print(result.stderr[-6000:], file=sys.stderr, flush=True)
    summary.figures.setdefault('seconds', {})[name] = round(time.monotonic() - started, 1)
    if result.returncode != 0:
        tail = result.stderr.strip().splitlines()[-5:]
        summary.figures.setdefault('errors', {})[name] = (f'exit status {result.returncode}: '
                                                          + ' | '.join(tail))
    summary.write()
    return result


ENVIRONMENT_PROBE = '''
import importlib, importlib.metadata, json, os, sys
versions = {}
for name in sys.argv[1:]:
    try:
        versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        pass
# Each import the runs need, on its own: a failure names the module that broke.
imports = {}
for module in ('jax', 'flax.linen', 'optax', 'orbax.checkpoint', 'ott.solvers.linear.sinkhorn',
               'ml_collections', 'tensorboard.compat.proto.event_pb2', 'PIL.Image',
               'alignmix_jax.training.train', 'alignmix_jax.experiments.bench', 'torch'):
    try:
        importlib.import_module(module)
        imports[module] = 'ok'
    except Exception as error:
        imports[module] = f'{type(error).__name__}: {error}'[:400]
figures = {'python': sys.version.split()[0], 'versions': versions, 'imports': imports,
           'xla_flags': os.environ.get('XLA_FLAGS', '')}
if imports['jax'] == 'ok':
    import jax
    figures.update(jax_backend=jax.default_backend(),
                   devices=[str(device) for device in jax.devices()],
                   device_kinds=sorted({device.device_kind for device in jax.devices()}))
print(json.dumps(figures))
'''


def environment_step(deadline, env, summary):
    figures = {}
    try:
        figures['nvidia_smi'] = subprocess.run(['nvidia-smi', '-L'], capture_output=True,
                                               text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as error:
        figures['nvidia_smi'] = f'none ({type(error).__name__})'
    print(figures['nvidia_smi'], flush=True)
    result = run_step('environment', [sys.executable, '-c', ENVIRONMENT_PROBE, *PACKAGES],
                      deadline=deadline, env=dict(env, XLA_PYTHON_CLIENT_PREALLOCATE='false'),
                      summary=summary)
    if result is not None and result.returncode == 0:
        figures.update(json.loads(result.stdout.strip().splitlines()[-1]))
    summary.add('environment', figures)
    return figures


def unpack_archive(archive: pathlib.Path, folder: pathlib.Path,
                   images_per_class: dict | None) -> dict:
    """The archive's JPEGs as folder/{train,test}/<class>/<index>.jpg (the first
    `images_per_class[split]` of each class, or all); returns the counts."""
    import numpy as np
    counts = {}
    with np.load(archive, allow_pickle=False) as contents:
        class_names = [str(name) for name in contents['class_names']]
        for split in ('train', 'test'):
            jpeg_bytes, offsets = contents[f'{split}_jpeg_bytes'], contents[f'{split}_offsets']
            labels = contents[f'{split}_labels']
            written = dict.fromkeys(class_names, 0)
            for index, label in enumerate(labels):
                class_name = class_names[int(label)]
                if images_per_class and written[class_name] >= images_per_class[split]:
                    continue
                class_dir = folder / split / class_name
                class_dir.mkdir(parents=True, exist_ok=True)
                (class_dir / f'{index:05d}.jpg').write_bytes(
                    jpeg_bytes[offsets[index]:offsets[index + 1]].tobytes())
                written[class_name] += 1
            counts[split] = sum(written.values())
    return counts


def bench_step(batch, data_dir, size, deadline, env, summary):
    command = [sys.executable, '-m', 'alignmix_jax.experiments.bench',
               '--config=configs/cifar10.py',
               '--config.dataset.name=image_folder', f'--config.dataset.data_dir={data_dir}',
               f'--config.model.width={size["width"]}', f'--config.train.batch_size={batch}',
               '--dtypes=float32,bfloat16', '--torch', f'--steps={size["steps"]}',
               f'--warmup={size["warmup"]}', f'--input_batches={size["input_batches"]}']
    # torch shares the process and the GPU: JAX takes half of its memory, not 75%.
    result = run_step(f'bench_batch{batch}', command, deadline=deadline,
                      env=dict(env, XLA_PYTHON_CLIENT_MEM_FRACTION='0.45'), summary=summary)
    if result is None or result.returncode != 0:
        return None
    runs = [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{')]
    figures = {run['dtype']: run for run in runs}
    summary.add(f'bench_batch{batch}', figures)
    return figures


def estimated_step_ms(step_ms: dict, modes) -> float:
    """A method's mean step ms from the bench's none / input / feature steps: the modes it
    draws, each counted as the measured mode closest to it."""
    closest = {'none': 'none', 'input': 'input', 'embedding': 'input', 'cutmix': 'input',
               'feature': 'feature', 'feature_prime': 'feature'}
    return statistics.fmean(step_ms[closest.get(mode, 'feature')] for mode in modes)


def plan_epochs(bench: dict, dtype: str, num_train: int, batch: int, budget_s: float,
                max_epochs: int) -> dict:
    """The one epoch count all three runs get: what fits in `budget_s` after each run's
    compilations (the bench's first steps), at the bench's step times plus 30%: the bench
    times the step torch is compared with (the public head and Sinkhorn loop, which may stop
    early), the runs the paper's (100 Sinkhorn iterations), with logging and the evaluation."""
    from configs import mini_reproduction
    figures = bench[dtype]
    steps_per_epoch = num_train // batch
    fixed_s, epoch_s = 0.0, 0.0
    for method in METHODS:
        modes = tuple(dict.fromkeys(mini_reproduction.get_config(method).mixup.modes))
        first = figures['first_step_ms']
        # Each mode compiles once; the evaluation step about as long as the 'none' step.
        fixed_s += sum(first[estimated_mode] for estimated_mode in
                       {('feature' if 'feature' in mode else 'input' if mode != 'none'
                         else 'none') for mode in modes}) / 1000 + first['none'] / 1000
        epoch_s += steps_per_epoch * estimated_step_ms(figures['step_ms'], modes) / 1000 * 1.3
    fixed_s += 30  # starting the process, decoding the archive, the first batches
    epochs = max(1, min(max_epochs, math.floor((budget_s - fixed_s) / epoch_s)))
    return {'epochs': epochs, 'budget_s': round(budget_s, 1), 'fixed_s': round(fixed_s, 1),
            'epoch_s_all_runs': round(epoch_s, 2), 'steps_per_epoch': steps_per_epoch}


def pipeline_images_per_second(dataset, batch_size: int, num_batches: int) -> float:
    """The training loop's input pipeline alone: host batches of `dataset` to arrays on the
    devices (`sharding.global_batch`, as the loop feeds them), after one untimed pass."""
    import jax

    from alignmix_jax.runtime import sharding
    mesh = sharding.make_mesh()
    batches = dataset.train_batches(batch_size, seed=0)

    def feed():
        jax.block_until_ready([sharding.global_batch(next(batches), mesh)
                               for _ in range(num_batches)])

    feed()
    started = time.perf_counter()
    feed()
    return num_batches * batch_size / (time.perf_counter() - started)


def train_part(args):
    """--part=train: the three runs in this process, the data loaded once; each run's figures
    appended to `args.train_out` as it ends."""
    from alignmix_jax import data
    from alignmix_jax.runtime import metric_log
    from alignmix_jax.training import train
    from configs import mini_reproduction
    size = sizes(args.tiny)
    figures = {'epochs': args.epochs, 'dtype': args.dtype, 'runs': {}}
    dataset = None
    for method in METHODS:
        config = mini_reproduction.get_config(method)
        config.dataset.data_dir = args.data_dir
        config.dataset.train_subset = 0  # the whole archive
        config.model.width = size['width']
        config.model.dtype = args.dtype
        config.train.batch_size = size['train_batch']
        config.train.eval_batch_size = size['eval_batch']
        config.train.num_epochs = args.epochs
        # As configs/mini_reproduction.py (x0.1 after epoch 6 of 8): at three quarters.
        config.train.lr_decay_epochs = ((max(1, round(0.75 * args.epochs)),)
                                        if args.epochs > 1 else ())
        config.train.eval_every_epochs = args.epochs
        config.train.log_every_steps = 20 if not args.tiny else 1
        config.train.checkpoint_every_steps = 10 ** 9  # only at the end
        if dataset is None:
            started = time.monotonic()
            dataset = data.load_dataset(config.dataset)
            figures['decode_seconds'] = round(time.monotonic() - started, 2)
            figures['train_images'] = dataset.num_train_examples
            figures['test_images'] = len(dataset.test.labels)
            figures['input_images_per_sec'] = pipeline_images_per_second(
                dataset, config.train.batch_size, 5 if args.tiny else 100)
        workdir = os.path.join(args.workdir, method)
        started = time.monotonic()
        result = train.train_and_evaluate(config, workdir, dataset=dataset)
        wall = time.monotonic() - started
        rates = [record['steps_per_sec'] for record in metric_log.read_metrics(workdir)
                 if 'steps_per_sec' in record]
        # The median interval's rate: steady training, without the first compilation.
        steps_per_sec = statistics.median(rates) if rates else result['steps'] / wall
        figures['runs'][method] = {
            'modes': list(config.mixup.modes), 'alpha': config.mixup.alpha,
            'final_test_accuracy': result['final_test_accuracy'],
            'final_test_loss': result['final_test_loss'],
            'best_test_accuracy': result['best_test_accuracy'], 'steps': result['steps'],
            'wall_seconds': round(wall, 1), 'train_seconds': round(result['train_seconds'], 1),
            'steps_per_sec': steps_per_sec,
            'images_per_sec': steps_per_sec * config.train.batch_size,
            'epoch_seconds': (result['steps'] / args.epochs) / steps_per_sec}
        pathlib.Path(args.train_out).write_text(json.dumps(figures, indent=2))
        print(json.dumps({method: figures['runs'][method]}), flush=True)


def targets(summary: dict) -> dict:
    """Each target of the check: the measured value, the bound and whether it is met."""
    checks = {}
    small_batch, large_batch = summary['bench_batches'][0], summary['bench_batches'][-1]
    small, large = (summary.get(f'bench_batch{batch}') for batch in (small_batch, large_batch))
    for name, bench in dict(((small_batch, small), (large_batch, large))).items():
        for dtype, figures in (bench or {}).items():
            if name == small_batch:
                value = figures['step_ms']['feature'] / figures['step_ms']['input']
                checks[f'feature_over_input_b{name}_{dtype}'] = {
                    'value': value, 'max': FEATURE_OVER_INPUT_MAX,
                    'met': value <= FEATURE_OVER_INPUT_MAX}
            for mode, ratio in figures.get('ratio_to_torch', {}).items():
                checks[f'ours_over_torch_b{name}_{dtype}_{mode}'] = {
                    'value': ratio, 'max': OURS_OVER_TORCH_MAX, 'met': ratio <= OURS_OVER_TORCH_MAX}
    if large and {'float32', 'bfloat16'} <= set(large):
        for mode in large['float32']['images_per_second']:
            value = (large['bfloat16']['images_per_second'][mode]
                     / large['float32']['images_per_second'][mode])
            checks[f'bfloat16_over_float32_b{large_batch}_{mode}'] = {
                'value': value, 'min': BFLOAT16_SPEEDUP_MIN, 'met': value >= BFLOAT16_SPEEDUP_MIN}
    training = summary.get('training', {})
    if training.get('runs'):
        pipeline = training['input_images_per_sec']
        for method, run in training['runs'].items():
            value = pipeline / run['images_per_sec']
            checks[f'pipeline_over_training_{method}'] = {
                'value': value, 'min': PIPELINE_OVER_STEP_MIN,
                'met': value >= PIPELINE_OVER_STEP_MIN}
    return checks


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', default=os.environ.get('OUT', str(REPO_ROOT / 'gpu_check_out')))
    parser.add_argument('--tiny', action='store_true', help='the CPU rehearsal, tiny sizes')
    parser.add_argument('--budget_s', type=float, default=None,
                        help='wall seconds for the whole check (default 480 on the GPU, the '
                        'run call allowing 540; 3600 with --tiny, on a slow shared CPU)')
    parser.add_argument('--train_dtype', default='bfloat16', choices=('float32', 'bfloat16'))
    # A follow-up call on a warm machine may rerun a part: e.g. --bench_batches=512
    # --skip_training (the epochs are planned from the first batch's figures).
    parser.add_argument('--bench_batches', type=lambda text: tuple(map(int, text.split(','))),
                        help='batch sizes to bench, comma-separated (default 128,512)')
    parser.add_argument('--skip_training', action='store_true')
    parser.add_argument('--archive', default=str(ARCHIVE))
    # --part=train runs the trainings (started by the check itself).
    parser.add_argument('--part', choices=('check', 'train'), default='check')
    parser.add_argument('--data_dir')
    parser.add_argument('--workdir')
    parser.add_argument('--epochs', type=int)
    parser.add_argument('--dtype')
    parser.add_argument('--train_out')
    args = parser.parse_args()
    sys.path.insert(0, str(REPO_ROOT))  # configs/ (read to plan the epochs)
    if args.part == 'train':
        train_part(args)
        return

    started = time.monotonic()
    if args.budget_s is None:
        args.budget_s = 3600.0 if args.tiny else 480.0
    deadline = started + args.budget_s
    size = sizes(args.tiny)
    if args.bench_batches:
        size['bench_batches'] = args.bench_batches
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = Summary(out / 'summary.json', {
        'tiny': args.tiny, 'budget_s': args.budget_s,
        'bench_batches': list(size['bench_batches'])})
    env = dict(os.environ, PYTHONUNBUFFERED='1', TF_CPP_MIN_LOG_LEVEL='3')
    # Programs the steps share (the evaluation step of the three runs) compile once.
    env.setdefault('JAX_COMPILATION_CACHE_DIR',
                   str(pathlib.Path(tempfile.gettempdir()) / 'gpu_check_jax_cache'))
    env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                      env.get('PYTHONPATH')]))
    if args.tiny:
        env['JAX_PLATFORMS'] = 'cpu'
    environment_step(deadline, env, summary)

    archive = pathlib.Path(args.archive)
    if not archive.is_file():
        if not args.tiny:
            summary.add('errors', {'data': f'{archive} is missing: run launch/gpu_prepare.sh '
                                           'and carry .gpu_data'})
            raise SystemExit(f'error: {archive} is missing: run launch/gpu_prepare.sh first')
        archive = DEMO_ARCHIVE  # the rehearsal takes the demo's images
    work = pathlib.Path(tempfile.mkdtemp(prefix='gpu_check_'))
    unpack_started = time.monotonic()
    counts = unpack_archive(archive, work / 'cifar10', size['images_per_class'])
    summary.add('data', {'archive': str(archive), 'archive_mib': archive.stat().st_size / 2**20,
                         'images': counts,
                         'unpack_seconds': round(time.monotonic() - unpack_started, 2)})
    data_dir = work / 'cifar10'

    benches = {}
    for batch in size['bench_batches']:
        benches[batch] = bench_step(batch, data_dir, size, deadline, env, summary)

    small = benches[size['bench_batches'][0]]
    if args.skip_training:
        pass
    elif small is not None and args.train_dtype in small:
        plan = plan_epochs(small, args.train_dtype, counts['train'], size['train_batch'],
                           deadline - time.monotonic() - 15, size['max_epochs'])
        summary.add('training_plan', plan)
        train_out = work / 'training.json'
        run_step('training', [sys.executable, str(pathlib.Path(__file__).resolve()),
                              '--part=train', f'--data_dir={data_dir}',
                              f'--workdir={work / "runs"}', f'--epochs={plan["epochs"]}',
                              f'--dtype={args.train_dtype}', f'--train_out={train_out}']
                 + (['--tiny'] if args.tiny else []), deadline=deadline, env=env,
                 summary=summary)
        if train_out.exists():
            summary.add('training', json.loads(train_out.read_text()))
    else:
        summary.figures.setdefault('errors', {})['training'] = (
            'skipped: no bench figures to plan the epochs from')
    summary.add('targets', targets(summary.figures))
    summary.add('total_seconds', round(time.monotonic() - started, 1))
    print_table(summary.figures)


def print_table(figures: dict):
    """The figures that matter, last in the log (the run call returns its tail)."""
    environment = figures.get('environment', {})
    print(f'\n{environment.get("nvidia_smi", "")}\n{environment.get("versions", {})}'
          f'\n{environment.get("devices")}')
    failed = {module: error for module, error in environment.get('imports', {}).items()
              if error != 'ok'}
    if failed:
        print('imports that failed:', json.dumps(failed))
    for batch in figures['bench_batches']:
        for dtype, run in (figures.get(f'bench_batch{batch}') or {}).items():
            for mode, ms in run['step_ms'].items():
                torch_ms = run.get('torch_step_ms', {}).get(mode)
                share = run['alignment_share'].get(mode)
                peak = run['peak_bytes'].get(mode)
                print(f'b{batch:<4} {dtype:<9} {mode:<8} {ms:8.2f} ms '
                      f'{run["images_per_second"][mode]:9.0f} img/s '
                      f'align {"-" if share is None else f"{100 * share:.1f}%":>6} '
                      f'peak {"-" if peak is None else f"{peak / 2**20:.0f} MiB":>9} '
                      f'torch {"-" if torch_ms is None else f"{torch_ms:.2f} ms":>10} '
                      f'ours/torch {run.get("ratio_to_torch", {}).get(mode, float("nan")):.3f}')
            print(f'b{batch:<4} {dtype:<9} input pipeline '
                  f'{run["input_images_per_second"]:.0f} img/s')
    training = figures.get('training', {})
    for method, run in training.get('runs', {}).items():
        print(f'{method:<12} {training["epochs"]} epochs of {training.get("train_images")} '
              f'images: final test accuracy {100 * run["final_test_accuracy"]:.2f}%, '
              f'{run["wall_seconds"]} s, {run["steps_per_sec"]:.1f} steps/s, '
              f'{run["images_per_sec"]:.0f} img/s, {run["epoch_seconds"]:.1f} s/epoch')
    if 'input_images_per_sec' in training:
        print(f'training input pipeline {training["input_images_per_sec"]:.0f} img/s')
    for name, check in figures.get('targets', {}).items():
        bound = f'<= {check["max"]}' if 'max' in check else f'>= {check["min"]}'
        print(f'target {name}: {check["value"]:.3f} {bound}: '
              f'{"met" if check["met"] else "MISSED"}')
    if figures.get('errors'):
        print('errors:', json.dumps(figures['errors']))


if __name__ == '__main__':
    main()
