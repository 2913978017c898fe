"""The one place that picks an input implementation: which Source a dataset name opens, which batcher a split takes.

Above the implementations and below their users (the loop, the tools): sources.py
defines the Split/Source contract and the file and TFDS splits, pipeline.py batches
those through tf.data, packed.py reads packs and batches them itself. Each of them
imports the contract only, so none imports another back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

from alexnet_jax.data import packed
from alexnet_jax.data.sources import Prepare, Source, Split, image_folder, tfds_source
from alexnet_jax.errors import UserError


def open_source_from_config(config, *, eval_split: str | None = None, prepare: Prepare = None) -> Source:
    """open_source with a run's config keys (config.json's "config" dict works too)."""
    get = config.get
    return open_source(
        get("dataset"),
        data_dir=get("data_dir", "") or "",
        manual_dir=get("manual_dir", "") or "",
        train_split=get("train_split", "train"),
        eval_split=eval_split or get("eval_split", "validation"),
        download=bool(get("download", False)),
        convert_to_array_record=bool(get("convert_to_array_record", False)),
        skip_bad_images=bool(get("skip_bad_images", False)),
        prepare=prepare,
    )


def open_source(
    dataset: str,
    *,
    data_dir: str = "",
    manual_dir: str = "",
    train_split: str = "train",
    eval_split: str = "validation",
    download: bool = False,
    skip_bad_images: bool = False,
    convert_to_array_record: bool = False,
    prepare: Prepare = None,
) -> Source:
    """Resolve a dataset name to a Source, failing early with what to do.

    skip_bad_images: an image folder's unreadable files (truncated, not an image)
    are dropped and logged instead of stopping the run. TFDS datasets were
    validated when they were prepared, so it does not apply to them.
    """
    if dataset in ("image_folder", "packed", "demo_digits"):
        _check_two_splits(dataset, train_split, eval_split)  # before any file is read
    if dataset == "image_folder":
        return _evaluating(image_folder(data_dir, skip_bad_images=skip_bad_images), eval_split)
    if dataset == "packed":
        if not data_dir:
            raise UserError(
                "config.dataset='packed' needs config.data_dir=DIR, made by python -m alexnet_jax.commands.pack"
            )
        return _evaluating(packed.open_packed(data_dir), eval_split)
    if dataset == "demo_digits":
        from alexnet_jax.data import demo

        folder = image_folder(str(demo.write_digits(data_dir or None)), skip_bad_images=skip_bad_images)
        return _evaluating(folder, eval_split)
    return tfds_source(
        dataset,
        data_dir=data_dir,
        manual_dir=manual_dir,
        train_split=train_split,
        eval_split=eval_split,
        download=download,
        convert_to_array_record=convert_to_array_record,
        prepare=prepare,
    )


# An image folder, a pack and the demo hold two splits: train/ and validation/ (an image folder's may be val/).
_EVAL_SPLITS = {"validation": "eval", "val": "eval", "train": "train"}


def _check_two_splits(dataset: str, train_split: str, eval_split: str) -> None:
    if eval_split not in _EVAL_SPLITS:
        raise UserError(
            f"eval split {eval_split!r}: a {dataset} source has only 'train' and 'validation'; "
            "pass --split=train or --split=validation (config.eval_split)"
        )
    if train_split != "train":
        raise UserError(
            f"config.train_split={train_split!r}: a {dataset} source trains on its 'train' split only; "
            "leave config.train_split at 'train'"
        )


def _evaluating(source: Source, eval_split: str) -> Source:
    """The source with its eval split the one asked for (its train split, to score what it trained on)."""
    if _EVAL_SPLITS[eval_split] == "train":
        return dataclasses.replace(source, eval=source.train)
    return source


def train_batches(split: Split, aug, **kwargs) -> Iterator[dict[str, np.ndarray]]:
    """Endless numpy training batches of any split: a pack's own reader, or the tf.data pipeline."""
    if isinstance(split, packed.PackedSplit):
        return split.train_batches(aug, **kwargs)
    from alexnet_jax.data import pipeline  # TensorFlow: only where a split needs it

    return pipeline.train_batches(split, aug, **kwargs)


def eval_batches(split: Split, aug, **kwargs) -> Iterator[dict[str, np.ndarray]]:
    """Padded, masked numpy evaluation batches of any split: a pack's own reader, or the tf.data pipeline."""
    if isinstance(split, packed.PackedSplit):
        return split.eval_batches(aug, **kwargs)
    from alexnet_jax.data import pipeline

    return pipeline.eval_batches(split, aug, **kwargs)
