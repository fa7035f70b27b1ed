"""Settings checked before anything is loaded: config_checks and the commands' one-line errors."""

import subprocess
import sys
import time

import pytest

from alignmix_jax.runtime.command_line import one_line_errors
from alignmix_jax.settings import config_checks
from configs import (
    backbones,
    cifar10,
    cifar100,
    cifar100_ae,
    cpu_protocol,
    cub_resnet50,
    cub_vgg,
    demo,
    imagenet,
    methods,
    mini_reproduction,
    tiny_imagenet,
)
from tests.conftest import REPO_ROOT


def shipped_configs():
    yield from (cifar10.get_config(), cifar100.get_config(), cifar100_ae.get_config(),
                cub_resnet50.get_config(), cub_vgg.get_config(), demo.get_config(),
                demo.get_config('ae'), imagenet.get_config(), tiny_imagenet.get_config())
    for method in methods.METHODS:
        yield cifar10.get_config(method)
        yield cpu_protocol.get_config(method)
        for backbone in backbones.BACKBONES:
            yield mini_reproduction.get_config(f'{backbone},{method}')


def test_every_shipped_config_is_valid():
    count = 0
    for config in shipped_configs():
        config_checks.validate(config, num_devices=1)
        count += 1
    assert count == 9 + len(methods.METHODS) * (2 + len(backbones.BACKBONES))


# (field, bad value, the exact message).
BAD_SETTINGS = [
    ('mixup.alpha', -1.0, 'config.mixup.alpha must be > 0 (a finite number): lambda ~ '
     'Beta(alpha, alpha); got -1.0'),
    ('mixup.alpha', float('nan'), 'config.mixup.alpha must be > 0 (a finite number): lambda ~ '
     'Beta(alpha, alpha); got nan'),
    ('mixup.epsilon', 0.0, 'config.mixup.epsilon must be > 0 (a finite number): the entropic '
     'regularisation of Eq. (9); got 0.0'),
    ('mixup.sinkhorn_iters', 0, 'config.mixup.sinkhorn_iters must be an integer >= 1; got 0'),
    ('mixup.cutmix_probability', 1.5,
     'config.mixup.cutmix_probability must be a probability in [0, 1]; got 1.5'),
    ('mixup.cutmix_alpha', 0.0, 'config.mixup.cutmix_alpha must be > 0 (a finite number); '
     'got 0.0'),
    ('train.learning_rate', 0.0, 'config.train.learning_rate must be > 0 (a finite number); '
     'got 0.0'),
    ('train.classifier_learning_rate', -0.1, 'config.train.classifier_learning_rate must be '
     '> 0 (a finite number) (or unset); got -0.1'),
    ('train.decoder_learning_rate', float('inf'), 'config.train.decoder_learning_rate must '
     'be > 0 (a finite number) (or unset); got inf'),
    ('train.num_epochs', 0, 'config.train.num_epochs must be an integer >= 1; got 0'),
    ('train.batch_size', 0, 'config.train.batch_size must be an integer >= 1; got 0'),
    ('train.momentum', 1.0, 'config.train.momentum must be in [0, 1); got 1.0'),
    ('train.weight_decay', -1e-4, 'config.train.weight_decay must be >= 0 (a finite number); '
     'got -0.0001'),
    ('train.contrastive_temperature', 0.0, 'config.train.contrastive_temperature must be > 0 '
     '(a finite number); got 0.0'),
    ('train.eval_every_epochs', 0, 'config.train.eval_every_epochs must be an integer >= 1; '
     'got 0'),
    ('train.lr_decay_epochs', (13, 10), 'config.train.lr_decay_epochs must be increasing '
     'epochs in (0, 15] (config.train.num_epochs; "()" for a constant learning rate); got '
     '(13, 10)'),
    ('train.lr_decay_epochs', (10, 16), 'config.train.lr_decay_epochs must be increasing '
     'epochs in (0, 15] (config.train.num_epochs; "()" for a constant learning rate); got '
     '(10, 16)'),
    ('train.loss_explosion_factor', 1.0, 'config.train.loss_explosion_factor must be > 1 (a '
     'finite number); got 1.0'),
    ('seed', -1, 'config.seed must be an integer >= 0; got -1'),
    ('dataset.std', (0.2, 0.0, 0.2), 'config.dataset.std must be 3 numbers > 0 (one per '
     'channel of config.dataset.mean); got (0.2, 0.0, 0.2)'),
    ('model.dtype', 'float16', "config.model.dtype must be one of float32, bfloat16; got "
     "'float16'"),
    ('model.decoder', 'gan', "config.model.decoder must be one of none, ae, vae; got 'gan'"),
    ('model.swin.num_heads', (3, 6), 'config.model.swin.num_heads must be 4 integers >= 1 '
     '(one per stage of config.model.swin.depths); got (3, 6)'),
    ('train.evals', ('accuracy',), "config.train.evals must be a tuple of evaluation kinds "
     "among classification, robustness, calibration, ood, localization, correspondence; "
     "got ('accuracy',)"),
    ('evals.calibration.num_bins', 0, 'config.evals.calibration.num_bins must be an integer '
     '>= 1; got 0'),
    ('evals.ood.resize', 'stretch', "config.evals.ood.resize must be 'crop' or 'resize'; got "
     "'stretch'"),
    ('mixup.cost_scale', 'median', "config.mixup.cost_scale must be 'none', 'mean' or 'max'; "
     "got 'median'"),
    ('mixup.sinkhorn', 'fast', "config.mixup.sinkhorn must be 'paper' or 'public'; got 'fast'"),
    ('model.init', 'xavier', "config.model.init must be 'torchvision' or 'pytorch'; got "
     "'xavier'"),
]


