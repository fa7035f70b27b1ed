"""The side-by-side run: the PyTorch transcription of the public CIFAR code trained end to end
beside this project's trainer, on the same images, one method and seed per call.

    python -m alignmix_jax.pytorch.parity_run --method=input --seed=0 \\
        --data_dir=../shared/data/cifar10-jpeg --output=runs/parity/input_seed0.json

The protocol (short, for a CPU): a class-balanced subset of `train_images` training images,
`test_images` test images (0: the whole test split; else a class-balanced subset), the
quarter-width PreActResNet18 with the public block (its identity shortcuts add the pre-activated
input), the public head (pooling, linear) and PyTorch's default initialisation, SGD (lr 0.1,
momentum 0.9, weight decay 1e-4, batch 128) for `epochs` epochs, lr x0.1 at each of
`decay_epochs`, lambda ~ Beta(2, 2). Methods: 'none' (no mixup), 'input' (input mixup on every
batch) and 'alignmix' (the public mode draw: input mixup with probability 1/2, else aligned
feature mixup in one of its two directions; our `alignmix_public`).

The two sides are independent runs, each with its own randomness:
- torch (`alignmix_jax.pytorch.torch_reference.train_step`): its own shuffling, crops, flips,
  permutations, lambdas and mode draws from the seed (torch and NumPy generators), and, as the
  public DataLoader (drop_last False), the last partial batch of every epoch;
- ours: `train.train_and_evaluate` with `configs/mini_reproduction.py` set to the same
  protocol (which drops the partial batch, as our loop always does).

A script of the package rather than a test: it trains for minutes and writes figures (its
JSON) that docs/parity.md's tables report; it is no check that passes or fails on its own. torch
and the repository's configs/ are imported when the run starts, so that `--help` needs neither
and `--side=ours` runs without PyTorch.
"""

import dataclasses
import json
import pathlib
import random
import time

import numpy as np
from absl import app, flags

from alignmix_jax import data
from alignmix_jax.data.common import class_balanced_subset
from alignmix_jax.pytorch import bench_torch, torch_reference
from alignmix_jax.runtime.command_line import one_line_errors, repository_configs
from alignmix_jax.training import train

METHODS = {'none': 'baseline', 'input': 'input_mixup', 'alignmix': 'alignmix_public'}
# The public code's draw per batch for AlignMix; the other methods have one mode.
TORCH_MODES = {'none': ('none',), 'input': ('input',),
               'alignmix': ('input', 'input', 'feature', 'feature_prime')}
ALPHA = 2.0  # the public code's, for every method here

FLAGS = flags.FLAGS
flags.DEFINE_enum('method', 'none', list(METHODS), 'What both sides train.')
flags.DEFINE_integer('seed', 0, 'Seed of both runs (each side draws from it on its own).')
flags.DEFINE_string('data_dir', '../shared/data/cifar10-jpeg', 'CIFAR-10 image folder.')
flags.DEFINE_integer('train_images', 2000, 'Class-balanced training subset.')
flags.DEFINE_integer('test_images', 0, 'Class-balanced test subset (0: the whole split).')
flags.DEFINE_integer('epochs', 10, 'Epochs of both runs.')
flags.DEFINE_list('decay_epochs', ['5', '7'], 'Epochs at which the learning rate is x0.1.')
flags.DEFINE_float('width', 0.25, 'Channel multiplier of the PreActResNet18.')
flags.DEFINE_enum('side', 'both', ['both', 'torch', 'ours'], 'Which side(s) to train.')
flags.DEFINE_string('workdir', '/tmp/parity_run', 'Our trainer\'s workdir root.')
flags.DEFINE_string('output', None, 'JSON file for the result (also printed).')


def our_config(method: str, seed: int):
    config = repository_configs('mini_reproduction').get_config(METHODS[method])
    config.seed = seed
    config.dataset.data_dir = FLAGS.data_dir
    config.dataset.train_subset = FLAGS.train_images
    config.model.width = FLAGS.width
    config.model.head_norm = False
    config.model.init = 'pytorch'
    config.model.preact_resnet18.shortcut = 'preactivated'  # the public PreActBlock
    config.mixup.alpha = ALPHA
    config.mixup.allow_inert_alignment = True  # the public head (see configs/methods.py)
    config.train.num_epochs = FLAGS.epochs
    config.train.lr_decay_epochs = tuple(int(epoch) for epoch in FLAGS.decay_epochs)
    config.train.eval_every_epochs = FLAGS.epochs
    return config


