"""Every setting of a run checked before anything is loaded or compiled.

    config_checks.validate(config)                       at a command's start (no devices yet)
    config_checks.validate(config, num_devices=8)        once the devices are known
    config_checks.check_training_set(config, 5000)       once the training set's size is known

Each raises ValueError with one line naming the field, its valid range and the value given,
which the commands print as `error: ...` (alignmix_jax/runtime/command_line.py). A setting that
would train on silently (alpha <= 0 draws lambda 0 on every step, epsilon 0 turns the plan into NaN)
or fail deep inside a library after compiling (0 Sinkhorn iterations) stops here instead.

Fields that only some configs have (e.g. `dataset.image_size`, `evals.localization`) are
checked when present; an unset optional field (None) is not checked. The colour jitter and
rotation ranges are checked by the augmentation itself (alignmix_jax.data.augmentation), at the
first trace.
"""

import math
from collections.abc import Callable

import ml_collections

# Only modules that import no JAX, Flax, ott-jax or TensorFlow: the check runs (and a bad setting
# is reported) before those seconds-long imports.
from alignmix_jax.settings import config_choices


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isfinite(value)


def _positive(value) -> bool:
    return _number(value) and value > 0


def _non_negative(value) -> bool:
    return _number(value) and value >= 0


def _probability(value) -> bool:
    return _number(value) and 0 <= value <= 1


def _integer_at_least(minimum: int) -> Callable[[object], bool]:
    return lambda value: isinstance(value, int) and not isinstance(value, bool) and \
        value >= minimum


def _one_of(choices: tuple[str, ...]) -> Callable[[object], bool]:
    return lambda value: value in choices


def _names(choices: tuple[str, ...]) -> str:
    """'a', 'b' or 'c'."""
    quoted = [repr(choice) for choice in choices]
    return ', '.join(quoted[:-1]) + ' or ' + quoted[-1] if len(quoted) > 1 else quoted[0]


_POSITIVE, _NON_NEGATIVE = '> 0 (a finite number)', '>= 0 (a finite number)'
_PROBABILITY = 'a probability in [0, 1]'

