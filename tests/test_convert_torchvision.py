"""torchvision state_dicts -> Flax: the same logits as the PyTorch network the weights came from.

torchvision itself is not installable here (no CPU build on this index), so the reference
networks are written below in plain torch with torchvision's module names, hence its
state_dict keys: ResNet-50 (torchvision.models.resnet50) and VGG-16 (torchvision.models.vgg16,
and the VGG16-CAM of Choe et al., 2020). They take a width multiplier so the tests run on
tiny networks; the full-width key set and parameter count are checked without running them.
CI installs torch (.ci/run); without it these tests are skipped, and say so.
"""

import functools
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignmix_jax.models import build_model, pretrained
from alignmix_jax.pytorch import convert_torchvision
from configs import default
from tests.conftest import init_key

torch = pytest.importorskip('torch', reason='the converter tests need PyTorch: pip install '
                            'torch==2.13.0 (.ci/run installs it)')
nn = torch.nn

WIDTH = 0.125
SIZE = 64
# sum(p.numel() for p in torchvision.models.resnet50().parameters())
TORCHVISION_RESNET50_PARAMETERS = 25_557_032


def channels(count, width):
    return max(1, int(round(count * width)))


class TorchBottleneck(nn.Module):
    """torchvision.models.resnet.Bottleneck's names and computation (stride on conv2)."""

    def __init__(self, inplanes, planes, stride, downsample):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU()
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class TorchResNet50(nn.Module):
    """torchvision.models.resnet50's module names; `last_stride` for the WSOL variant."""

    def __init__(self, num_classes, width=1.0, last_stride=2):
        super().__init__()
        inplanes = channels(64, width)
        self.conv1 = nn.Conv2d(3, inplanes, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        stages = zip((64, 128, 256, 512), (3, 4, 6, 3), (1, 2, 2, last_stride), strict=True)
        for stage, (planes, blocks, stride) in enumerate(stages, start=1):
            planes = channels(planes, width)
            layers = []
            for block in range(blocks):
                block_stride = stride if block == 0 else 1
                downsample = None
                if block == 0 and (block_stride != 1 or inplanes != planes * 4):
                    downsample = nn.Sequential(
                        nn.Conv2d(inplanes, planes * 4, 1, stride=block_stride, bias=False),
                        nn.BatchNorm2d(planes * 4))
                layers.append(TorchBottleneck(inplanes, planes, block_stride, downsample))
                inplanes = planes * 4
            setattr(self, f'layer{stage}', nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in range(1, 5):
            x = getattr(self, f'layer{stage}')(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def torch_vgg16_features(width, last_pool):
    """torchvision's vgg16 `features` (configuration D), optionally without the last pool."""
    layers, in_channels = [], 3
    for block, block_channels in enumerate(((64, 64), (128, 128), (256,) * 3, (512,) * 3,
                                            (512,) * 3)):
        for count in block_channels:
            out_channels = channels(count, width)
            layers += [nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.ReLU()]
            in_channels = out_channels
        if block < 4 or last_pool:
            layers.append(nn.MaxPool2d(2, 2))
    return nn.Sequential(*layers), in_channels


class TorchVGG16CAM(nn.Module):
    """VGG16-CAM in the layout of Choe et al. (2020)'s wsolevaluation: `features` without the
    last pool, `conv6` (3x3, 1024) + ReLU, global average pooling, `fc`."""

    def __init__(self, num_classes, width=1.0):
        super().__init__()
        self.features, in_channels = torch_vgg16_features(width, last_pool=False)
        self.conv6 = nn.Conv2d(in_channels, channels(1024, width), 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(channels(1024, width), num_classes)

    def forward(self, x):
        x = self.relu(self.conv6(self.features(x)))
        return self.fc(x.mean(dim=(2, 3)))


class TorchVGG16(nn.Module):
    """torchvision.models.vgg16's module names (features, avgpool, classifier)."""

    def __init__(self, num_classes, width=1.0):
        super().__init__()
        self.features, in_channels = torch_vgg16_features(width, last_pool=True)
        self.avgpool = nn.AdaptiveAvgPool2d(7)
        hidden = channels(4096, width)
        self.classifier = nn.Sequential(
            nn.Linear(in_channels * 49, hidden), nn.ReLU(), nn.Dropout(),
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(), nn.Linear(hidden, num_classes))


def randomize_batch_norm(module, seed):
    """Non-trivial running statistics and affine parameters, so a wrong mapping shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, nn.BatchNorm2d):
                size = layer.num_features
                layer.weight.copy_(0.5 + torch.rand(size, generator=generator))
                layer.bias.copy_(0.2 * torch.randn(size, generator=generator))
                layer.running_mean.copy_(0.2 * torch.randn(size, generator=generator))
                layer.running_var.copy_(0.5 + torch.rand(size, generator=generator))
    return module


def flax_model(name, num_classes, width=WIDTH, last_stride=2):
    config = default.get_config().model
    config.update(name=name, width=width, head_norm=False, last_stride=last_stride)
    return build_model(config, num_classes)


def convert_saved(tmp_path, arch, module):
    """Saves the module's state_dict as a .pth file, converts it through the files."""
    state_dict_path = tmp_path / f'{arch}.pth'
    torch.save(module.state_dict(), state_dict_path)
    state = convert_torchvision.read_state_dict(str(state_dict_path))
    variables, unused = convert_torchvision.convert(arch, state)
    output = tmp_path / f'{arch}_converted'
    pretrained.save_converted(variables, str(output), {'arch': arch})
    return output, unused


def torch_and_flax_logits(torch_module, model, variables, seed=0):
    images = np.random.default_rng(seed).normal(size=(2, SIZE, SIZE, 3)).astype(np.float32)
    torch_module.eval()
    with torch.no_grad():
        expected = torch_module(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    logits = np.asarray(model.apply(variables, jnp.asarray(images), train=False))
    return logits, expected


def fresh_variables(model):
    return model.init(init_key(1), jnp.zeros((1, SIZE, SIZE, 3)), train=False)


@pytest.mark.slow  # compiles or trains for many seconds (see docs/testing.md)
@pytest.mark.parametrize('last_stride', [2, 1])
def test_resnet50_logits_match_torch(tmp_path, last_stride):
    torch.manual_seed(0)
    reference = randomize_batch_norm(TorchResNet50(10, WIDTH, last_stride), seed=1)
    output, unused = convert_saved(tmp_path, 'resnet50', reference)
    assert unused == []
    model = flax_model('resnet50', 10, last_stride=last_stride)
    variables = pretrained.load_pretrained(fresh_variables(model), str(output))
    logits, expected = torch_and_flax_logits(reference, model, variables)
    assert np.abs(expected).max() > 0.1  # not a degenerate comparison
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


def test_vgg16_cam_logits_match_torch(tmp_path):
    torch.manual_seed(0)
    reference = TorchVGG16CAM(7, WIDTH)
    output, unused = convert_saved(tmp_path, 'vgg16', reference)
    assert unused == []
    model = flax_model('vgg16_gap', 7, last_stride=1)
    variables = pretrained.load_pretrained(fresh_variables(model), str(output))
    logits, expected = torch_and_flax_logits(reference, model, variables)
    assert np.abs(expected).max() > 1e-3
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)
    # The feature maps (CAM's input) match too, NCHW against NHWC.
    images = np.random.default_rng(3).normal(size=(1, SIZE, SIZE, 3)).astype(np.float32)
    with torch.no_grad():
        torch_maps = reference.relu(reference.conv6(reference.features(
            torch.from_numpy(images.transpose(0, 3, 1, 2))))).numpy().transpose(0, 2, 3, 1)
    maps = model.apply(variables, jnp.asarray(images), train=False, method='features')
    np.testing.assert_allclose(np.asarray(maps), torch_maps, rtol=1e-4, atol=1e-5)


def test_torchvision_vgg16_fills_the_convolutions_and_leaves_the_head(tmp_path):
    torch.manual_seed(0)
    reference = TorchVGG16(1000, WIDTH)
    output, unused = convert_saved(tmp_path, 'vgg16', reference)
    assert unused == [f'classifier.{i}.{p}' for i in (0, 3, 6) for p in ('bias', 'weight')]
    model = flax_model('vgg16_gap', 200, last_stride=1)
    initial = fresh_variables(model)
    loaded = pretrained.load_pretrained(initial, str(output))
    for index, name in zip(convert_torchvision.vgg16_feature_indices(),
                           ['conv1_1', 'conv1_2', 'conv2_1', 'conv2_2', 'conv3_1', 'conv3_2',
                            'conv3_3', 'conv4_1', 'conv4_2', 'conv4_3', 'conv5_1', 'conv5_2',
                            'conv5_3'], strict=True):
        layer = reference.features[index]
        np.testing.assert_array_equal(loaded['params']['encoder'][name]['kernel'],
                                      layer.weight.detach().numpy().transpose(2, 3, 1, 0))
        np.testing.assert_array_equal(loaded['params']['encoder'][name]['bias'],
                                      layer.bias.detach().numpy())
    for kept in (('encoder', 'conv6'), ('classifier',)):
        jax.tree.map(np.testing.assert_array_equal,
                     functools.reduce(dict.__getitem__, kept, loaded['params']),
                     functools.reduce(dict.__getitem__, kept, initial['params']))


def test_classifier_of_another_class_count_is_skipped_and_other_mismatches_fail(tmp_path):
    torch.manual_seed(0)
    output, _ = convert_saved(tmp_path, 'resnet50', TorchResNet50(1000, WIDTH))
    model = flax_model('resnet50', 200)
    initial = fresh_variables(model)
    loaded = pretrained.load_pretrained(initial, str(output))
    np.testing.assert_array_equal(loaded['params']['classifier']['kernel'],
                                  initial['params']['classifier']['kernel'])
    assert not np.array_equal(loaded['params']['encoder']['stem_conv']['kernel'],
                              initial['params']['encoder']['stem_conv']['kernel'])
    assert set(loaded) == set(initial)
    # Another width: an error naming the array.
    wider = flax_model('resnet50', 200, width=0.25)
    with pytest.raises(convert_torchvision.ConversionError, match='stem_conv/kernel'):
        pretrained.load_pretrained(fresh_variables(wider), str(output))
    # Another architecture.
    vgg = flax_model('vgg16_gap', 200, last_stride=1)
    with pytest.raises(convert_torchvision.ConversionError, match='another architecture'):
        pretrained.load_pretrained(fresh_variables(vgg), str(output))
    with pytest.raises(FileNotFoundError, match='convert_torchvision'):
        pretrained.load_pretrained(initial, str(tmp_path / 'nothing'))


def test_full_width_resnet50_keys_and_shapes_fit_the_model():
    state = {key: value.numpy() for key, value in TorchResNet50(1000).state_dict().items()}
    variables, unused = convert_torchvision.convert('resnet50', state)
    assert unused == []
    model = flax_model('resnet50', 1000, width=1.0)
    shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0),
                            jnp.zeros((1, 224, 224, 3)))
    assert jax.tree.map(np.shape, variables) == jax.tree.map(lambda s: s.shape, dict(shapes))
    assert sum(v.size for v in jax.tree.leaves(variables['params'])) \
        == TORCHVISION_RESNET50_PARAMETERS


def test_wrong_state_dict_is_a_one_line_error(tmp_path):
    with pytest.raises(convert_torchvision.ConversionError, match="no 'conv1.weight'"):
        convert_torchvision.convert('resnet50', {'features.0.weight': np.zeros((1, 3, 3, 3))})
    with pytest.raises(convert_torchvision.ConversionError, match="features.0.weight"):
        convert_torchvision.convert('vgg16', {'conv1.weight': np.zeros((1, 3, 7, 7))})


@pytest.mark.slow  # compiles or trains for many seconds (see docs/testing.md)
def test_command_writes_the_weights(tmp_path):
    torch.manual_seed(0)
    state_dict_path = tmp_path / 'model.pth'
    torch.save({'state_dict': {f'module.{k}': v for k, v in
                               TorchVGG16(10, 0.0625).state_dict().items()}}, state_dict_path)
    result = subprocess.run(
        [sys.executable, '-m', 'alignmix_jax.pytorch.convert_torchvision', '--arch=vgg16',
         f'--state_dict={state_dict_path}', f'--output={tmp_path / "out"}'],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert '26 arrays' in result.stdout and 'classifier.0.bias' in result.stdout
    converted = pretrained.load_converted(str(tmp_path / 'out'))
    assert converted['params']['encoder']['conv1_1']['kernel'].shape == (3, 3, 3, 4)
    missing = subprocess.run(
        [sys.executable, '-m', 'alignmix_jax.pytorch.convert_torchvision', '--arch=vgg16',
         f'--state_dict={tmp_path / "none.pth"}', f'--output={tmp_path / "out2"}'],
        capture_output=True, text=True, timeout=300)
    assert missing.returncode != 0 and 'no state_dict file' in missing.stderr
