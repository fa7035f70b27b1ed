"""Turns the official Tiny-ImageNet-200 archive into the image-folder layout the trainer reads.

    python -m alignmix_jax.data.prepare_tiny_imagenet --source=PATH/tiny-imagenet-200 --output=OUT
    python -m alignmix_jax.main --config=configs/tiny_imagenet.py \
        --config.dataset.data_dir=OUT --workdir=runs/tiny_imagenet_r18

Source, the extracted tiny-imagenet-200.zip:

    wnids.txt                              the 200 class ids (WordNet ids), one a line
    train/<wnid>/images/<wnid>_<k>.JPEG    500 training images per class
    train/<wnid>/<wnid>_boxes.txt          bounding boxes (ignored)
    val/images/val_<k>.JPEG                10,000 validation images, 50 per class
    val/val_annotations.txt                file, wnid, x0, y0, x1, y1 (tab-separated), per image
    words.txt, test/                       class descriptions, unlabelled images (both ignored)

Output, dataset 'image_folder' of `alignmix_jax.data.in_memory`:

    OUT/train/<wnid>/<wnid>_<k>.jpg|png
    OUT/test/<wnid>/val_<k>.jpg|png        each validation image in its annotated class

The official validation set becomes our 'test' split: the official test images have no public
labels, and the papers (AlignMixup's public code among them) report accuracy on the validation
set. Labels are the indices of the sorted wnids (the loader sorts class folders by name).

Pixels: an RGB JPEG (almost every image) is copied byte for byte, so training sees exactly the
archive's pixels, with no second lossy encoding. An image in any other mode (Tiny-ImageNet has
some grayscale JPEGs) is converted to RGB by PIL (grayscale: R = G = B = the gray level) and
written as PNG, which is lossless: its pixels are those of the decoded original. Every output is
therefore RGB. All images must have one size (64x64 in the archive), as the loader
requires; a differing image is named in the error.

Output safety: an existing non-empty OUT is refused (delete it to prepare again); an empty one
is fine. Everything is written into a hidden sibling directory, `.<OUT name>.partial-<pid>`,
renamed to OUT once complete, so OUT is never half-written; on an error the partial directory
is removed (a killed run can leave one behind, which may be deleted).
"""

import argparse
import collections
import dataclasses
import os
import pathlib
import shutil
import sys
from collections.abc import Callable

from PIL import Image

from alignmix_jax.data.common import IMAGE_SUFFIXES

# A line of progress per tenth of a split: about 20 lines for the whole archive.
_PROGRESS_STEPS = 10


class TinyImageNetError(Exception):
    """The source is not a usable Tiny-ImageNet layout, or the output cannot be written."""


@dataclasses.dataclass(frozen=True)
class ImageToWrite:
    source: pathlib.Path
    wnid: str


@dataclasses.dataclass(frozen=True)
class PrepareSummary:
    """What `prepare` wrote: images per output split, and how many were converted to RGB PNG."""

    num_classes: int
    num_images: dict[str, int]
    num_converted: dict[str, int]
    image_size: tuple[int, int]  # (width, height), as PIL reports it


def _layout_error(source: pathlib.Path, problem: str) -> TinyImageNetError:
    return TinyImageNetError(f'{problem}: {source} is not an extracted tiny-imagenet-200 folder '
                             '(expected wnids.txt, train/<wnid>/images/, val/images/ and '
                             'val/val_annotations.txt)')


def _image_files(folder: pathlib.Path) -> list[pathlib.Path]:
    """The image files of a folder, by name; anything else (e.g. a boxes file) is skipped."""
    return sorted(path for path in folder.iterdir()
                  if path.is_file() and not path.name.startswith('.')
                  and path.suffix.lower() in IMAGE_SUFFIXES)