# (field, test, valid range as the message says it). Every numeric field of
# configs/default.py (and of the dataset configs that add their own) where a bad value is
# possible.
_RULES = (
    ('seed', _integer_at_least(0), 'an integer >= 0'),
    ('dataset.train_subset', _integer_at_least(0), 'an integer >= 0 (0: every image)'),
    ('dataset.crop_padding', _integer_at_least(0), 'an integer >= 0'),
    ('dataset.image_size', _integer_at_least(1), 'an integer >= 1'),
    ('dataset.train_resize', _integer_at_least(1), 'an integer >= 1'),
    ('dataset.eval_resize', _integer_at_least(1), 'an integer >= 1'),
    ('model.width', _positive, _POSITIVE),
    ('model.embedding_dim', _integer_at_least(0), 'an integer >= 0'),
    ('model.last_stride', lambda value: value in (1, 2), '1 or 2'),
    ('model.feature_pool', _integer_at_least(1), 'an integer >= 1'),
    ('model.decoder_channels', _integer_at_least(1), 'an integer >= 1'),
    ('model.embedding_tensor_channels', _integer_at_least(0), 'an integer >= 0'),
    ('model.vit.patch_size', _integer_at_least(1), 'an integer >= 1'),
    ('model.vit.depth', _integer_at_least(1), 'an integer >= 1'),
    ('model.vit.num_heads', _integer_at_least(1), 'an integer >= 1'),
    ('model.vit.mlp_ratio', _positive, _POSITIVE),
    ('model.vit.head_blocks', _integer_at_least(0), 'an integer >= 0'),
    ('model.swin.patch_size', _integer_at_least(1), 'an integer >= 1'),
    ('model.swin.window_size', _integer_at_least(1), 'an integer >= 1'),
    ('model.swin.mlp_ratio', _positive, _POSITIVE),
    ('mixup.alpha', _positive, _POSITIVE + ': lambda ~ Beta(alpha, alpha)'),
    ('mixup.epsilon', _positive, _POSITIVE + ': the entropic regularisation of Eq. (9)'),
    ('mixup.sinkhorn_iters', _integer_at_least(1), 'an integer >= 1'),
    ('mixup.cutmix_probability', _probability, _PROBABILITY),
    ('mixup.sinkhorn', _one_of(config_choices.SINKHORNS), _names(config_choices.SINKHORNS)),
    ('mixup.prime_plan', _one_of(config_choices.PRIME_PLANS),
     _names(config_choices.PRIME_PLANS)),
    ('mixup.cost_scale', _one_of(config_choices.COST_SCALES),
     _names(config_choices.COST_SCALES)),
    ('mixup.sinkhorn_threshold', _positive, _POSITIVE),
    ('model.init', _one_of(config_choices.INITS), _names(config_choices.INITS)),
    ('mixup.cutmix_alpha', _positive, _POSITIVE),
    ('train.batch_size', _integer_at_least(1), 'an integer >= 1'),
    ('train.num_epochs', _integer_at_least(1), 'an integer >= 1'),
    ('train.learning_rate', _positive, _POSITIVE),
    ('train.classifier_learning_rate', _positive, _POSITIVE + ' (or unset)'),
    ('train.decoder_learning_rate', _positive, _POSITIVE + ' (or unset)'),
    ('train.lr_decay_factor', lambda value: _positive(value) and value <= 1, 'in (0, 1]'),
    ('train.momentum', lambda value: _number(value) and 0 <= value < 1, 'in [0, 1)'),
    ('train.weight_decay', _non_negative, _NON_NEGATIVE),
    ('train.kl_weight', _non_negative, _NON_NEGATIVE),
    ('train.contrastive_weight', _non_negative, _NON_NEGATIVE),
    ('train.contrastive_temperature', _positive, _POSITIVE),
    ('train.eval_batch_size', _integer_at_least(1), 'an integer >= 1'),
    ('train.eval_every_epochs', _integer_at_least(1), 'an integer >= 1'),
    ('train.log_every_steps', _integer_at_least(1), 'an integer >= 1'),
    ('train.checkpoint_every_steps', _integer_at_least(1), 'an integer >= 1'),
    ('train.keep_checkpoints', _integer_at_least(1), 'an integer >= 1'),
    ('train.loss_explosion_factor', lambda value: _number(value) and value > 1,
     '> 1 (a finite number)'),
    ('evals.robustness.fgsm_epsilon', _non_negative, _NON_NEGATIVE),
    ('evals.robustness.pgd_epsilon', _non_negative, _NON_NEGATIVE),
    ('evals.robustness.pgd_step_size', _non_negative, _NON_NEGATIVE),
    ('evals.robustness.pgd_steps', _integer_at_least(0), 'an integer >= 0'),
    ('evals.robustness.num_examples', _integer_at_least(0), 'an integer >= 0 (0: all)'),
    ('evals.calibration.num_bins', _integer_at_least(1), 'an integer >= 1'),
    ('evals.ood.num_noise_images', _integer_at_least(0), 'an integer >= 0'),
    ('evals.ood.resize', lambda value: value in ('crop', 'resize'), "'crop' or 'resize'"),
    ('evals.localization.cam_threshold', _probability, _PROBABILITY),
)

_MISSING = object()


def _field(config: ml_collections.ConfigDict, path: str):
    """The value at 'a.b.c', or _MISSING when the config has no such field."""
    node = config
    for key in path.split('.'):
        if not isinstance(node, ml_collections.ConfigDict) or key not in node:
            return _MISSING
        node = node[key]
    return node


def _fail(path: str, valid: str, value) -> ValueError:
    return ValueError(f'config.{path} must be {valid}; got {value!r}')


def validate(config: ml_collections.ConfigDict, *, num_devices: int | None = None) -> None:
    """Raises ValueError (one line: the field, its valid range, the value) on the first bad
    setting. `num_devices`: also check that the batch sizes split evenly over the devices."""
    for path, is_valid, valid in _RULES:
        value = _field(config, path)
        if value is not _MISSING and value is not None and not is_valid(value):
            raise _fail(path, valid, value)
    _check_sequences(config)
    _check_names(config)
    _check_mixup_options(config.mixup)
    _check_schedule(config.train)
    if num_devices is not None:
        _check_divisible(config, num_devices)


