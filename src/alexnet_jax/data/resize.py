"""Write a pre-resized copy of a dataset once, so that every epoch decodes smaller JPEGs.

The copy is an image folder (DST/train/<class>/*, DST/validation/<class>/*) whose
images have their shorter side resized to --size (the paper's 256) with an
antialiasing filter and saved as JPEG quality 95; images already no larger are
copied byte for byte. It is written into a staging directory next to DST and
renamed when complete, so DST is either absent or whole; SRC is only read.
Train with --config.dataset=image_folder --config.data_dir=DST (and the same
image_size/resize_size as before: the pipeline's crop is relative to the
shorter side, so it sees the same windows)."""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from alexnet_jax.errors import UserError

log = logging.getLogger("alexnet_jax.data")

JPEG_QUALITY = 95
SPLIT_DIRS = {"train": "train", "eval": "validation"}
STAMP = "RESIZED.json"


def resize_bytes(data: bytes, size: int, quality: int = JPEG_QUALITY) -> bytes | None:
    """Encoded image -> JPEG with the shorter side `size`; None when it is already no larger."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as picture:
        width, height = picture.size
        shorter = min(width, height)
        if shorter <= size:
            return None
        scale = size / shorter
        target = (max(1, round(width * scale)), max(1, round(height * scale)))
        picture.draft("RGB", target)  # JPEG: let the decoder scale by 1/2, 1/4, 1/8 where that stays >= target
        picture = picture.convert("RGB")  # CMYK, greyscale, palette and alpha images become RGB
        picture = picture.resize(target, Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        picture.save(buffer, "JPEG", quality=quality)
        return buffer.getvalue()


def _write_one(task: tuple[str | bytes, str, int]) -> tuple[str, str | None]:
    """Pool worker: (source path or bytes, destination, size) -> (destination, error or None)."""
    source, destination, size = task
    try:
        if isinstance(source, str):
            with open(source, "rb") as handle:
                data = handle.read()
        else:
            data = source
        resized = resize_bytes(data, size)
        with open(destination, "wb") as handle:
            handle.write(data if resized is None else resized)
    except Exception as error:  # PIL raises many types for a bad file; the caller names it
        return destination, f"{type(error).__name__}: {error}"
    return destination, None


def _tasks(source, staging: Path, size: int):
    for key, split in (("train", source.train), ("eval", source.eval)):
        for item, label, name in split.host_items():
            yield item, str(staging / SPLIT_DIRS[key] / source.class_names[label] / name), size


def write_resized(
    data_dir: str,
    out: str,
    *,
    size: int = 256,
    dataset: str = "image_folder",
    workers: int | None = None,
    skip_bad_images: bool = False,
) -> dict:
    """Write the copy (see the module docstring); returns what RESIZED.json records."""
    from alexnet_jax.data import registry, sources

    if size < 1:
        raise UserError(f"--size={size} must be positive")
    target = sources.new_output_directory(out, data_dir, dataset)
    source = registry.open_source(dataset, data_dir=data_dir, skip_bad_images=skip_bad_images)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))
    try:
        for split_dir in SPLIT_DIRS.values():
            for name in source.class_names:
                (staging / split_dir / name).mkdir(parents=True, exist_ok=True)
        tasks = _tasks(source, staging, size)
        start = time.perf_counter()
        count, failed = 0, []
        with multiprocessing.get_context("spawn").Pool(workers or os.cpu_count()) as pool:
            for destination, error in pool.imap_unordered(_write_one, tasks, chunksize=16):
                count += 1
                if error is not None:
                    failed.append((destination, error))
                    if not skip_bad_images:
                        sources.report_bad_images(failed, skip=False, how_to_skip="--skip_bad_images")
        if failed:
            sources.report_bad_images(failed, skip=True, how_to_skip="--skip_bad_images")
        for destination, _ in failed:
            os.remove(destination)
        record = {
            "source": str(data_dir),
            "dataset": dataset,
            "size": size,
            "quality": JPEG_QUALITY,
            "images": count - len(failed),
            "skipped": len(failed),
            "seconds": round(time.perf_counter() - start, 1),
        }
        (staging / STAMP).write_text(json.dumps(record, indent=1) + "\n")
        staging.rename(target)  # atomic: DST appears whole or not at all
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return record


def check_decodes(data_dir: str, *, threads: int | None = None) -> list[tuple[str, str]]:
    """[(path, error)] of the image-folder files TensorFlow cannot decode in full (slow: a full decode each)."""
    from alexnet_jax.data import sources

    source = sources.image_folder(data_dir, skip_bad_images=True)
    paths = [str(path) for split in (source.train, source.eval) for path in split.paths]
    with ThreadPoolExecutor(threads or os.cpu_count()) as pool:
        errors = list(pool.map(sources.decode_error, paths))
    return [(path, error) for path, error in zip(paths, errors) if error is not None]
