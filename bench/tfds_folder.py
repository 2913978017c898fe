"""An image folder as a TFDS dataset, prepared locally in either file format: the benches' stand-in for ImageNet.

    python bench/tfds_folder.py --folder=/tmp/jpegs --data_dir=/tmp/jpegs_tfds --file_format=array_record

FolderImages holds ROOT/train/<class>/* and ROOT/validation/<class>/* as
{'image': encoded JPEG (stored as is, not re-encoded), 'label'}, with ImageNet's
supervised keys, so alexnet_jax reads it as it reads imagenet2012
(--dataset=folder_images --data_dir=DATA_DIR). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os

import tensorflow_datasets as tfds

NAME = "folder_images"


class FolderImages(tfds.core.GeneratorBasedBuilder):
    """The JPEGs of an image folder, one class per subdirectory."""

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, folder: str | None = None, **kwargs):
        self._folder = folder
        super().__init__(**kwargs)

    def _classes(self) -> list[str]:
        return sorted(os.listdir(os.path.join(self._folder, "train"))) if self._folder else []

    def _info(self) -> tfds.core.DatasetInfo:
        label = tfds.features.ClassLabel(names=self._classes()) if self._folder else tfds.features.ClassLabel()
        features = tfds.features.FeaturesDict({"image": tfds.features.Image(encoding_format="jpeg"), "label": label})
        return tfds.core.DatasetInfo(builder=self, features=features, supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in ("train", "validation")}

    def _generate_examples(self, split: str):
        for label, name in enumerate(self._classes()):
            directory = os.path.join(self._folder, split, name)
            for file_name in sorted(os.listdir(directory)) if os.path.isdir(directory) else ():
                yield f"{name}/{file_name}", {"image": os.path.join(directory, file_name), "label": label}


def prepare(folder: str, data_dir: str, file_format: str) -> FolderImages:
    """Write the folder as NAME under data_dir in file_format ('array_record' or 'tfrecord'); returns the builder."""
    builder = FolderImages(folder=folder, data_dir=data_dir, file_format=file_format)
    builder.download_and_prepare()
    return builder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", required=True, help="an image folder: ROOT/train/<class>/*.JPEG")
    parser.add_argument("--data_dir", required=True, help="the TFDS data_dir to write")
    parser.add_argument("--file_format", default="array_record", choices=("array_record", "tfrecord"))
    args = parser.parse_args()
    builder = prepare(args.folder, args.data_dir, args.file_format)
    print(f"prepared {NAME} as {args.file_format} in {builder.data_dir}")


if __name__ == "__main__":
    main()