def _check_sequences(config: ml_collections.ConfigDict) -> None:
    std = tuple(config.dataset.std)
    if len(std) != len(tuple(config.dataset.mean)) or not all(map(_positive, std)):
        raise _fail('dataset.std', f'{len(tuple(config.dataset.mean))} numbers > 0 (one per '
                    f'channel of config.dataset.mean)', std)
    swin = _field(config, 'model.swin')
    if swin is not _MISSING:
        depths, heads = tuple(swin.depths), tuple(swin.num_heads)
        if not depths or not all(map(_integer_at_least(1), depths)):
            raise _fail('model.swin.depths', 'a non-empty tuple of integers >= 1', depths)
        if len(heads) != len(depths) or not all(map(_integer_at_least(1), heads)):
            raise _fail('model.swin.num_heads', f'{len(depths)} integers >= 1 (one per stage '
                        f'of config.model.swin.depths)', heads)
    vit = _field(config, 'model.vit')
    if vit is not _MISSING and vit.head_blocks > vit.depth:
        raise _fail('model.vit.head_blocks', f'at most config.model.vit.depth, {vit.depth}',
                    vit.head_blocks)


def _check_names(config: ml_collections.ConfigDict) -> None:
    """Model name, init, dtype and decoder; the mixup modes (validate_modes's own rules)."""
    model_config = config.model
    config_choices.check_model_name(model_config.name)  # one line naming the valid names
    config_choices.check_init(model_config.init, model_config.name)
    if model_config.dtype not in config_choices.DTYPES:
        raise _fail('model.dtype', f'one of {", ".join(config_choices.DTYPES)}',
                    model_config.dtype)
    if model_config.decoder not in config_choices.DECODER_TYPES:
        raise _fail('model.decoder', f'one of {", ".join(config_choices.DECODER_TYPES)}',
                    model_config.decoder)
    config_choices.validate_modes(
        config.mixup.modes, with_decoder=model_config.decoder != 'none',
        encoder_stages=config_choices.ENCODER_STAGES[model_config.name])
    unknown = [kind for kind in config.train.evals if kind not in config_choices.EVALUATION_KINDS]
    if unknown:
        raise _fail('train.evals', f'a tuple of evaluation kinds among '
                    f'{", ".join(config_choices.EVALUATION_KINDS)}', tuple(config.train.evals))


def _check_mixup_options(mixup_config: ml_collections.ConfigDict) -> None:
    """timm's four options (label smoothing, probability, off epoch, lambda per), by
    config_choices.check_options's own rules; the public Sinkhorn loop's unscaled cost."""
    config_choices.check_options(label_smoothing=mixup_config.label_smoothing,
                                 probability=mixup_config.probability,
                                 off_epoch=mixup_config.off_epoch,
                                 lambda_per=mixup_config.lambda_per)
    if mixup_config.sinkhorn == 'public' and mixup_config.cost_scale != 'none':
        raise _fail('mixup.cost_scale', "'none' with config.mixup.sinkhorn='public' (the "
                    'public loop solves the unscaled cost)', mixup_config.cost_scale)


def _check_schedule(train_config: ml_collections.ConfigDict) -> None:
    """The decay epochs lie within the schedule, in increasing order."""
    epochs = tuple(train_config.lr_decay_epochs)
    within = all(_positive(epoch) and epoch <= train_config.num_epochs for epoch in epochs)
    if not within or list(epochs) != sorted(set(epochs)):
        raise _fail('train.lr_decay_epochs',
                    f'increasing epochs in (0, {train_config.num_epochs}] (config.train.'
                    f'num_epochs; "()" for a constant learning rate)', epochs)


def _check_divisible(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Global batches are split evenly over the devices (alignmix_jax/runtime/sharding.py)."""
    batch_sizes = [('train.batch_size', config.train.batch_size),
                   ('train.eval_batch_size', config.train.eval_batch_size)]
    batch_sizes += [(f'evals.{kind}.batch_size', options.batch_size)
                    for kind, options in config.evals.items()
                    if options.batch_size]  # 0: train.eval_batch_size
    for path, batch_size in batch_sizes:
        if batch_size % num_devices:
            raise _fail(path, f'a multiple of the number of devices, {num_devices}', batch_size)


def check_training_set(config: ml_collections.ConfigDict, num_train_examples: int) -> None:
    """The global batch fits in the training set (each epoch drops its incomplete batch);
    call it as soon as the dataset's size is known, before compiling."""
    batch_size = config.train.batch_size
    if batch_size > num_train_examples:
        raise _fail('train.batch_size', f'at most the number of training examples, '
                    f'{num_train_examples}', batch_size)
