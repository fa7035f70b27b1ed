"""Tiny-ImageNet: the preparation tool on a generated miniature of the official archive, the
image-folder loader on its output, and configs/tiny_imagenet.py."""

import io
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from alignmix_jax import data
from alignmix_jax.data.prepare_tiny_imagenet import TinyImageNetError, prepare
from alignmix_jax.models import build_model
from configs import tiny_imagenet
from tests.conftest import REPO_ROOT

# Listed unsorted, as the official wnids.txt is: labels must follow the sorted ids.
WNIDS = ('n03000001', 'n01000001', 'n02000001')
IMAGES_PER_CLASS = 4
GRAY_TRAIN_IMAGE = 'n01000001_2.JPEG'  # Tiny-ImageNet has grayscale JPEGs like this one
# Validation images and their annotated classes; val_3 is grayscale, val_4 CMYK.
VAL_CLASSES = {'val_0.JPEG': 'n03000001', 'val_1.JPEG': 'n01000001', 'val_2.JPEG': 'n02000001',
               'val_3.JPEG': 'n01000001', 'val_4.JPEG': 'n02000001'}
NON_RGB_MODES = {GRAY_TRAIN_IMAGE: 'L', 'val_3.JPEG': 'L', 'val_4.JPEG': 'CMYK'}


def smooth_image(seed, mode):
    """A 64x64 image with smooth gradients and a seed-dependent offset (JPEG keeps it close)."""
    rows, cols = np.mgrid[0:64, 0:64]
    channels = [(rows * (2 + channel) + cols * (3 + seed) + 40 * channel + 17 * seed) % 256
                for channel in range(len(mode))]
    pixels = np.stack(channels, axis=-1).astype(np.uint8)
    return Image.fromarray(pixels[..., 0] if mode == 'L' else pixels, mode)


def jpeg_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format='JPEG', quality=90)
    return buffer.getvalue()


@pytest.fixture
def official_archive(tmp_path):
    """A miniature tiny-imagenet-200: 3 classes x 4 training images, 5 validation images."""
    root = tmp_path / 'tiny-imagenet-200'
    root.mkdir()
    (root / 'wnids.txt').write_text(''.join(f'{wnid}\n' for wnid in WNIDS))
    (root / 'words.txt').write_text(''.join(f'{wnid}\tthing {index}\n'
                                            for index, wnid in enumerate(WNIDS)))
    seed = 0
    for wnid in WNIDS:
        images_dir = root / 'train' / wnid / 'images'
        images_dir.mkdir(parents=True)
        (root / 'train' / wnid / f'{wnid}_boxes.txt').write_text(f'{wnid}_0.JPEG\t0\t0\t63\t63\n')
        for index in range(IMAGES_PER_CLASS):
            name = f'{wnid}_{index}.JPEG'
            image = smooth_image(seed, NON_RGB_MODES.get(name, 'RGB'))
            (images_dir / name).write_bytes(jpeg_bytes(image))
            seed += 1
    (root / 'val' / 'images').mkdir(parents=True)
    annotation_lines = []
    for name, wnid in VAL_CLASSES.items():
        (root / 'val' / 'images' / name).write_bytes(
            jpeg_bytes(smooth_image(seed, NON_RGB_MODES.get(name, 'RGB'))))
        annotation_lines.append(f'{name}\t{wnid}\t1\t2\t60\t61\n')
        seed += 1
    (root / 'val' / 'val_annotations.txt').write_text(''.join(annotation_lines))
    # The unlabelled official test set is ignored.
    (root / 'test' / 'images').mkdir(parents=True)
    (root / 'test' / 'images' / 'test_0.JPEG').write_bytes(jpeg_bytes(smooth_image(99, 'RGB')))
    return root


def expected_files():
    """{relative output path: source path relative to the archive} for the miniature."""
    files = {}
    for wnid in WNIDS:
        for index in range(IMAGES_PER_CLASS):
            name = f'{wnid}_{index}.JPEG'
            suffix = '.png' if name in NON_RGB_MODES else '.jpg'
            files[f'train/{wnid}/{wnid}_{index}{suffix}'] = f'train/{wnid}/images/{name}'
    for name, wnid in VAL_CLASSES.items():
        suffix = '.png' if name in NON_RGB_MODES else '.jpg'
        files[f'test/{wnid}/{Path(name).stem}{suffix}'] = f'val/images/{name}'
    return files


def output_files(root):
    return {path.relative_to(root).as_posix(): path.read_bytes()
            for path in root.rglob('*') if path.is_file()}


