"""The PyTorch side of `python -m alignmix_jax.experiments.bench --torch`: the step of the public
CIFAR code (alignmix_jax/pytorch/torch_reference.py, the transcription the parity tests check),
built from our initial weights, and our config set to compute that same step, so the two are timed
on the same work; and the side-by-side lines of the table. torch is imported only here, lazily.
"""

from alignmix_jax.runtime.command_line import repository_configs

# The modes --torch compares: those torch_reference transcribes as the public code runs them.
TORCH_MODES = ('none', 'input', 'feature')
# Our side of --torch: the step torch_reference computes (the public head and Sinkhorn loop,
# no extras of this project that change the loss); the config's other fields are kept.
TORCH_COMPARISON = {
    'model.head_norm': False, 'model.embedding_dim': 0, 'model.flatten_features': False,
    'model.last_stride': 2, 'model.feature_pool': 1, 'model.decoder': 'none',
    'model.embedding_tensor_channels': 0, 'model.init': 'pytorch',
    'model.preact_resnet18.shortcut': 'preactivated',
    'mixup.modes': TORCH_MODES, 'mixup.align': True, 'mixup.sinkhorn': 'public',
    'mixup.cost_scale': 'none', 'mixup.lambda_per': 'batch', 'mixup.label_smoothing': 0.0,
    'mixup.allow_inert_alignment': True, 'train.nesterov': False,
    'train.contrastive_weight': 0.0, 'train.classifier_learning_rate': None,
    'train.decoder_learning_rate': None,
}
TORCH_PIN = 'pip install torch==2.13.0'


def import_torch(needed_by: str = '--torch times the PyTorch transcription of the public code'):
    """torch, or a ValueError (one `error:` line on the command line) saying how to get it
    (`needed_by`: what needs it, the start of that line)."""
    try:
        import torch
    except ImportError:
        raise ValueError(f'{needed_by} and needs PyTorch: {TORCH_PIN} (the CPU build is '
                         f'enough)') from None
    return torch


def torch_comparison_config(config):
    """(a copy of `config` set to the step torch_reference computes, the fields changed as
    ['field=new (config: old)', ...]). Refuses a config torch_reference has no network for."""
    if config.model.name != 'preact_resnet18':
        raise ValueError(f'--torch compares the PreActResNet18 of the public CIFAR code; '
                         f'config.model.name is {config.model.name!r}')
    backbones = repository_configs('backbones')
    compared = config.copy_and_resolve_references()
    changed = []
    for field, value in TORCH_COMPARISON.items():
        node = compared
        *sections, key = field.split('.')
        for section in sections:
            node = node[section]
        old = node.get(key)
        if old != value and not (isinstance(old, tuple | list) and tuple(old) == value):
            changed.append(f'{field}={value!r} (config: {old!r})')
    with compared.unlocked():
        backbones.set_fields(compared, TORCH_COMPARISON)
    return compared, changed


def torch_device(jax_platform: str) -> str:
    """Where torch runs beside us: 'cuda' when JAX runs on a GPU and torch sees one, else
    'cpu'."""
    torch = import_torch()
    return 'cuda' if jax_platform == 'gpu' and torch.cuda.is_available() else 'cpu'


def torch_settings(device: str, dtype: str) -> dict:
    """How torch computes on `device` for our computation `dtype`: on CUDA, bfloat16 through
    autocast (float32 parameters, optimizer and Sinkhorn, as ours), channels-last tensors
    (cuDNN's fast layout, as XLA's NHWC) and cuDNN's benchmark mode (it times the convolution
    algorithms once per shape, as XLA autotunes its own); on the CPU, float32 and torch's
    default layout, as the CPU comparison has always run."""
    on_cuda = device == 'cuda'
    return {'device': device, 'autocast_bfloat16': on_cuda and dtype == 'bfloat16',
            'channels_last': on_cuda, 'cudnn_benchmark': on_cuda}


def make_torch_step(config, variables, num_classes: int, *, device: str = 'cpu',
                    autocast_bfloat16: bool = False, channels_last: bool = False):
    """torch_reference's model and SGD, loaded with our Flax `variables` (the public head), on
    `device`, and `step(images, labels, permutation, lam, mode)` -> its train_step's result,
    with the config's Sinkhorn settings, returning once the device has finished the step.

    `autocast_bfloat16`: the step under `torch.autocast(dtype=bfloat16)` (the backward pass
    and the SGD update too, which keep float32 parameters); `channels_last`: the model's
    weights in that memory format (give it channels-last images too).
    """
    from alignmix_jax.pytorch import torch_reference
    torch = import_torch()
    model = torch_reference.build_classifier(num_classes, config.model.width)
    torch_reference.load_flax_variables(model, variables)
    model = model.to(device=device, memory_format=torch.channels_last if channels_last
                     else torch.contiguous_format)
    train = config.train
    # After the move: SGD's momentum buffers live where the parameters do.
    optimizer = torch_reference.make_optimizer(model, train.learning_rate, train.momentum,
                                               train.weight_decay)
    mixup = config.mixup
    device_type = torch.device(device).type

    def step(images, labels, permutation, lam, mode):
        with torch.autocast(device_type=device_type, dtype=torch.bfloat16,
                            enabled=autocast_bfloat16):
            result = torch_reference.train_step(
                model, optimizer, images, labels, permutation, lam, mode, epsilon=mixup.epsilon,
                max_iters=mixup.sinkhorn_iters, threshold=mixup.sinkhorn_threshold)
        if device_type == 'cuda':
            torch.cuda.synchronize()
        return result
    return step


def format_torch_table(result: dict) -> list[str]:
    """The side-by-side lines of a `benchmark(..., torch=True)` result."""
    about = result['torch']
    where = ('the CPU' if about.get('device', 'cpu') == 'cpu'
             else f'{about["device"]} ({about.get("device_name", "?")})')
    lines = ['', f'the same step in PyTorch {about["version"]} on {where} ({about["dtype"]}'
             f'{", channels-last" if about.get("channels_last") else ""}, '
             f'torch.get_num_threads() = {about["threads"]}), interleaved with ours',
             f'{"mode":<12}{"ours ms":>10}{"torch ms":>10}{"ours/torch":>12}'
             f'{"Sinkhorn its (ours, torch)":>28}']
    for mode, ms in result['step_ms'].items():
        iterations = result['sinkhorn_iterations'].get(mode)
        iterations = '-' if iterations is None else (f'{iterations["ours"]}, '
                                                     f'{iterations["torch"]}')
        name = mode + (' *' if mode in result['sinkhorn_iterations'] else '')
        lines.append(f'{name:<12}{ms:>10.1f}{result["torch_step_ms"][mode]:>10.1f}'
                     f'{result["ratio_to_torch"][mode]:>12.3f}{iterations:>28}')
    if result['sinkhorn_iterations']:
        lines.append("* torch's Sinkhorn reads its stopping test back to the host every "
                     'iteration (.item(), as the public code); timed as is')
    lines.append('ours only: on-device crop/flip/normalisation, the alignment_effect '
                 'measurement, the finite-state check')
    if about['overrides']:
        lines.append('our side set to the step torch computes: ' + ', '.join(about['overrides']))
    return lines