def _augment(images, generator):
    """RandomCrop(32, padding=4) and RandomHorizontalFlip on a uint8 NHWC batch -> NCHW."""
    import torch
    batch = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    padded = torch.nn.functional.pad(batch, (4, 4, 4, 4))
    offsets = torch.randint(0, 9, (len(batch), 2), generator=generator)
    flips = torch.rand(len(batch), generator=generator) < 0.5
    crops = [padded[k, :, y:y + 32, x:x + 32] for k, (y, x) in enumerate(offsets.tolist())]
    out = torch.stack(crops)
    out[flips] = out[flips].flip(-1)
    return out


def _normalize(images_nchw, mean, std):
    import torch
    return (images_nchw - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def train_torch(method: str, seed: int, dataset, config) -> dict:
    """The transcription trained as the public main.py trains: per epoch a fresh shuffle, every
    batch including the last partial one, lr set per epoch, lambda and mode drawn per batch."""
    import torch
    torch.set_num_threads(1)  # the machine is shared; one thread keeps runs comparable
    generator = torch.Generator().manual_seed(seed)
    numpy_rng = np.random.default_rng(seed)
    draw = random.Random(seed)
    model = torch_reference.build_classifier(dataset.num_classes, FLAGS.width, seed=seed)
    optimizer = torch_reference.make_optimizer(model, 0.1, 0.9, 1e-4)
    images, labels = dataset.train.images, dataset.train.labels
    mean, std = config.dataset.mean, config.dataset.std
    batch_size, losses, iterations = config.train.batch_size, [], []
    for epoch in range(FLAGS.epochs):
        learning_rate = 0.1 * 0.1 ** sum(epoch >= d for d in config.train.lr_decay_epochs)
        for group in optimizer.param_groups:
            group['lr'] = learning_rate
        order = torch.randperm(len(images), generator=generator).numpy()
        for start in range(0, len(images), batch_size):
            chosen = order[start:start + batch_size]
            batch = _normalize(_augment(images[chosen], generator), mean, std)
            batch_labels = torch.from_numpy(labels[chosen].astype(np.int64))
            permutation = torch.randperm(len(chosen), generator=generator)
            lam = float(numpy_rng.beta(ALPHA, ALPHA))
            mode = draw.choice(TORCH_MODES[method])
            result = torch_reference.train_step(model, optimizer, batch, batch_labels,
                                                permutation, lam, mode)
            losses.append(result['loss'])
            if result['iterations']:
                iterations.append(result['iterations'])
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(dataset.test.labels), 500):
            batch = torch.from_numpy(dataset.test.images[start:start + 500]).permute(
                0, 3, 1, 2).float() / 255
            logits = model(_normalize(batch, mean, std))
            correct += int((logits.argmax(1).numpy()
                            == dataset.test.labels[start:start + 500]).sum())
    return {'final_test_accuracy': correct / len(dataset.test.labels),
            'steps': len(losses), 'mean_loss_last_epoch': float(np.mean(losses[-16:])),
            'mean_sinkhorn_iterations': float(np.mean(iterations)) if iterations else None}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
    with one_line_errors():  # PyTorch missing, a wrong data folder: one `error:` line
        if FLAGS.side in ('both', 'torch'):  # before the data loads
            bench_torch.import_torch('--side=torch (and both) trains the PyTorch transcription')
        result = run_sides(our_config(FLAGS.method, FLAGS.seed))
    text = json.dumps(result)
    print(text)
    if FLAGS.output:
        pathlib.Path(FLAGS.output).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(FLAGS.output).write_text(text + '\n')


def run_sides(config) -> dict:
    """Both sides (or the one of --side) on the data of `config`: the result record."""
    dataset = data.load_dataset(config.dataset)
    if FLAGS.test_images:
        dataset = dataclasses.replace(dataset, test=class_balanced_subset(
            dataset.test, FLAGS.test_images))
    result = {'method': FLAGS.method, 'seed': FLAGS.seed, 'train_images': len(
        dataset.train.labels), 'test_images': len(dataset.test.labels), 'epochs': FLAGS.epochs}
    if FLAGS.side in ('both', 'torch'):
        start = time.time()
        result['torch'] = train_torch(FLAGS.method, FLAGS.seed, dataset, config)
        result['torch']['seconds'] = time.time() - start
    if FLAGS.side in ('both', 'ours'):
        start = time.time()
        workdir = pathlib.Path(FLAGS.workdir) / FLAGS.method / f'seed{FLAGS.seed}'
        metrics = train.train_and_evaluate(config, str(workdir), dataset)
        result['ours'] = {'final_test_accuracy': float(metrics['final_test_accuracy']),
                          'seconds': time.time() - start}
    return result


if __name__ == '__main__':
    app.run(main)