def test_prepare_writes_the_image_folder_layout(official_archive, tmp_path):
    lines = []
    output = tmp_path / 'out'
    summary = prepare(official_archive, output, report=lines.append)
    assert sorted(output_files(output)) == sorted(expected_files())
    assert sorted(path.name for path in output.iterdir()) == ['test', 'train']
    assert summary.num_classes == 3
    assert summary.num_images == {'train': 12, 'test': 5}
    assert summary.num_converted == {'train': 1, 'test': 2}
    assert summary.image_size == (64, 64)
    # One line per tenth of a split, at most; the last one of each split gives the totals.
    assert lines[-1] == 'test: 5/5 images written (2 converted to RGB PNG)'
    assert 'train: 12/12 images written (1 converted to RGB PNG)' in lines
    # Nothing is left beside the output.
    assert sorted(path.name for path in tmp_path.iterdir()) == ['out', 'tiny-imagenet-200']


def test_outputs_are_rgb_and_rgb_jpegs_keep_their_bytes(official_archive, tmp_path):
    output = tmp_path / 'out'
    prepare(official_archive, output, report=lambda line: None)
    for relative_path, source_relative_path in expected_files().items():
        written, source = output / relative_path, official_archive / source_relative_path
        with Image.open(written) as image:
            assert image.mode == 'RGB'
            assert image.size == (64, 64)
            written_pixels = np.asarray(image)
        if source.name in NON_RGB_MODES:
            assert relative_path.endswith('.png')
            with Image.open(source) as original:
                assert original.mode == NON_RGB_MODES[source.name]
                # PNG is lossless: the pixels are exactly PIL's RGB version of the original.
                np.testing.assert_array_equal(written_pixels,
                                              np.asarray(original.convert('RGB')))
        else:
            assert written.read_bytes() == source.read_bytes()