def read_wnids(source: pathlib.Path) -> list[str]:
    """The class ids of `source/wnids.txt`, in file order."""
    wnids_path = source / 'wnids.txt'
    if not wnids_path.is_file():
        raise _layout_error(source, f'{wnids_path} is missing')
    wnids = [line.strip() for line in wnids_path.read_text().splitlines() if line.strip()]
    if not wnids:
        raise _layout_error(source, f'{wnids_path} lists no class')
    duplicates = sorted(wnid for wnid, count in collections.Counter(wnids).items() if count > 1)
    if duplicates:
        raise TinyImageNetError(f'{wnids_path} lists {duplicates[0]} more than once')
    return wnids


def list_train_images(source: pathlib.Path, wnids: list[str]) -> list[ImageToWrite]:
    """The training images of every class, class by class in sorted wnid order."""
    train_dir = source / 'train'
    if not train_dir.is_dir():
        raise _layout_error(source, f'{train_dir} is missing')
    known = set(wnids)
    # A class folder that wnids.txt does not list means the two come from different archives.
    unlisted = sorted(path.name for path in train_dir.iterdir()
                      if path.is_dir() and path.name not in known)
    if unlisted:
        raise TinyImageNetError(f'{train_dir / unlisted[0]} is a class folder that '
                                f'{source / "wnids.txt"} does not list')
    images = []
    for wnid in sorted(wnids):
        images_dir = train_dir / wnid / 'images'
        if not images_dir.is_dir():
            raise _layout_error(source, f'{images_dir} is missing')
        files = _image_files(images_dir)
        if not files:
            raise TinyImageNetError(f'{images_dir} holds no images ({", ".join(IMAGE_SUFFIXES)})')
        images += [ImageToWrite(path, wnid) for path in files]
    return images


