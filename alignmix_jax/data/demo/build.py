"""Rebuilds `cifar10_demo.npz`, the CIFAR-10 subset embedded in the package, from a JPEG folder.

    python -m alignmix_jax.data.demo.build --source ../shared/data/cifar10-jpeg

Takes the first 500 training and the first 100 test images of each class, in file-name order,
from SOURCE/{train,test}/<class>/*.jpg, and stores their original JPEG bytes (no re-encoding,
so no further loss): per split one byte buffer, the offsets of the images in it and the labels,
plus the class names (sorted folder names = labels 0..9). The zip archive is written with fixed
timestamps, so the same source gives a byte-identical file.
"""

import argparse
import pathlib
import zipfile

import numpy as np

from alignmix_jax.data import in_memory

IMAGES_PER_CLASS = {'train': 500, 'test': 100}
# Before this date zip timestamps cannot go; any fixed date makes the archive reproducible.
_ZIP_TIMESTAMP = (1980, 1, 1, 0, 0, 0)


def collect_split(split_dir: pathlib.Path, class_names: list[str],
                  images_per_class: int) -> dict[str, np.ndarray]:
    encoded_images, labels = [], []
    for label, class_name in enumerate(class_names):
        files = sorted((split_dir / class_name).glob('*.jpg'))
        if len(files) < images_per_class:
            raise ValueError(f'{split_dir / class_name} has {len(files)} JPEG files, '
                             f'{images_per_class} needed')
        encoded_images += [path.read_bytes() for path in files[:images_per_class]]
        labels += [label] * images_per_class
    offsets = np.cumsum([0] + [len(data) for data in encoded_images], dtype=np.int64)
    return {
        'jpeg_bytes': np.frombuffer(b''.join(encoded_images), np.uint8),
        'offsets': offsets,
        'labels': np.asarray(labels, np.uint8),
    }


def write_reproducible_npz(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
    """An .npz archive (readable by np.load) whose bytes depend on the arrays alone."""
    with zipfile.ZipFile(path, 'w') as archive:
        for name, array in arrays.items():
            member = zipfile.ZipInfo(f'{name}.npy', date_time=_ZIP_TIMESTAMP)
            member.compress_type = zipfile.ZIP_DEFLATED
            with archive.open(member, 'w') as stream:
                np.lib.format.write_array(stream, np.ascontiguousarray(array),
                                          allow_pickle=False)


def build(source: pathlib.Path, output: pathlib.Path,
          images_per_class: dict[str, int] = IMAGES_PER_CLASS) -> None:
    """`images_per_class`: {'train': n, 'test': m}, the first n (m) images of each class."""
    class_names = sorted(path.name for path in (source / 'train').iterdir() if path.is_dir())
    arrays = {'class_names': np.asarray(class_names)}
    for split, count in images_per_class.items():
        split_arrays = collect_split(source / split, class_names, count)
        arrays.update({f'{split}_{name}': array for name, array in split_arrays.items()})
    write_reproducible_npz(output, arrays)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--source', type=pathlib.Path, required=True,
                        help='CIFAR-10 as SOURCE/{train,test}/<class>/*.jpg')
    parser.add_argument('--output', type=pathlib.Path, default=in_memory.DEMO_DATA_PATH)
    # Other sizes make the same archive for other uses (launch/gpu_check.py carries one).
    parser.add_argument('--train_per_class', type=int, default=IMAGES_PER_CLASS['train'])
    parser.add_argument('--test_per_class', type=int, default=IMAGES_PER_CLASS['test'])
    args = parser.parse_args()
    build(args.source, args.output,
          {'train': args.train_per_class, 'test': args.test_per_class})
    print(f'wrote {args.output} ({args.output.stat().st_size / 2**20:.2f} MiB)')


if __name__ == '__main__':
    main()