def test_image_folder_loader_reads_the_output(official_archive, tmp_path):
    output = tmp_path / 'out'
    prepare(official_archive, output, report=lambda line: None)
    config = tiny_imagenet.get_config().dataset
    config.data_dir = str(output)
    dataset = data.load_dataset(config)

    assert dataset.class_names == ('n01000001', 'n02000001', 'n03000001')
    assert dataset.num_classes == 3
    assert dataset.train.images.shape == (12, 64, 64, 3)
    assert dataset.test.images.shape == (5, 64, 64, 3)
    np.testing.assert_array_equal(dataset.train.labels, [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    # Test images by class, then name: val_1, val_3 (n01), val_2, val_4 (n02), val_0 (n03).
    np.testing.assert_array_equal(dataset.test.labels, [0, 0, 1, 1, 2])

    # Train images in class order, then name: the grayscale n01000001_2 is the third.
    gray_image = dataset.train.images[2]
    with Image.open(official_archive / 'train' / 'n01000001' / 'images' / GRAY_TRAIN_IMAGE) as gray:
        gray_levels = np.asarray(gray)
    for channel in range(3):
        np.testing.assert_array_equal(gray_image[..., channel], gray_levels)
    # A copied RGB JPEG decodes to the pixels PIL gives for the archive's file.
    with Image.open(official_archive / 'val' / 'images' / 'val_0.JPEG') as rgb:
        np.testing.assert_array_equal(dataset.test.images[4], np.asarray(rgb))


def test_command_line_tool_writes_the_same_files(official_archive, tmp_path):
    prepare(official_archive, tmp_path / 'by_function', report=lambda line: None)
    command = [sys.executable, '-m', 'alignmix_jax.data.prepare_tiny_imagenet',
               f'--source={official_archive}', f'--output={tmp_path / "by_command"}']
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == (
        f'wrote {tmp_path / "by_command"}: 12 train and 5 test images of 3 classes, 64x64; '
        f'train with --config=configs/tiny_imagenet.py '
        f'--config.dataset.data_dir={tmp_path / "by_command"}')
    assert output_files(tmp_path / 'by_command') == output_files(tmp_path / 'by_function')

    # A second run refuses to touch the now non-empty output, in one line.
    again = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert again.returncode == 1
    assert again.stderr.splitlines() == [
        f'error: {tmp_path / "by_command"} already exists and is not empty: delete it to '
        'prepare it again, or choose another --output']


def test_an_empty_output_folder_is_used_and_a_non_empty_one_refused(official_archive, tmp_path):
    empty = tmp_path / 'empty'
    empty.mkdir()
    prepare(official_archive, empty, report=lambda line: None)
    assert sorted(output_files(empty)) == sorted(expected_files())

    occupied = tmp_path / 'occupied'
    occupied.mkdir()
    (occupied / 'notes.txt').write_text('mine')
    with pytest.raises(TinyImageNetError, match='already exists and is not empty'):
        prepare(official_archive, occupied, report=lambda line: None)
    assert output_files(occupied) == {'notes.txt': b'mine'}


def break_layout(root, defect):
    """Damages the miniature archive at `root`; returns the expected error message."""
    layout = (f'{root} is not an extracted tiny-imagenet-200 folder (expected wnids.txt, '
              'train/<wnid>/images/, val/images/ and val/val_annotations.txt)')
    if defect == 'no wnids.txt':
        (root / 'wnids.txt').unlink()
        return f'{root / "wnids.txt"} is missing: {layout}'
    if defect == 'no val_annotations.txt':
        (root / 'val' / 'val_annotations.txt').unlink()
        return f'{root / "val" / "val_annotations.txt"} is missing: {layout}'
    if defect == 'unknown wnid':
        annotations = root / 'val' / 'val_annotations.txt'
        lines = annotations.read_text().splitlines(keepends=True)
        lines[2] = 'val_2.JPEG\tn09999999\t1\t2\t60\t61\n'
        annotations.write_text(''.join(lines))
        return (f"{annotations}:3: unknown wnid 'n09999999' (not in {root / 'wnids.txt'})")
    if defect == 'missing class folder':
        for path in (root / 'train' / 'n02000001' / 'images').iterdir():
            path.unlink()
        (root / 'train' / 'n02000001' / 'images').rmdir()
        return f'{root / "train" / "n02000001" / "images"} is missing: {layout}'
    if defect == 'unannotated image':
        (root / 'val' / 'images' / 'val_5.JPEG').write_bytes(jpeg_bytes(smooth_image(0, 'RGB')))
        return (f'{root / "val" / "images" / "val_5.JPEG"} has no line in '
                f'{root / "val" / "val_annotations.txt"} (1 images have none)')
    if defect == 'image of another size':
        image = Image.fromarray(np.zeros((32, 48, 3), np.uint8))
        (root / 'val' / 'images' / 'val_2.JPEG').write_bytes(jpeg_bytes(image))
        return (f'{root / "val" / "images" / "val_2.JPEG"} is 48x32 but the images before it '
                'are 64x64: all images must have one size')
    raise ValueError(defect)


@pytest.mark.parametrize('defect', ['no wnids.txt', 'no val_annotations.txt', 'unknown wnid',
                                    'missing class folder', 'unannotated image',
                                    'image of another size'])
def test_a_wrong_source_layout_is_a_clear_error(official_archive, tmp_path, defect):
    expected_message = break_layout(official_archive, defect)
    with pytest.raises(TinyImageNetError) as error:
        prepare(official_archive, tmp_path / 'out', report=lambda line: None)
    assert str(error.value) == expected_message
    # Neither the output nor a partial directory is left behind.
    assert sorted(path.name for path in tmp_path.iterdir()) == ['tiny-imagenet-200']


def test_the_command_line_reports_a_wrong_layout_in_one_line(official_archive, tmp_path):
    expected_message = break_layout(official_archive, 'unknown wnid')
    result = subprocess.run(
        [sys.executable, '-m', 'alignmix_jax.data.prepare_tiny_imagenet',
         f'--source={official_archive}', f'--output={tmp_path / "out"}'],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stdout == ''
    assert result.stderr.splitlines() == [f'error: {expected_message}']


def test_config_has_the_papers_schedule_and_the_public_codes_augmentation():
    config = tiny_imagenet.get_config()
    assert config.dataset.name == 'image_folder'
    assert config.dataset.data_dir is None  # required on the command line
    assert config.dataset.mean == (0.4914, 0.4822, 0.4465)
    assert config.dataset.std == (0.2023, 0.1994, 0.2010)
    assert config.dataset.crop_padding == 4
    assert config.dataset.random_flip is True
    assert config.model.name == 'preact_resnet18'
    assert config.model.width == 1.0
    assert (config.model.last_stride, config.model.feature_pool) == (2, 1)
    assert config.train.num_epochs == 1200
    assert config.train.learning_rate == 0.1
    assert config.train.lr_decay_epochs == (600, 900)
    assert config.train.lr_decay_factor == 0.1
    assert config.train.momentum == 0.9
    assert config.train.weight_decay == 1e-4
    assert config.train.batch_size == 128
    assert config.mixup.modes == ('input', 'embedding', 'feature', 'feature_prime')
    assert config.mixup.align is True
    assert (config.mixup.alpha, config.mixup.epsilon, config.mixup.sinkhorn_iters) == (
        2.0, 0.1, 100)
    # Without --config.dataset.data_dir the loader says what to pass.
    with pytest.raises(data.DatasetNotFoundError, match='--config.dataset.data_dir'):
        data.load_dataset(config.dataset)


def test_feature_tensor_is_8x8x512_on_64x64_inputs():
    config = tiny_imagenet.get_config()
    model = build_model(config.model, num_classes=200)
    images = jnp.zeros((2, 64, 64, 3), jnp.float32)
    # Shapes only: no network is run.
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
    features = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=False, method='features'), variables, images)
    logits = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, images)
    assert features.shape == (2, 8, 8, 512)
    assert logits.shape == (2, 200)
