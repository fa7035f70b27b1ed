"""The values a config's named settings may take, and their checks, with no JAX import.

The mixup modes (Algorithm 1's choices and the baselines'), the per-batch or per-pair lambda,
the Sinkhorn variants and cost scales, the model names with their stage counts, the
computation dtypes, decoders and initialisations. `config_checks` reads them to refuse a bad
setting before JAX, Flax, ott-jax or TensorFlow is imported (those imports take seconds; the
error comes at once). `mixup`, `alignment` and `models` use the same names, imported from here,
so each name is written once.
"""

# 'feature_prime' is Algorithm 1's feat': the feature mode with the pair (and the labels)
# swapped, so that A' is aligned to A and mixed by Eq. (13) instead of Eq. (12).
INPUT_MODE = 'input'  # Eq. (3): mix x
EMBEDDING_MODE = 'embedding'  # Eq. (5): mix e
FEATURE_MODE = 'feature'  # Eq. (12): mix A with A~, A's partner aligned to A
FEATURE_PRIME_MODE = 'feature_prime'  # Eq. (13)
MODES = (INPUT_MODE, EMBEDDING_MODE, FEATURE_MODE, FEATURE_PRIME_MODE)
FEATURE_MODES = (FEATURE_MODE, FEATURE_PRIME_MODE)
# Table 8's {x, E}: the same two modes on the embedding tensor E instead of A (models with
# embedding_tensor_channels > 0).
EMBEDDING_TENSOR_MODE = 'embedding_tensor'
EMBEDDING_TENSOR_PRIME_MODE = 'embedding_tensor_prime'
TENSOR_EMBEDDING_MODES = (EMBEDDING_TENSOR_MODE, EMBEDDING_TENSOR_PRIME_MODE)
# Modes that swap the pair and the labels (Algorithm 1, line 17).
SWAPPED_MODES = (FEATURE_PRIME_MODE, EMBEDDING_TENSOR_PRIME_MODE)
# AlignMixup/AE's fifth choice (Algorithm 1, lines 5-7): no mixup, reconstruction of x.
CLEAN_MODE = 'clean'
# The baselines' modes: no mixup, CutMix, and mixing the output of stage k of F (manifold
# mixup's hidden layers; which k exist depends on the encoder).
NO_MIXUP_MODE = 'none'
CUTMIX_MODE = 'cutmix'
HIDDEN_MODES = ('hidden1', 'hidden2', 'hidden3')
BASELINE_MODES = (NO_MIXUP_MODE, CUTMIX_MODE) + HIDDEN_MODES
ALL_MODES = MODES + TENSOR_EMBEDDING_MODES + BASELINE_MODES + (CLEAN_MODE,)
# One lambda per batch, or one per pair (config.mixup.lambda_per).
LAMBDA_PER = ('batch', 'example')
# config.mixup.sinkhorn and config.mixup.prime_plan (`mixup.align_and_mix`): the paper's
# fixed-length loop and fresh plan for feat', or the public CIFAR code's early-stopping loop and
# reused plan.
SINKHORNS = ('paper', 'public')
PRIME_PLANS = ('fresh', 'reuse')
# config.mixup.cost_scale (`alignment.transport_plan`): the paper's absolute epsilon ('none'),
# or each pair's cost divided by its mean or max first.
COST_SCALES = ('none', 'mean', 'max')

# config.model.name -> the number of stages of its encoder F (representations 1..stages-1 are
# the hidden ones of manifold mixup). The encoder classes (models/classifier.py's ENCODERS)
# are the source; tests/test_config_choices.py checks this table against them.
ENCODER_STAGES = {
    'preact_resnet18': 4,
    'wide_resnet16_8': 3,
    'resnet50': 4,
    'vgg16_gap': 1,
    'mobilenet_v2': 4,
    'vit_small': 4,
    'swin_tiny': 4,
}
# config.model.dtype: the network's computation dtype (models.DTYPES maps it to JAX's).
DTYPES = ('float32', 'bfloat16')

# The evaluation kinds, each the module alignmix_jax.evaluation.<kind> with its `Evaluator`
# class (config.train.evals names them); add a new kind here.
EVALUATION_KINDS = ('classification', 'robustness', 'calibration', 'ood', 'localization',
                    'correspondence')
