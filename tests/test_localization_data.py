"""CUB input: the official archive layout, boxes scaled to the resized test images, crops."""

import numpy as np
import pytest
from ml_collections import ConfigDict

from alignmix_jax import data
from alignmix_jax.data import cub
from tests import cub_fixture

IMAGE_SIZE, TRAIN_RESIZE = 32, 40


def dataset_config(data_dir, **overrides):
    config = ConfigDict({'name': 'cub', 'data_dir': str(data_dir), 'image_size': IMAGE_SIZE,
                         'train_resize': TRAIN_RESIZE, 'train_subset': 0, 'download': False})
    config.update(overrides)
    return config


@pytest.fixture(scope='module')
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp('cub')
    records = cub_fixture.write_archive(root)
    return root, records


@pytest.fixture(scope='module')
def dataset(archive):
    return data.load_dataset(dataset_config(archive[0]))


def test_archive_splits_labels_and_classes(archive, dataset):
    _, records = archive
    assert isinstance(dataset, cub.LocalizationDataset)
    test_ids = [i for i, record in records.items() if not record[1]]
    train_ids = [i for i, record in records.items() if record[1]]
    assert dataset.num_classes == 3
    assert dataset.class_names == ('001.Bird_0', '002.Bird_1', '003.Bird_2')
    assert dataset.num_train_examples == len(train_ids) == 15
    assert dataset.train.images.shape == (15, TRAIN_RESIZE, TRAIN_RESIZE, 3)
    assert dataset.test.images.shape == (9, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert dataset.image_shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    np.testing.assert_array_equal(dataset.test.labels, [records[i][0] for i in test_ids])
    np.testing.assert_array_equal(dataset.train.labels, [records[i][0] for i in train_ids])


def test_test_boxes_are_scaled_per_image_and_cover_the_object(archive, dataset):
    _, records = archive
    test_ids = [i for i, record in records.items() if not record[1]]
    for box, image, image_id in zip(dataset.test_boxes, dataset.test.images, test_ids,
                                    strict=True):
        label, _, (x, y, w, h), (width, height) = records[image_id]
        sx, sy = IMAGE_SIZE / width, IMAGE_SIZE / height
        np.testing.assert_allclose(box, [x * sx, y * sy, (x + w) * sx, (y + h) * sy],
                                   rtol=1e-6)
        # The object's pixels (its colour channel bright) lie in the box, to a pixel of blur.
        channel = min(label, 2)
        rows, cols = np.nonzero(image[..., channel] > 150)
        assert cols.min() >= np.floor(box[0]) - 1 and cols.max() + 1 <= np.ceil(box[2]) + 1
        assert rows.min() >= np.floor(box[1]) - 1 and rows.max() + 1 <= np.ceil(box[3]) + 1


def test_train_batches_crop_flip_resume_and_process_shares(dataset):
    batches = dataset.train_batches(6, seed=3)
    first = [next(batches) for _ in range(4)]
    for images, labels in first:
        assert images.shape == (6, IMAGE_SIZE, IMAGE_SIZE, 3) and images.dtype == np.uint8
        assert labels.dtype == np.int32
    # Each crop is a window of a resized training image, possibly mirrored.
    images, labels = first[0]
    for crop, label in zip(images, labels, strict=True):
        candidates = dataset.train.images[dataset.train.labels == label]
        found = any(np.array_equal(crop, view[top:top + IMAGE_SIZE, left:left + IMAGE_SIZE])
                    for image in candidates for view in (image, image[:, ::-1])
                    for top in range(TRAIN_RESIZE - IMAGE_SIZE + 1)
                    for left in range(TRAIN_RESIZE - IMAGE_SIZE + 1))
        assert found
    # Resuming at step 2 gives the batches of steps 2 and 3 again.
    resumed = dataset.train_batches(6, seed=3, start_step=2)
    for expected in first[2:]:
        got = next(resumed)
        np.testing.assert_array_equal(got[0], expected[0])
        np.testing.assert_array_equal(got[1], expected[1])
    # Two processes' shares make up the global batch.
    shares = [next(dataset.train_batches(6, seed=3, process_index=p, process_count=2))
              for p in range(2)]
    np.testing.assert_array_equal(np.concatenate([s[0] for s in shares]), first[0][0])
    # Another seed: other crops.
    other = next(dataset.train_batches(6, seed=4))
    assert not np.array_equal(other[0], first[0][0])


def test_crop_and_flip():
    images = np.arange(2 * 4 * 5 * 1, dtype=np.uint8).reshape(2, 4, 5, 1)
    crops = cub.crop_and_flip(images, np.array([[1, 2], [0, 0]]), np.array([False, True]),
                                    3)
    np.testing.assert_array_equal(crops[0], images[0, 1:4, 2:5])
    np.testing.assert_array_equal(crops[1], images[1, 0:3, 2::-1])


def test_eval_batches_are_the_test_split_padded(dataset):
    batches = list(dataset.eval_batches(4))
    assert len(batches) == 3
    images = np.concatenate([b[0] for b in batches])
    mask = np.concatenate([b[2] for b in batches])
    assert mask.sum() == 9 and not mask[9:].any()
    np.testing.assert_array_equal(images[mask], dataset.test.images)


def test_missing_archive_says_where_to_put_it(tmp_path):
    with pytest.raises(data.DatasetNotFoundError,
                       match='CUB_200_2011/images.txt exists'):
        data.load_dataset(dataset_config(tmp_path))
    with pytest.raises(data.DatasetNotFoundError, match='data_dir'):
        data.load_dataset(dataset_config(None))


def test_the_archive_folder_itself_is_accepted_and_subsets_work(archive):
    root, _ = archive
    subset = data.load_dataset(dataset_config(root / 'CUB_200_2011', train_subset=6))
    assert subset.num_train_examples == 6
    np.testing.assert_array_equal(np.bincount(subset.train.labels), [2, 2, 2])


def test_tfds_layout_gives_the_archive_images_and_boxes(archive, dataset, tmp_path):
    """A tfds builder with caltech_birds2011's features (its bbox as tfds writes it: relative
    ymin, xmin, ymax, xmax) over the same images gives the same test images and boxes."""
    import tensorflow_datasets as tfds

    root, records = archive
    base = root / 'CUB_200_2011'
    names = dict(line.split() for line in (base / 'images.txt').read_text().splitlines())

    class FakeCaltechBirds2011(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version('0.2.0')

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                'image': tfds.features.Image(), 'label': tfds.features.ClassLabel(num_classes=3),
                'bbox': tfds.features.BBoxFeature()}))

        def _split_generators(self, dl_manager):
            del dl_manager
            return {'train': self._generate_examples(True),
                    'test': self._generate_examples(False)}

        def _generate_examples(self, train):
            for image_id, (label, is_train, (x, y, w, h), (width, height)) in records.items():
                if is_train == train:
                    yield image_id, {
                        'image': str(base / 'images' / names[str(image_id)]), 'label': label,
                        'bbox': tfds.features.BBox(ymin=y / height, xmin=x / width,
                                                   ymax=(y + h) / height, xmax=(x + w) / width)}

    builder = FakeCaltechBirds2011(data_dir=str(tmp_path))
    builder.download_and_prepare()
    from_tfds = cub.tfds_dataset(builder, image_size=IMAGE_SIZE, train_resize=TRAIN_RESIZE)
    assert from_tfds.num_train_examples == dataset.num_train_examples
    assert len(from_tfds.test.labels) == len(dataset.test.labels)
    # tfds orders examples by a hash of their keys: match the test images by content.
    for image, label, box in zip(from_tfds.test.images, from_tfds.test.labels,
                                 from_tfds.test_boxes, strict=True):
        matches = [i for i, other in enumerate(dataset.test.images)
                   if np.array_equal(other, image)]
        assert len(matches) == 1
        assert dataset.test.labels[matches[0]] == label
        np.testing.assert_allclose(box, dataset.test_boxes[matches[0]], atol=1e-4)
