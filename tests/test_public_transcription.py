"""torch_reference against the public AlignMixup CIFAR code's own structure.

tests/test_step_parity.py checks our Flax step against `alignmix_jax.pytorch.torch_reference`; that
check is only as good as the transcription. Here each piece the transcription claims to take
from the public repository (shashankvkt/AlignMixup_CVPR22, cifar10_100/) is rebuilt in the
layout of the public file itself: its module classes, attribute names, `nn.Sequential`
shortcuts, the `lin`/`lout` forward of its ResNet, the `SinkhornDistance` class of
utils/OT.py and the two directions of `mixup_aligned` in models/resnet18_classifier.py. What
differs from the files is only what cannot run here or must be given: `.cuda()` calls are
dropped, and the draws the public code makes inside (`np.random.permutation`,
`random.randint`) are arguments. The transcription's weights are loaded into the public
modules with `load_state_dict(strict=True)`, so the parameter names and shapes must agree too.

A departure of the kind this file exists for: the public PreActBlock applies its shortcut (an
empty `nn.Sequential` where the shape is kept) to the pre-activated input relu(bn1(x)), not
to x. `test_the_block_with_the_input_on_its_shortcut_is_another_network` shows that such a
difference is far outside the tolerances used here.
"""

import numpy as np
import pytest

torch = pytest.importorskip('torch', reason='compares the PyTorch transcription: pip install '
                            'torch (CPU build)')
from torch import nn  # noqa: E402
from torch.nn import functional  # noqa: E402

from alignmix_jax.pytorch import torch_reference  # noqa: E402

F = functional


# --- cifar10_100/models/resnet.py, as the file writes it -------------------------------------