# config.model.decoder: no decoder (AlignMixup), a vanilla or a variational autoencoder.
DECODER_TYPES = ('none', 'ae', 'vae')
# config.model.init: 'torchvision', each layer's own initialiser (the convolutions' kaiming
# normal fan_out, Dense kernels U(+-1/sqrt(fan_in)) with zero bias, timm's for the
# transformers); 'pytorch', PyTorch's reset_parameters of nn.Conv2d and nn.Linear for every
# Conv and Dense of F, f and g (models/layers.py, pytorch_default_init).
INITS = ('torchvision', 'pytorch')
# Encoders whose parameters are all Conv, Dense and BatchNorm (the transformers' attention
# kernels have no PyTorch counterpart of that shape: they keep timm's initialisation).
PYTORCH_INIT_ENCODERS = ('preact_resnet18', 'wide_resnet16_8', 'resnet50', 'vgg16_gap',
                         'mobilenet_v2')


def hidden_stage(mode: str) -> int:
    """The stage k whose output a 'hiddenk' mode mixes."""
    if mode not in HIDDEN_MODES:
        raise ValueError(f'{mode!r} is not one of the hidden-stage modes {HIDDEN_MODES}')
    return int(mode.removeprefix('hidden'))


def validate_modes(modes, *, with_decoder: bool = False,
                   encoder_stages: int = 4) -> tuple[str, ...]:
    """The modes to draw from, as a tuple; raises a one-line error naming unknown ones.

    With a decoder, 'clean' joins the listed mixup modes (Algorithm 1, line 2: five choices
    drawn uniformly), unless it is listed already (list it twice to draw it twice as often).
    Without one, 'clean' is an error. 'hiddenk' needs an encoder of more than k stages
    (`encoder_stages`; the output of the last one is A, mixed by the feature modes).
    """
    modes = tuple(modes)
    valid = ALL_MODES if with_decoder else MODES + TENSOR_EMBEDDING_MODES + BASELINE_MODES
    unknown = [mode for mode in modes if mode not in valid]
    if not modes or unknown:
        raise ValueError(
            f'config.mixup.modes must be a non-empty list of {valid}; got {modes}'
            + ('' if with_decoder else " ('clean' needs config.model.decoder 'ae' or 'vae')"))
    too_deep = [mode for mode in modes
                if mode in HIDDEN_MODES and hidden_stage(mode) >= encoder_stages]
    if too_deep:
        hidden = HIDDEN_MODES[:max(encoder_stages - 1, 0)]
        raise ValueError(f'config.mixup.modes: {too_deep[0]!r} needs an encoder with more than '
                         f'{hidden_stage(too_deep[0])} stages; this one has {encoder_stages} '
                         f'(hidden modes: {hidden or "none"})')
    if with_decoder and CLEAN_MODE not in modes:
        modes += (CLEAN_MODE,)
    return modes


def check_options(*, label_smoothing: float = 0.0, probability: float = 1.0,
                  off_epoch: int | None = None, lambda_per: str = 'batch') -> None:
    """Raises a one-line error for a timm option out of range (config.mixup's four fields);
    the train step can call it once with the config's values before it compiles. Values that
    are not Python numbers (traced arrays) are left to the caller."""
    if isinstance(label_smoothing, (int, float)) and not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f'config.mixup.label_smoothing must lie in [0, 1); got '
                         f'{label_smoothing}')
    if isinstance(probability, (int, float)) and not 0.0 <= probability <= 1.0:
        raise ValueError(f'config.mixup.probability must lie in [0, 1]; got {probability}')
    if off_epoch is not None and off_epoch < 0:
        raise ValueError(f'config.mixup.off_epoch must be None or an epoch >= 0; got '
                         f'{off_epoch}')
    if lambda_per not in LAMBDA_PER:
        raise ValueError(f'config.mixup.lambda_per must be one of {LAMBDA_PER}; got '
                         f'{lambda_per!r}')


def check_model_name(name: str) -> None:
    """A one-line error for an unknown `model.name`, naming the valid ones."""
    if name not in ENCODER_STAGES:
        raise ValueError(f'unknown model name {name!r}; valid names: '
                         f'{", ".join(ENCODER_STAGES)}')


def check_init(init: str, encoder_name: str) -> None:
    """A one-line error for an unknown `model.init` or 'pytorch' on a transformer."""
    if init not in INITS:
        raise ValueError(f'unknown model.init {init!r}; valid: {", ".join(INITS)}')
    if init == 'pytorch' and encoder_name not in PYTORCH_INIT_ENCODERS:
        raise ValueError(f"model.init='pytorch' is for the convolutional networks "
                         f"({', '.join(PYTORCH_INIT_ENCODERS)}); set model.init='torchvision' "
                         f'for {encoder_name}')