@pytest.mark.parametrize('field, value, message', BAD_SETTINGS,
                         ids=[f'{field}={value}' for field, value, _ in BAD_SETTINGS])
def test_each_bad_setting_is_one_line_naming_the_field(field, value, message):
    config = demo.get_config()
    config.update_from_flattened_dict({field: value})
    with pytest.raises(ValueError) as raised:
        config_checks.validate(config)
    assert str(raised.value) == message


def test_unknown_modes_reuse_the_modes_own_message():
    config = demo.get_config()
    config.mixup.modes = ('input', 'bogus')
    with pytest.raises(ValueError, match=r"^config\.mixup\.modes must be a non-empty list of "
                                         r".*got \('input', 'bogus'\)"):
        config_checks.validate(config)
    config.mixup.modes = ('hidden3',)  # PreActResNet18 has 4 stages: hidden1-3 exist
    config_checks.validate(config)
    config.model.name = 'wide_resnet16_8'  # 3 groups: hidden3 would be A itself
    with pytest.raises(ValueError, match="'hidden3' needs an encoder with more than 3 stages"):
        config_checks.validate(config)


def test_batch_sizes_must_split_over_the_devices():
    config = demo.get_config()  # batch 128, eval batch 500
    config_checks.validate(config, num_devices=4)
    with pytest.raises(ValueError, match=r'^config\.train\.eval_batch_size must be a multiple '
                                         r'of the number of devices, 8; got 500$'):
        config_checks.validate(config, num_devices=8)
    config.evals.robustness.batch_size = 6
    with pytest.raises(ValueError, match=r'^config\.evals\.robustness\.batch_size must be a '
                                         r'multiple of the number of devices, 4; got 6$'):
        config_checks.validate(config, num_devices=4)


def test_batch_must_fit_in_the_training_set():
    config = demo.get_config()
    config_checks.check_training_set(config, 128)
    with pytest.raises(ValueError, match=r'^config\.train\.batch_size must be at most the '
                                         r'number of training examples, 127; got 128$'):
        config_checks.check_training_set(config, 127)


def test_one_line_errors_turns_user_errors_into_an_error_line_and_lets_bugs_through():
    with pytest.raises(SystemExit) as raised:
        with one_line_errors():
            raise ValueError('config.mixup.alpha must be > 0; got -1')
    assert raised.value.code == 'error: config.mixup.alpha must be > 0; got -1'
    with pytest.raises(KeyError):  # a bug keeps its traceback
        with one_line_errors():
            raise KeyError('params')


