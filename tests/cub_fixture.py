"""A small generated localisation set in the official CUB_200_2011 archive layout (test helper).

Each image is a dark, noisy canvas with one bright object of its class's colour pasted at a
random position and size; bounding_boxes.txt holds the object's (x, y, width, height). Canvas
sizes vary (as CUB's photographs do), so the boxes must be scaled per image.
"""

import pathlib

import numpy as np
from PIL import Image

# RGB colour of each class's object; distinct enough for a few steps of training to separate.
CLASS_COLOURS = ((250, 40, 40), (40, 250, 40), (60, 60, 250))
CANVAS_SIZES = ((64, 48), (80, 64), (56, 72))  # (width, height)


def write_archive(root: pathlib.Path, *, images_per_class: int = 8, test_per_class: int = 3,
                  seed: int = 0) -> dict:
    """Writes root/CUB_200_2011/...; returns {image_id: (class index, is_train, (x, y, w, h),
    (width, height))} for checks."""
    rng = np.random.default_rng(seed)
    base = root / 'CUB_200_2011'
    (base / 'images').mkdir(parents=True)
    records = {}
    image_id = 0
    for label, colour in enumerate(CLASS_COLOURS):
        class_folder = f'{label + 1:03d}.Bird_{label}'
        (base / 'images' / class_folder).mkdir()
        for index in range(images_per_class):
            image_id += 1
            width, height = CANVAS_SIZES[(image_id + label) % len(CANVAS_SIZES)]
            canvas = rng.integers(0, 50, size=(height, width, 3)).astype(np.uint8)
            box_width = int(rng.integers(width // 4, width // 2))
            box_height = int(rng.integers(height // 4, height // 2))
            x = int(rng.integers(0, width - box_width))
            y = int(rng.integers(0, height - box_height))
            canvas[y:y + box_height, x:x + box_width] = colour
            name = f'{class_folder}/Bird_{label}_{index:04d}.jpg'
            Image.fromarray(canvas).save(base / 'images' / name, quality=95)
            is_train = index >= test_per_class
            records[image_id] = (label, is_train, (x, y, box_width, box_height),
                                 (width, height), name)
    ids = sorted(records)
    (base / 'images.txt').write_text(''.join(f'{i} {records[i][4]}\n' for i in ids))
    (base / 'image_class_labels.txt').write_text(
        ''.join(f'{i} {records[i][0] + 1}\n' for i in ids))
    (base / 'train_test_split.txt').write_text(
        ''.join(f'{i} {int(records[i][1])}\n' for i in ids))
    # CUB writes the boxes as floats ("60.0 27.0 325.0 304.0").
    (base / 'bounding_boxes.txt').write_text(''.join(
        f'{i} {float(records[i][2][0])} {float(records[i][2][1])} {float(records[i][2][2])} '
        f'{float(records[i][2][3])}\n' for i in ids))
    (base / 'classes.txt').write_text(''.join(
        f'{label + 1} {label + 1:03d}.Bird_{label}\n' for label in range(len(CLASS_COLOURS))))
    return {i: records[i][:4] for i in ids}
