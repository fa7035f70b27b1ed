"""A PyTorch transcription of the public AlignMixup CIFAR training step, for parity checks.

Written here from the public code (its cifar10_100/models/resnet.py, resnet18_classifier.py,
main.py and utils/OT.py), read for what it computes; nothing is copied. What it transcribes:

- `build_classifier`: its PreActResNet18 (a 3x3 stem with BatchNorm + ReLU, four stages of two
  pre-activation blocks whose shortcut adds the pre-activated input relu(bn1(x)), also where
  the shape is kept, no normalisation after the last one) with a width multiplier, and its
  head: 4x4 average pooling, then one Linear layer. Our side computes the same network with
  `model.preact_resnet18.shortcut='preactivated'`. Every layer keeps PyTorch's default
  initialisation (Conv2d and Linear: kaiming-uniform with a = sqrt(5), Linear's bias
  U(+-1/sqrt(fan_in)); BatchNorm2d: scale 1, bias 0, momentum 0.1, eps 1e-5, running variance
  unbiased).
- `sinkhorn_plan`: its Sinkhorn loop (log domain, u then v, stop once the batch mean of the L1
  change of u is below the threshold, 1e-8 inside the logarithms).
- `train_step`: one SGD step (torch.optim.SGD: momentum, weight decay added to the gradient,
  no dampening, no Nesterov) on the loss lam CE(y) + (1 - lam) CE(y[pi]) of one mode:
  'none' (clean images, hard labels), 'input' (lam x + (1 - lam) x[pi]), 'feature'
  (lam A + (1 - lam) A~ with A~ = A' R^T) and 'feature_prime' (lam A~' + (1 - lam) A' with
  A~' = A R, the same plan R reused), where A' = A[pi] and R = r P, P the plan from A to A'.
  Unlike the public code, the permutation and lambda are arguments, so both sides of a parity
  test can be given the same ones.
- `load_flax_variables` / `flax_tree`: copy this project's Flax variables of
  `Classifier(encoder_name='preact_resnet18', use_head_norm=False, embedding_dim=0)` (the same
  tree for either shortcut) into the
  torch model, and read the torch state (or its gradients) back in the Flax tree layout.

Images are NCHW float32 tensors, already augmented and normalised (`to_torch_images` converts
this project's NHWC arrays). torch is imported only inside the functions: importing the
package never needs it, and training never imports this module.
"""

import functools

import numpy as np

MODES = ('none', 'input', 'feature', 'feature_prime')
_STAGE_CHANNELS = (64, 128, 256, 512)
_STAGE_STRIDES = (1, 2, 2, 2)


def _torch():
    try:
        import torch
    except ImportError as error:
        raise ImportError('alignmix_jax.pytorch.torch_reference needs PyTorch: pip install torch '
                          '(the CPU build is enough)') from error
    return torch


def _channels(channels: int, width: float) -> int:
    # The same rounding as models.preact_resnet.scaled_channels, so the trees line up.
    return max(1, int(round(channels * width)))