@pytest.mark.slow  # compiles or trains for many seconds (see docs/testing.md)
@pytest.mark.parametrize('command', ['alignmix_jax.main', 'alignmix_jax.experiments.bench',
                                     'alignmix_jax.evaluation.classification',
                                     'alignmix_jax.experiments.visualize'])
def test_commands_print_one_error_line_before_loading_data(tmp_path, command):
    """Also: the evaluation command and the pictures check the settings before the checkpoint
    (there is none in tmp_path) or the data."""
    start = time.time()
    workdir = [] if command == 'alignmix_jax.experiments.bench' else [f'--workdir={tmp_path}']
    result = subprocess.run(
        [sys.executable, '-m', command, '--config=configs/demo.py', *workdir,
         '--config.mixup.sinkhorn_iters=0', '--config.model.decoder=ae'],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    elapsed = time.time() - start
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == \
        'error: config.mixup.sinkhorn_iters must be an integer >= 1; got 0'
    assert 'Traceback' not in result.stderr
    assert 'Config:' not in result.stderr  # main stopped before logging the config
    print(f'{command}: {elapsed:.1f} s')


# Settings given on the command line, the first line each prints, in a process that must not
# have imported JAX, Flax, ott-jax or TensorFlow when it prints it (their imports take seconds).
MAIN_BAD_SETTINGS = [
    (['--config.mixup.alpha=-1'],
     'error: config.mixup.alpha must be > 0 (a finite number): lambda ~ Beta(alpha, alpha); '
     'got -1.0'),
    (["--config.mixup.modes=('bogus',)"], "error: config.mixup.modes must be a non-empty list "
     "of ('input', 'embedding', 'feature', 'feature_prime', 'embedding_tensor', "
     "'embedding_tensor_prime', 'none', 'cutmix', 'hidden1', 'hidden2', 'hidden3'); got "
     "('bogus',) ('clean' needs config.model.decoder 'ae' or 'vae')"),
    (['--config.model.name=resnet99'], "error: unknown model name 'resnet99'; valid names: "
     'preact_resnet18, wide_resnet16_8, resnet50, vgg16_gap, mobilenet_v2, vit_small, '
     'swin_tiny'),
    (['--config.model.name=vit_small', '--config.model.init=pytorch'],
     "error: model.init='pytorch' is for the convolutional networks (preact_resnet18, "
     "wide_resnet16_8, resnet50, vgg16_gap, mobilenet_v2); set model.init='torchvision' for "
     'vit_small'),
    (['--config.mixup.sinkhorn=public', '--config.mixup.cost_scale=mean'],
     "error: config.mixup.cost_scale must be 'none' with config.mixup.sinkhorn='public' (the "
     "public loop solves the unscaled cost); got 'mean'"),
    (['--config.train.batch_size=5001'], 'error: config.train.batch_size must be at most the '
     'number of training examples, 5000; got 5001'),  # the demo's 5,000, before decoding
    (['--config.dataset.name=cifar10', '--config.dataset.train_subset=100'],
     'error: config.train.batch_size must be at most the number of training examples, 100; '
     'got 128'),
]
_RUN_MAIN = """
import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_module('alignmix_jax.main', run_name='__main__', alter_sys=True)
except SystemExit as exit:
    print(exit.code)
    print(sorted(name for name in ('flax', 'jax', 'ott', 'tensorflow') if name in sys.modules))
"""


def test_main_reports_a_bad_setting_before_importing_jax_or_tensorflow(tmp_path):
    """The cause of a slow error is the import of JAX and TensorFlow (seconds); main checks
    every setting, and the batch size against a training set of known size, before them."""
    for flags_given, message in MAIN_BAD_SETTINGS:
        result = subprocess.run(
            [sys.executable, '-c', _RUN_MAIN, 'main', '--config=configs/demo.py',
             f'--workdir={tmp_path}', *flags_given],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
        assert result.stdout.splitlines() == [message, '[]'], (flags_given, result.stderr)