def read_val_annotations(source: pathlib.Path, wnids: list[str]) -> list[ImageToWrite]:
    """The validation images with their annotated classes, sorted by class, then file name."""
    annotations_path = source / 'val' / 'val_annotations.txt'
    images_dir = source / 'val' / 'images'
    if not annotations_path.is_file():
        raise _layout_error(source, f'{annotations_path} is missing')
    if not images_dir.is_dir():
        raise _layout_error(source, f'{images_dir} is missing')
    known = set(wnids)
    wnid_by_file = {}
    for line_number, line in enumerate(annotations_path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        # The official file separates fields by tabs; file names hold no whitespace.
        fields = line.split()
        where = f'{annotations_path}:{line_number}'
        if len(fields) < 2:
            raise TinyImageNetError(f'{where}: expected "<file>\\t<wnid>\\t...", got {line!r}')
        file_name, wnid = fields[0], fields[1]
        if wnid not in known:
            raise TinyImageNetError(f'{where}: unknown wnid {wnid!r} (not in '
                                    f'{source / "wnids.txt"})')
        if file_name in wnid_by_file:
            raise TinyImageNetError(f'{where}: {file_name} is annotated a second time')
        if not (images_dir / file_name).is_file():
            raise TinyImageNetError(f'{where}: {images_dir / file_name} does not exist')
        wnid_by_file[file_name] = wnid
    unannotated = [path for path in _image_files(images_dir) if path.name not in wnid_by_file]
    if unannotated:
        raise TinyImageNetError(f'{unannotated[0]} has no line in {annotations_path} '
                                f'({len(unannotated)} images have none)')
    # The loader needs the same class folders in train and test.
    without_val = sorted(known - set(wnid_by_file.values()))
    if without_val:
        raise TinyImageNetError(f'{annotations_path} annotates no image of class '
                                f'{without_val[0]} ({len(without_val)} classes have none)')
    return [ImageToWrite(images_dir / file_name, wnid)
            for file_name, wnid in sorted(wnid_by_file.items(), key=lambda item: item[::-1])]


def _write_image(image: ImageToWrite, class_dir: pathlib.Path,
                 expected_size: tuple[int, int] | None) -> tuple[bool, tuple[int, int]]:
    """Writes one image as RGB into `class_dir`; returns (converted, its size).

    Size and mode come from the file header (PIL opens lazily), so a JPEG that is copied is
    never decoded here.
    """
    try:
        with Image.open(image.source) as opened:
            size = opened.size
            is_rgb_jpeg = opened.format == 'JPEG' and opened.mode == 'RGB'
            rgb_image = None if is_rgb_jpeg else opened.convert('RGB')
    except (OSError, SyntaxError, ValueError) as error:  # what PIL raises for a broken file
        raise TinyImageNetError(f'{image.source} could not be read as an image '
                                f'({type(error).__name__}: {error})') from error
    if expected_size is not None and size != expected_size:
        raise TinyImageNetError(
            f'{image.source} is {size[0]}x{size[1]} but the images before it are '
            f'{expected_size[0]}x{expected_size[1]}: all images must have one size')
    if is_rgb_jpeg:
        shutil.copyfile(image.source, class_dir / f'{image.source.stem}.jpg')
    else:
        rgb_image.save(class_dir / f'{image.source.stem}.png', format='PNG')
    return not is_rgb_jpeg, size


def _check_output_is_free(output: pathlib.Path) -> None:
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise TinyImageNetError(f'{output} already exists and is not empty: delete it to '
                                'prepare it again, or choose another --output')


def prepare(source: pathlib.Path | str, output: pathlib.Path | str, *,
            report: Callable[[str], None] = print) -> PrepareSummary:
    """Writes the image-folder layout of the archive at `source` to `output` (module docstring).

    `report` receives the progress lines.
    """
    source, output = pathlib.Path(source).expanduser(), pathlib.Path(output).expanduser()
    if not source.is_dir():
        raise TinyImageNetError(f'source {source} does not exist (expected the extracted '
                                'tiny-imagenet-200 folder)')
    _check_output_is_free(output)
    # The whole source is listed and checked before anything is written.
    wnids = read_wnids(source)
    images_by_split = {'train': list_train_images(source, wnids),
                       'test': read_val_annotations(source, wnids)}

    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.parent / f'.{output.name}.partial-{os.getpid()}'
    partial.mkdir()
    try:
        image_size = None
        num_converted = {}
        for split, images in images_by_split.items():
            for wnid in wnids:
                (partial / split / wnid).mkdir(parents=True)
            num_converted[split] = 0
            report_every = max(1, len(images) // _PROGRESS_STEPS)
            for index, image in enumerate(images, start=1):
                converted, image_size = _write_image(image, partial / split / image.wnid,
                                                     image_size)
                num_converted[split] += converted
                if index % report_every == 0 or index == len(images):
                    report(f'{split}: {index}/{len(images)} images written '
                           f'({num_converted[split]} converted to RGB PNG)')
        _check_output_is_free(output)  # again: something may have appeared meanwhile
        if output.exists():
            output.rmdir()
        partial.rename(output)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return PrepareSummary(num_classes=len(wnids),
                          num_images={split: len(images)
                                      for split, images in images_by_split.items()},
                          num_converted=num_converted, image_size=image_size)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--source', type=pathlib.Path, required=True,
                        help='the extracted official archive, .../tiny-imagenet-200')
    parser.add_argument('--output', type=pathlib.Path, required=True,
                        help='new folder for OUT/{train,test}/<wnid>/<image>')
    args = parser.parse_args(argv)
    try:
        summary = prepare(args.source, args.output,
                          report=lambda line: print(line, flush=True))
    except TinyImageNetError as error:
        sys.exit(f'error: {error}')
    width, height = summary.image_size
    print(f'wrote {args.output}: {summary.num_images["train"]} train and '
          f'{summary.num_images["test"]} test images of {summary.num_classes} classes, '
          f'{width}x{height}; train with --config=configs/tiny_imagenet.py '
          f'--config.dataset.data_dir={args.output}')


if __name__ == '__main__':
    main()
