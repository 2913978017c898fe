"""Where examples come from: a TFDS builder, an image folder, or the bundled demo set.

A source yields encoded images (JPEG or PNG bytes) and integer labels; decoding
and augmentation happen later, in the pipeline, so a crop can be decoded alone.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from alexnet_jax.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
EVAL_SPLIT_DIRS = ("validation", "val")
IMAGENET_TARS = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")


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
) -> Source:
    """Resolve a dataset name to a Source, failing early with what to do."""
    if dataset == "image_folder":
        return image_folder(data_dir)
    if dataset == "demo_digits":
        from alexnet_jax.data import demo

        return image_folder(str(demo.write_digits(data_dir or None)))
    return tfds_source(
        dataset,
        data_dir=data_dir,
        manual_dir=manual_dir,
        train_split=train_split,
        eval_split=eval_split,
        download=download,
    )


def image_folder(root: str) -> Source:
    """ROOT/train/<class>/* and ROOT/validation/<class>/* (or val/), JPEG and PNG files."""
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
    return Source(
        name=f"image_folder:{root_path}",
        class_names=class_names,
        train=_list_files(train_dir, class_names),
        eval=_list_files(eval_dir, class_names),
    )


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
