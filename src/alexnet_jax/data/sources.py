"""Where examples come from: a TFDS builder, an image folder, or the bundled demo set.

A source yields encoded images (JPEG or PNG bytes) and integer labels; decoding
and augmentation happen later, in the pipeline, so a crop can be decoded alone.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from alexnet_jax.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
EVAL_SPLIT_DIRS = ("validation", "val")
IMAGENET_TARS = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")
JPEG_MAGIC = b"\xff\xd8\xff"
JPEG_END = b"\xff\xd9"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PNG_END = b"IEND"
# The end marker must lie in the file's last bytes: encoders may pad a little after it.
TAIL_BYTES = 1024
BAD_IMAGES_SHOWN = 10

log = logging.getLogger("alexnet_jax.data")


@dataclasses.dataclass(frozen=True)
class FileSplit:
    """A split held as files on disk: random access by index."""

    paths: np.ndarray  # [N] str
    labels: np.ndarray  # [N] int32

    @property
    def num_examples(self) -> int:
        return len(self.paths)


@dataclasses.dataclass(frozen=True)
class TfdsSplit:
    """A split of a prepared TFDS dataset, read as a stream of records."""

    builder: object  # tfds.core.DatasetBuilder
    split: str
    image_key: str
    label_key: str
    num_examples: int


@dataclasses.dataclass(frozen=True)
class Source:
    name: str
    class_names: tuple[str, ...]
    train: FileSplit | TfdsSplit
    eval: FileSplit | TfdsSplit

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def open_source(
    dataset: str,
    *,
    data_dir: str = "",
    manual_dir: str = "",
    train_split: str = "train",
    eval_split: str = "validation",
    download: bool = False,
    skip_bad_images: bool = False,
) -> Source:
    """Resolve a dataset name to a Source, failing early with what to do.

    skip_bad_images: an image folder's unreadable files (truncated, not an image)
    are dropped and logged instead of stopping the run. TFDS datasets were
    validated when they were prepared, so it does not apply to them.
    """
    if dataset == "image_folder":
        return image_folder(data_dir, skip_bad_images=skip_bad_images)
    if dataset == "demo_digits":
        from alexnet_jax.data import demo

        return image_folder(str(demo.write_digits(data_dir or None)), skip_bad_images=skip_bad_images)
    return tfds_source(
        dataset,
        data_dir=data_dir,
        manual_dir=manual_dir,
        train_split=train_split,
        eval_split=eval_split,
        download=download,
    )


def image_folder(root: str, *, skip_bad_images: bool = False) -> Source:
    """ROOT/train/<class>/* and ROOT/validation/<class>/* (or val/), JPEG and PNG files.

    Every file is checked first (find_bad_images): a bad one stops here with its
    name, rather than as a decode error deep inside tf.data, unless
    skip_bad_images, which drops and logs it.
    """
    root_path = Path(root).expanduser()
    train_dir = root_path / "train"
    if not train_dir.is_dir():
        raise UserError(
            f"image folder {root_path} has no train/ directory; lay it out as "
            f"{root_path}/train/<class>/*.jpg and {root_path}/validation/<class>/*.jpg"
        )
    eval_dir = next((root_path / d for d in EVAL_SPLIT_DIRS if (root_path / d).is_dir()), None)
    if eval_dir is None:
        raise UserError(
            f"image folder {root_path} has no validation/ (or val/) directory next to train/; "
            "create one with the same <class> subdirectories"
        )
    class_names = tuple(sorted(p.name for p in train_dir.iterdir() if p.is_dir()))
    if not class_names:
        raise UserError(f"{train_dir} holds no class directories; put images in {train_dir}/<class>/")
    unknown = sorted(p.name for p in eval_dir.iterdir() if p.is_dir() and p.name not in class_names)
    if unknown:
        raise UserError(
            f"{eval_dir} has classes that train/ lacks: {unknown[:5]}; every evaluation class "
            "needs a training directory of the same name"
        )
    train = _list_files(train_dir, class_names)
    evaluation = _list_files(eval_dir, class_names)
    bad = find_bad_images(np.concatenate([train.paths, evaluation.paths]))
    if bad:
        train, evaluation = _handle_bad_images(bad, train, evaluation, skip=skip_bad_images)
    return Source(name=f"image_folder:{root_path}", class_names=class_names, train=train, eval=evaluation)


def check_image(path: str) -> str | None:
    """Why `path` cannot be trained on, or None if it looks whole.

    Cheap (two small reads, no decode): the format comes from the magic bytes, not
    the name, so a PNG named .JPEG is fine; a JPEG without its end marker or a PNG
    without its IEND chunk in its last TAIL_BYTES is truncated, unless a full
    decode succeeds (data appended after the image). CMYK JPEGs decode to RGB and pass.
    """
    try:
        with open(path, "rb") as handle:
            head = handle.read(len(PNG_MAGIC))
            size = handle.seek(0, os.SEEK_END)
            handle.seek(max(0, size - TAIL_BYTES))
            tail = handle.read()
    except OSError as error:
        return f"unreadable ({error.strerror})"
    if head.startswith(JPEG_MAGIC):
        return None if JPEG_END in tail or _decodes(path) else "truncated JPEG (no end marker)"
    if head.startswith(PNG_MAGIC):
        return None if PNG_END in tail or _decodes(path) else "truncated PNG (no IEND chunk)"
    if size == 0:
        return "empty file"
    return "not a JPEG or PNG image"


def _decodes(path: str) -> bool:
    """Full decode, for the rare file whose end marker is not at the end (some cameras append data)."""
    import tensorflow as tf

    try:
        tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    except tf.errors.OpError:
        return False
    return True


def find_bad_images(paths, *, threads: int = 32) -> list[tuple[str, str]]:
    """[(path, reason)] for every file check_image rejects, in the order given.

    Threads overlap the file opens, which dominate on network file systems.
    """
    with ThreadPoolExecutor(threads) as pool:
        reasons = list(pool.map(check_image, [str(path) for path in paths], chunksize=256))
    return [(str(path), reason) for path, reason in zip(paths, reasons) if reason is not None]


def _handle_bad_images(
    bad: list[tuple[str, str]], train: FileSplit, evaluation: FileSplit, *, skip: bool
) -> tuple[FileSplit, FileSplit]:
    listing = "; ".join(f"{path}: {reason}" for path, reason in bad[:BAD_IMAGES_SHOWN])
    more = f"; and {len(bad) - BAD_IMAGES_SHOWN} more" if len(bad) > BAD_IMAGES_SHOWN else ""
    if not skip:
        raise UserError(
            f"{len(bad)} bad image file(s): {listing}{more}. Replace or delete them, or set "
            "--config.skip_bad_images=True to skip them"
        )
    for path, reason in bad:
        log.warning("skipping bad image %s: %s", path, reason)
    log.warning("skipped %d bad image file(s) (config.skip_bad_images=True)", len(bad))
    names = {path for path, _ in bad}
    kept = []
    for split in (train, evaluation):
        keep = np.array([path not in names for path in split.paths], bool)
        if not keep.any():
            raise UserError(f"every image of a split was bad ({listing}{more}); nothing is left to read")
        kept.append(FileSplit(split.paths[keep], split.labels[keep]))
    return kept[0], kept[1]


def _list_files(split_dir: Path, class_names: tuple[str, ...]) -> FileSplit:
    paths, labels = [], []
    for label, name in enumerate(class_names):
        class_dir = split_dir / name
        if not class_dir.is_dir():
            continue
        for entry in sorted(os.scandir(class_dir), key=lambda e: e.name):
            if entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS):
                paths.append(entry.path)
                labels.append(label)
    if not paths:
        raise UserError(f"{split_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)}) in its class directories")
    return FileSplit(np.array(paths), np.array(labels, np.int32))


def tfds_source(
    name: str,
    *,
    data_dir: str,
    manual_dir: str,
    train_split: str,
    eval_split: str,
    download: bool,
) -> Source:
    """A TFDS image classification dataset, prepared on first use where that needs no download."""
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir or None)
    except tfds.core.registered.DatasetNotFoundError as error:
        raise UserError(
            f"config.dataset={name!r} is not a TFDS dataset, 'image_folder' or 'demo_digits' "
            f"({str(error).splitlines()[0]})"
        ) from None
    if not builder.is_prepared():
        _prepare(builder, name, manual_dir=manual_dir, download=download)
    image_key, label_key = _supervised_keys(builder, name)
    label_feature = builder.info.features[label_key]
    class_names = tuple(label_feature.names)
    splits = []
    for split in (train_split, eval_split):
        if split not in builder.info.splits:
            raise UserError(
                f"TFDS dataset {name!r} has no split {split!r}; it has {sorted(builder.info.splits)}: "
                "set config.train_split / config.eval_split"
            )
        splits.append(TfdsSplit(builder, split, image_key, label_key, builder.info.splits[split].num_examples))
    return Source(name=name, class_names=class_names, train=splits[0], eval=splits[1])


def _prepare(builder, name: str, *, manual_dir: str, download: bool) -> None:
    import tensorflow_datasets as tfds

    if name.split(":")[0] == "imagenet2012":
        default_manual = Path(builder._data_dir_root) / "downloads" / "manual"  # noqa: SLF001
        manual = Path(manual_dir or default_manual).expanduser()
        missing = [tar for tar in IMAGENET_TARS if not (manual / tar).is_file()]
        if missing:
            raise UserError(
                f"ImageNet is not prepared in {builder.data_dir} and {manual} lacks "
                f"{' and '.join(missing)}: download both ILSVRC-2012 tars from image-net.org, put "
                f"them in one directory and run again with --config.manual_dir=THAT_DIR"
            )
        config = tfds.download.DownloadConfig(manual_dir=str(manual))
        builder.download_and_prepare(download_config=config)
        return
    if not download:
        raise UserError(
            f"TFDS dataset {name!r} is not prepared in {builder.data_dir}; run again with "
            "--config.download=True to let TFDS download and prepare it"
        )
    builder.download_and_prepare()


def _supervised_keys(builder, name: str) -> tuple[str, str]:
    keys = builder.info.supervised_keys
    if not keys or len(keys) < 2 or not isinstance(keys[0], str):
        raise UserError(
            f"TFDS dataset {name!r} has no (image, label) supervised keys; it is not an image classification set"
        )
    image_key, label_key = keys[0], keys[1]
    if not hasattr(builder.info.features[label_key], "num_classes"):
        raise UserError(f"TFDS dataset {name!r}: feature {label_key!r} is not a class label")
    return image_key, label_key