@functools.cache
def _modules():
    """The torch module classes, defined on first use so that torch is imported lazily."""
    torch = _torch()
    nn, functional = torch.nn, torch.nn.functional

    class PreActBlock(nn.Module):
        # As the public block: its shortcut always applies to the pre-activated input, an
        # empty nn.Sequential (so relu(bn1(x)) itself) where the shape is kept, a 1x1
        # convolution where it changes. Its state_dict names are the public ones
        # (shortcut.0.weight for the projection).
        def __init__(self, in_channels, channels, stride):
            super().__init__()
            self.bn1 = nn.BatchNorm2d(in_channels)
            self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(channels)
            self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
            self.shortcut = nn.Sequential()
            if stride != 1 or in_channels != channels:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_channels, channels, 1, stride, bias=False))

        def forward(self, x):
            preactivated = functional.relu(self.bn1(x))
            shortcut = self.shortcut(preactivated)
            out = self.conv1(preactivated)
            return self.conv2(functional.relu(self.bn2(out))) + shortcut

    class PreActResNet18(nn.Module):
        def __init__(self, width):
            super().__init__()
            stem_channels = _channels(64, width)
            self.conv1 = nn.Conv2d(3, stem_channels, 3, 1, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(stem_channels)
            in_channels = stem_channels
            for stage, (channels, stride) in enumerate(zip(_STAGE_CHANNELS, _STAGE_STRIDES,
                                                           strict=True), start=1):
                channels = _channels(channels, width)
                blocks = [PreActBlock(in_channels, channels, stride),
                          PreActBlock(channels, channels, 1)]
                setattr(self, f'layer{stage}', nn.Sequential(*blocks))
                in_channels = channels
            self.out_channels = in_channels

        def forward(self, x):
            out = functional.relu(self.bn1(self.conv1(x)))
            return self.layer4(self.layer3(self.layer2(self.layer1(out))))

    class Classifier(nn.Module):
        def __init__(self, num_classes, width):
            super().__init__()
            self.encoder = PreActResNet18(width)
            self.classifier = nn.Linear(self.encoder.out_channels, num_classes)

        def classify(self, features):
            # avg_pool2d(out, 4) on the 4x4 map of CIFAR is the mean over positions.
            return self.classifier(features.mean(dim=(2, 3)))

        def forward(self, x):
            return self.classify(self.encoder(x))

    return Classifier


def build_classifier(num_classes: int = 10, width: float = 1.0, seed: int | None = None):
    """The public CIFAR PreActResNet18 classifier with PyTorch's default initialisation."""
    torch = _torch()
    if seed is not None:
        torch.manual_seed(seed)
    return _modules()(num_classes, width)


def make_optimizer(model, learning_rate: float = 0.1, momentum: float = 0.9,
                   weight_decay: float = 1e-4):
    """The public code's optimizer: torch.optim.SGD over every parameter (BatchNorm's and the
    Linear bias included), weight decay added to the gradient before momentum."""
    return _torch().optim.SGD(model.parameters(), lr=learning_rate, momentum=momentum,
                              weight_decay=weight_decay)


def sinkhorn_plan(x, y, *, epsilon: float = 0.1, max_iters: int = 100,
                  threshold: float = 0.1):
    """The public Sinkhorn loop: (plan (n, r, r), iterations) for positions x, y (n, r, c).

    plan[k, i, j] couples x[k, i] with y[k, j]. The stopping test reads the change of u back to
    the host once per iteration, as the public code does.
    """
    torch = _torch()
    cost = ((x.unsqueeze(-2) - y.unsqueeze(-3)).abs() ** 2).sum(-1)
    num_x, num_y = x.shape[-2], y.shape[-2]
    log_mu = torch.log(torch.full(x.shape[:-1], 1.0 / num_x, device=x.device) + 1e-8)
    log_nu = torch.log(torch.full(y.shape[:-1], 1.0 / num_y, device=y.device) + 1e-8)
    u, v = torch.zeros_like(log_mu), torch.zeros_like(log_nu)

    def exponent(u, v):
        return (-cost + u.unsqueeze(-1) + v.unsqueeze(-2)) / epsilon

    iterations = 0
    for _ in range(max_iters):
        previous_u = u
        u = epsilon * (log_mu - torch.logsumexp(exponent(u, v), dim=-1)) + u
        v = epsilon * (log_nu - torch.logsumexp(exponent(u, v).transpose(-2, -1), dim=-1)) + v
        change = (u - previous_u).abs().sum(-1).mean()
        iterations += 1
        if change.item() < threshold:
            break
    return torch.exp(exponent(u, v)), iterations


def _mixed_logits(model, images, permutation, lam: float, mode: str, sinkhorn_options):
    """Logits of one mode and the Sinkhorn iterations it ran (0 when it ran none)."""
    torch = _torch()
    if mode == 'input':
        images = lam * images + (1 - lam) * images[permutation]
    features = model.encoder(images)
    if mode in ('none', 'input'):
        return model.classify(features), 0
    batch, channels, height, width = features.shape
    anchor = features.reshape(batch, channels, height * width)  # A, (b, c, r)
    partner = anchor[permutation]  # A'
    # At least float32 (also under bfloat16 autocast, as this project's alignment always is);
    # float64 features (the parity tests) keep float64.
    dtype = torch.promote_types(anchor.dtype, torch.float32)
    plan, iterations = sinkhorn_plan(anchor.transpose(1, 2).to(dtype),
                                     partner.transpose(1, 2).to(dtype), **sinkhorn_options)
    assignment = (plan * (height * width)).detach()  # R = r P, no gradient through it
    if mode == 'feature':
        # A~ = A' R^T: position i of A receives sum_j R_ij a'_j.
        mixed = lam * anchor + (1 - lam) * partner @ assignment.transpose(1, 2)
    else:
        # A~' = A R: position j of A' receives sum_i R_ij a_i, the plan of A to A' reused.
        mixed = lam * (anchor @ assignment) + (1 - lam) * partner
    return model.classify(mixed.reshape(features.shape)), iterations


def train_step(model, optimizer, images, labels, permutation, lam: float, mode: str, *,
               epsilon: float = 0.1, max_iters: int = 100, threshold: float = 0.1) -> dict:
    """One SGD step of the public code on a batch; updates `model` and `optimizer` in place.

    Args:
      model, optimizer: from `build_classifier` and `make_optimizer`.
      images: (b, 3, h, w) float32, augmented and normalised (NCHW).
      labels: (b,) int64 class indices.
      permutation: (b,) int64, the partner pi(i) of each example.
      lam: the mixing weight of the step.
      mode: one of MODES.

    Returns:
      {'loss': the loss before the step (float), 'iterations': Sinkhorn iterations (0 when
      none ran), 'grads': parameter name -> gradient, 'state': the model's state_dict after
      the step (updated parameters and BatchNorm running statistics, torch names)}. Tensors
      are the live ones (nothing is copied, so the step can run repeatedly at its own cost):
      clone them to keep them past the next step. `flax_tree(model)` (and `grads=True`)
      reads the same in this project's tree layout.
    """
    torch = _torch()
    if mode not in MODES:
        raise ValueError(f'unknown mode {mode!r}; valid: {", ".join(MODES)}')
    model.train()
    sinkhorn_options = dict(epsilon=epsilon, max_iters=max_iters, threshold=threshold)
    logits, iterations = _mixed_logits(model, images, permutation, lam, mode, sinkhorn_options)
    cross_entropy = torch.nn.functional.cross_entropy
    if mode == 'none':
        loss = cross_entropy(logits, labels)
    else:
        loss = lam * cross_entropy(logits, labels) + (1 - lam) * cross_entropy(
            logits, labels[permutation])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return {'loss': float(loss.detach()), 'iterations': iterations,
            'grads': {name: parameter.grad for name, parameter in model.named_parameters()},
            'state': model.state_dict(keep_vars=True)}


def to_torch_images(images) -> 'object':
    """This project's NHWC float32 images (numpy or jax) as an NCHW torch tensor."""
    return _torch().from_numpy(np.ascontiguousarray(
        np.asarray(images, np.float32).transpose(0, 3, 1, 2)))


# torch BatchNorm2d attribute -> (Flax collection, leaf name)
_NORM_LEAVES = {'weight': ('params', 'scale'), 'bias': ('params', 'bias'),
                'running_mean': ('batch_stats', 'mean'), 'running_var': ('batch_stats', 'var')}


def _flax_paths(model):
    """torch state name -> (collection, Flax path, kind), kind 'conv', 'dense' or 'plain'."""
    paths = {'encoder.conv1.weight': ('params', ('encoder', 'stem', 'kernel'), 'conv')}
    norm_layers = {'encoder.bn1': ('encoder', 'stem_norm')}
    for stage in range(1, len(_STAGE_CHANNELS) + 1):
        for block in (1, 2):
            prefix = f'encoder.layer{stage}.{block - 1}'
            flax_block = ('encoder', f'stage{stage}_block{block}')
            for torch_conv, conv in (('conv1', 'conv1'), ('conv2', 'conv2'),
                                     ('shortcut.0', 'shortcut')):
                paths[f'{prefix}.{torch_conv}.weight'] = (
                    'params', (*flax_block, conv, 'kernel'), 'conv')
            for norm in ('bn1', 'bn2'):
                norm_layers[f'{prefix}.{norm}'] = (*flax_block, f'norm{norm[-1]}')
    for torch_layer, flax_layer in norm_layers.items():
        for attribute, (collection, leaf) in _NORM_LEAVES.items():
            paths[f'{torch_layer}.{attribute}'] = (collection, (*flax_layer, leaf), 'plain')
    paths['classifier.weight'] = ('params', ('classifier', 'kernel'), 'dense')
    paths['classifier.bias'] = ('params', ('classifier', 'bias'), 'plain')
    state = model.state_dict()
    return {name: path for name, path in paths.items() if name in state}


def _to_torch_layout(value: np.ndarray, kind: str) -> np.ndarray:
    if kind == 'conv':  # Flax (kh, kw, in, out) -> torch (out, in, kh, kw)
        return value.transpose(3, 2, 0, 1)
    if kind == 'dense':  # Flax (in, out) -> torch (out, in)
        return value.T
    return value


def _to_flax_layout(value: np.ndarray, kind: str) -> np.ndarray:
    if kind == 'conv':
        return value.transpose(2, 3, 1, 0)
    if kind == 'dense':
        return value.T
    return value


def load_flax_variables(model, variables) -> None:
    """Copies {'params', 'batch_stats'} of this project's PreActResNet18 classifier with the
    public head (`use_head_norm=False`, `embedding_dim=0`) into `model`.

    Raises ValueError naming the first leaf whose shape does not match (another width, a
    head_norm, an embedding layer). BatchNorm's step counters are left as they are.
    """
    torch = _torch()
    state = model.state_dict()
    paths = _flax_paths(model)
    flax_leaves = sum(1 for _ in _leaves(variables.get('params', {})))
    flax_leaves += sum(1 for _ in _leaves(variables.get('batch_stats', {})))
    if flax_leaves != len(paths):
        raise ValueError(f'the Flax variables have {flax_leaves} leaves, the torch model '
                         f'{len(paths)}: build the Flax Classifier with model.head_norm=False, '
                         'embedding_dim=0 and the same width')
    with torch.no_grad():
        for name, (collection, path, kind) in paths.items():
            value = _to_torch_layout(np.asarray(_lookup(variables[collection], path)), kind)
            if tuple(value.shape) != tuple(state[name].shape):
                raise ValueError(f'{"/".join(path)} has shape {value.shape}, torch {name} '
                                 f'{tuple(state[name].shape)}: use the same width and classes')
            state[name].copy_(torch.from_numpy(np.array(value, np.float32)))


def flax_tree(model, *, grads: bool = False) -> dict:
    """The torch model's state as this project's {'params', 'batch_stats'} numpy tree.

    With `grads`, the parameters' gradients instead, as a 'params' tree only. The running
    variances are PyTorch's (unbiased batch variances averaged in), not converted.
    """
    state = model.state_dict()
    named_parameters = dict(model.named_parameters())
    tree = {'params': {}} if grads else {'params': {}, 'batch_stats': {}}
    for name, (collection, path, kind) in _flax_paths(model).items():
        if grads:
            if collection != 'params':
                continue
            tensor = named_parameters[name].grad
        else:
            tensor = state[name]
        node = tree[collection]
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = _to_flax_layout(tensor.detach().cpu().numpy(), kind)
    return tree


def _lookup(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _leaves(tree):
    for value in tree.values():
        if hasattr(value, 'items'):
            yield from _leaves(value)
        else:
            yield value