def conv3x3(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != self.expansion * planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, self.expansion * planes, kernel_size=1, stride=stride,
                          bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        out += shortcut
        return out


class ResNet(nn.Module):
    def __init__(self, block, num_blocks):
        super().__init__()
        self.in_planes = 64
        self.conv1 = conv3x3(3, 64)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(block, 64, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(block, 128, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(block, 256, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(block, 512, num_blocks[3], stride=2)

    def _make_layer(self, block, planes, num_blocks, stride):
        strides = [stride] + [1] * (num_blocks - 1)
        layers = []
        for stride in strides:
            layers.append(block(self.in_planes, planes, stride))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x, lin=0, lout=4):
        out = x
        if lin < 1 and lout > -1:
            out = self.conv1(out)
            out = self.bn1(out)
            out = F.relu(out)
        if lin < 2 and lout > 0:
            out = self.layer1(out)
        if lin < 3 and lout > 1:
            out = self.layer2(out)
        if lin < 4 and lout > 2:
            out = self.layer3(out)
        if lin < 5 and lout > 3:
            out = self.layer4(out)
        return out


# --- cifar10_100/utils/OT.py (SinkhornDistance), without .cuda() -----------------------------

class SinkhornDistance(nn.Module):
    def __init__(self, eps, max_iter):
        super().__init__()
        self.eps = eps
        self.max_iter = max_iter

    def forward(self, x, y):
        C = self._cost_matrix(x, y)
        x_points = x.shape[-2]
        y_points = y.shape[-2]
        batch_size = 1 if x.dim() == 2 else x.shape[0]
        mu = torch.empty(batch_size, x_points, dtype=torch.float,
                         requires_grad=False).fill_(1.0 / x_points).squeeze()
        nu = torch.empty(batch_size, y_points, dtype=torch.float,
                         requires_grad=False).fill_(1.0 / y_points).squeeze()
        u = torch.zeros_like(mu)
        v = torch.zeros_like(nu)
        actual_nits = 0
        thresh = 1e-1
        for _ in range(self.max_iter):
            u1 = u
            u = self.eps * (torch.log(mu + 1e-8) - torch.logsumexp(self.M(C, u, v), dim=-1)) + u
            v = self.eps * (torch.log(nu + 1e-8)
                            - torch.logsumexp(self.M(C, u, v).transpose(-2, -1), dim=-1)) + v
            err = (u - u1).abs().sum(-1).mean()
            actual_nits += 1
            if err.item() < thresh:
                break
        self.actual_nits = actual_nits  # not in the file: read by the test
        return torch.exp(self.M(C, u, v))

    def M(self, C, u, v):
        return (-C + u.unsqueeze(-1) + v.unsqueeze(-2)) / self.eps

    @staticmethod
    def _cost_matrix(x, y, p=2):
        x_col = x.unsqueeze(-2)
        y_lin = y.unsqueeze(-3)
        return torch.sum((torch.abs(x_col - y_lin)) ** p, -1)


# --- cifar10_100/models/resnet18_classifier.py ----------------------------------------------

def mixup_aligned(out, lam, indices, align_mix):
    """The public function with its two draws (indices, align_mix) as arguments."""
    feat1 = out.view(out.shape[0], out.shape[1], -1)
    feat2 = out[indices].view(out.shape[0], out.shape[1], -1)
    sinkhorn = SinkhornDistance(eps=0.1, max_iter=100)
    P = sinkhorn(feat1.permute(0, 2, 1), feat2.permute(0, 2, 1)).detach()
    P = P * (out.size(2) * out.size(3))
    if align_mix == 0:
        f1 = torch.matmul(feat2, P.permute(0, 2, 1)).view(out.shape)
        final = feat1.view(out.shape) * lam + f1 * (1 - lam)
    else:
        f2 = torch.matmul(feat1, P).view(out.shape)
        final = f2 * lam + feat2.view(out.shape) * (1 - lam)
    return final


class Resnet_classifier(nn.Module):  # noqa: N801  (the public class's name)
    def __init__(self, num_classes, z_dim=512):
        super().__init__()
        self.encoder = ResNet(PreActBlock, [2, 2, 2, 2])
        self.classifier = nn.Linear(z_dim, num_classes)

    def train_logits(self, x, lam, indices, layer_mix, align_mix=0):
        """Its forward(mode='train') with the draws given: layer_mix 0 is input mixup, 1
        aligned mixup of the last block's output."""
        if layer_mix == 0:
            x = x * lam + x[indices] * (1 - lam)
        out = self.encoder(x, lin=0, lout=0)
        out = self.encoder.layer1(out)
        out = self.encoder.layer2(out)
        out = self.encoder.layer3(out)
        out = self.encoder.layer4(out)
        if layer_mix == 1:
            out = mixup_aligned(out, lam, indices, align_mix)
        out = F.avg_pool2d(out, 4)
        out = out.reshape(out.size(0), -1)
        return self.classifier(out)

    def forward(self, x):  # mode='test'
        out = self.encoder(x)
        out = F.avg_pool2d(out, 4)
        out = out.reshape(out.size(0), -1)
        return self.classifier(out)


# --- the checks ------------------------------------------------------------------------------

CLASSES, BATCH = 10, 4


@pytest.fixture(scope='module')
def models():
    """(the transcription at full width, the public classifier with its weights) in train mode;
    BatchNorm statistics randomised so that eval-mode forwards test them too."""
    transcription = torch_reference.build_classifier(CLASSES, width=1.0, seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, buffer in transcription.state_dict().items():
            if name.endswith('running_mean'):
                buffer.copy_(0.1 * torch.randn(buffer.shape, generator=generator))
            elif name.endswith('running_var'):
                buffer.copy_(0.5 + torch.rand(buffer.shape, generator=generator))
    public = Resnet_classifier(CLASSES)
    public.load_state_dict(transcription.state_dict(), strict=True)
    return transcription, public


def images(seed: int) -> torch.Tensor:
    return torch.randn((BATCH, 3, 32, 32), generator=torch.Generator().manual_seed(seed))


def test_the_parameters_have_the_public_names_and_shapes(models):
    transcription, public = models
    ours = {name: tuple(value.shape) for name, value in transcription.state_dict().items()}
    theirs = {name: tuple(value.shape) for name, value in public.state_dict().items()}
    assert ours == theirs
    # The three stage-changing blocks own a projection, the other five an empty Sequential.
    projections = sorted(name for name in theirs if '.shortcut.' in name)
    assert projections == [f'encoder.layer{stage}.0.shortcut.0.weight' for stage in (2, 3, 4)]


@pytest.mark.slow  # compiles or trains for many seconds (see docs/testing.md)
@pytest.mark.parametrize('train', [True, False])
def test_the_network_equals_the_public_network(models, train):
    """Features and logits of the whole classifier, BatchNorm in batch (train) and running
    (eval) mode."""
    transcription, public = models
    transcription.train(train)
    public.train(train)
    x = images(2)
    with torch.no_grad():
        torch.testing.assert_close(transcription.encoder(x), public.encoder(x),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(transcription(x), public(x), rtol=1e-5, atol=1e-5)


def test_the_block_with_the_input_on_its_shortcut_is_another_network(models):
    """He et al.'s block (x on the identity shortcut) gives features that differ by far more
    than the tolerances above: the checks above can tell the two apart."""
    _, public = models
    public.eval()
    x = images(3)
    with torch.no_grad():
        expected = public.encoder(x)
        forwards = {}
        for module in public.encoder.modules():
            if isinstance(module, PreActBlock) and len(module.shortcut) == 0:
                def identity_forward(inputs, block=module):
                    out = block.conv1(F.relu(block.bn1(inputs)))
                    return block.conv2(F.relu(block.bn2(out))) + inputs
                forwards[module] = module.forward
                module.forward = identity_forward
        assert len(forwards) == 5
        try:
            other = public.encoder(x)
        finally:
            for module, forward in forwards.items():
                module.forward = forward
    difference = float((other - expected).abs().max() / expected.abs().max())
    assert difference > 0.1


@pytest.mark.parametrize('scale', [0.05, 1.0, 10.0])
def test_the_sinkhorn_loop_equals_the_public_class(scale):
    """Plan and iteration count, from random positions at three cost scales (few to all
    100 iterations)."""
    generator = torch.Generator().manual_seed(4)
    x = scale * torch.randn((BATCH, 16, 32), generator=generator)
    y = scale * torch.randn((BATCH, 16, 32), generator=generator)
    public = SinkhornDistance(eps=0.1, max_iter=100)
    expected = public(x, y)
    plan, iterations = torch_reference.sinkhorn_plan(x, y)
    assert iterations == public.actual_nits
    torch.testing.assert_close(plan, expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize('mode,layer_mix,align_mix', [('input', 0, 0), ('feature', 1, 0),
                                                      ('feature_prime', 1, 1)])
def test_the_mixed_forward_equals_the_public_one(models, mode, layer_mix, align_mix):
    """The logits of each mode the public forward(mode='train') draws, with the same
    permutation and lambda: input mixup, A~ = A'R^T mixed into A, A R mixed into A'."""
    transcription, public = models
    transcription.train()
    public.train()
    x = images(5)
    permutation = torch.tensor([2, 0, 3, 1])
    lam = 0.3
    with torch.no_grad():
        expected = public.train_logits(x, lam, permutation, layer_mix, align_mix)
        logits, _ = torch_reference._mixed_logits(
            transcription, x, permutation, lam, mode,
            dict(epsilon=0.1, max_iters=100, threshold=0.1))
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # compiles or trains for many seconds (see docs/testing.md)
def test_the_loss_and_the_optimizer_are_the_public_ones(models):
    """One step of torch_reference.train_step against the public main.py's step: SGD(lr 0.1,
    momentum 0.9, weight decay 1e-4) on mixup_criterion = lam CE(y_a) + (1 - lam) CE(y_b)."""
    transcription, public = models
    transcription.train()
    public.train()
    state = {name: value.clone() for name, value in transcription.state_dict().items()}
    x, labels = images(6), torch.tensor([1, 7, 3, 3])
    permutation, lam = torch.tensor([3, 2, 1, 0]), 0.6
    public_optimizer = torch.optim.SGD(public.parameters(), lr=0.1, momentum=0.9,
                                       weight_decay=1e-4)
    criterion = nn.CrossEntropyLoss()
    outputs = public.train_logits(x, lam, permutation, layer_mix=0)
    loss = lam * criterion(outputs, labels) + (1 - lam) * criterion(outputs, labels[permutation])
    public_optimizer.zero_grad()
    loss.backward()
    public_optimizer.step()
    result = torch_reference.train_step(transcription, torch_reference.make_optimizer(
        transcription), x, labels, permutation, lam, 'input')
    np.testing.assert_allclose(result['loss'], float(loss), rtol=1e-6)
    for name, value in public.state_dict().items():
        torch.testing.assert_close(result['state'][name].detach(), value, rtol=1e-5,
                                   atol=1e-6, msg=lambda message, name=name: f'{name}: {message}')
    transcription.load_state_dict(state)
    public.load_state_dict(state)
