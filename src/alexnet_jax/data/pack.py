"""Pack a dataset once as the paper's 256x256 images, so that training input never decodes.

Every image of the training split and of the evaluation split (stored as "train"
and "validation") becomes what the paper trained on: the shorter side resized
to --size with an antialiasing filter (PIL's JPEG draft scaling where it stays
above the target, then LANCZOS; CMYK, greyscale and palette images become RGB),
then the central size x size patch. Example i of a split is example i of the
source's listing (image folder: classes in name order, files in name order;
TFDS: the split's records in file order), so labels stay with their images.

On disk (packed.py reads it; format version packed.FORMAT_VERSION):
  manifest.json            format, version, encoding, size, class names (label order), and per split
                           its count, labels file and shards: file name, count, bytes and sha256
  {split}-labels.npy       int32 [N]
  raw:  {split}-NNNNN.raw  uint8 [count, size, size, 3] records back to back, no header: np.memmap
  jpeg: {split}-NNNNN.jpeg JPEG (quality 95) files back to back, and {split}-NNNNN.offsets.npy
                           int64 [count + 1]: image j is bytes offsets[j]:offsets[j + 1]
A shard closes at --shard_images images or --shard_mb megabytes, whichever comes first.

DIR is written into a staging directory next to it (.DIR.staging-HOST-PID-*) and
renamed when whole, so it is either absent or complete. A pack killed hard
(SIGKILL, power loss) leaves only that hidden staging directory; the next pack
to the same --out removes it once its process is gone. Ctrl-C and SIGTERM
remove it at once. Train with --config.dataset=packed --config.data_dir=DIR."""

from __future__ import annotations

import collections
import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from alexnet_jax.data import packed
from alexnet_jax.errors import UserError

log = logging.getLogger("alexnet_jax.data")

JPEG_QUALITY = 95
DEFAULT_SHARD_MB = 1024
PROGRESS_SECONDS = 10.0
CHUNKSIZE = 8  # images per pool task: enough to amortise the hand-off, small enough to keep order cheap


# ---------------------------------------------------------------- one image


def square_patch(data: bytes, size: int) -> np.ndarray:
    """Encoded image -> uint8 [size, size, 3]: shorter side resized to size (antialiased), central patch."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as picture:
        width, height = picture.size
        if width <= height:
            target = (size, max(size, round(height * size / width)))
        else:
            target = (max(size, round(width * size / height)), size)
        picture.draft("RGB", target)  # JPEG: let the decoder scale by 1/2, 1/4, 1/8 where that stays >= target
        picture = picture.convert("RGB")  # CMYK, greyscale, palette and alpha images become RGB
        if picture.size != target:
            picture = picture.resize(target, Image.Resampling.LANCZOS)
        left, top = (target[0] - size) // 2, (target[1] - size) // 2
        return np.asarray(picture.crop((left, top, left + size, top + size)), np.uint8)


def encode_jpeg(patch: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(patch).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def _pack_one(task: tuple[str | bytes, int, str]) -> tuple[bytes | None, str | None]:
    """Pool worker: (path or encoded bytes, size, encoding) -> (record, None) or (None, why it failed)."""
    source, size, encoding = task
    try:
        if isinstance(source, str):
            with open(source, "rb") as handle:
                source = handle.read()
        patch = square_patch(source, size)
        return (patch.tobytes() if encoding == "raw" else encode_jpeg(patch)), None
    except Exception as error:  # PIL raises many types for a bad file; the caller names it
        return None, f"{type(error).__name__}: {error}"


# ---------------------------------------------------------------- shards


class ShardWriter:
    """Records of one split, appended in order into shards that close at a count or a byte size."""

    def __init__(self, directory: Path, split: str, encoding: str, *, shard_images: int, shard_bytes: int):
        self.directory, self.split, self.encoding = directory, split, encoding
        self.shard_images, self.shard_bytes = shard_images, shard_bytes
        self.shards: list[dict] = []
        self._handle = None

    def add(self, record: bytes) -> None:
        if self._handle is not None and (
            (self.shard_images and self._count >= self.shard_images) or self._bytes + len(record) > self.shard_bytes
        ):
            self._close_shard()
        if self._handle is None:
            self._open_shard()
        self._handle.write(record)
        self._digest.update(record)
        self._count += 1
        self._bytes += len(record)
        self._offsets.append(self._bytes)

    def close(self) -> list[dict]:
        if self._handle is not None:
            self._close_shard()
        return self.shards

    def _open_shard(self) -> None:
        self._name = f"{self.split}-{len(self.shards):05d}.{self.encoding}"
        self._handle = open(self.directory / self._name, "wb")  # noqa: SIM115  (closed in _close_shard)
        self._digest = hashlib.sha256()
        self._count, self._bytes, self._offsets = 0, 0, [0]

    def _close_shard(self) -> None:
        self._handle.flush()
        os.fsync(self._handle.fileno())  # on disk before the rename publishes the pack
        self._handle.close()
        self._handle = None
        shard = {"file": self._name, "count": self._count, "bytes": self._bytes, "sha256": self._digest.hexdigest()}
        if self.encoding == "jpeg":
            offsets_name = self._name.removesuffix(".jpeg") + ".offsets.npy"
            shard["offsets"] = save_npy(self.directory / offsets_name, np.asarray(self._offsets, np.int64))
        self.shards.append(shard)


def save_npy(path: Path, array: np.ndarray) -> dict:
    """np.save, synced to disk; returns {'file', 'sha256'} for the manifest."""
    with open(path, "wb") as handle:
        np.save(handle, array)
        handle.flush()
        os.fsync(handle.fileno())
    return {"file": path.name, "sha256": file_sha256(path)}


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------- sources


def _examples(split) -> Iterator[tuple[str | bytes, int, str]]:
    """(file path or encoded bytes, label, a name for messages) of every example of a split, in its order."""
    from alexnet_jax.data import sources

    if not isinstance(split, sources.FileSplit):  # TFDS records: TensorFlow reads them, on the CPU
        from alexnet_jax.data import pipeline

        pipeline.hide_accelerators_from_tf()
    for index, (item, label, _) in enumerate(split.host_items()):
        yield item, label, split.describe(index)


class _Progress:
    """A log line every PROGRESS_SECONDS: how far, how fast, how long to go."""

    def __init__(self, split: str, total: int):
        self.split, self.total = split, total
        self.start = self.last = time.perf_counter()

    def update(self, done: int) -> None:
        now = time.perf_counter()
        if now - self.last < PROGRESS_SECONDS:
            return
        self.last = now
        rate = done / (now - self.start)
        left = (self.total - done) / rate if rate > 0 else float("inf")
        log.info(
            "pack %s: %s/%s images, %.0f img/s, about %.0f s left",
            self.split,
            f"{done:,}",
            f"{self.total:,}",
            rate,
            left,
        )


# ---------------------------------------------------------------- the pack


def _staging_pattern(target: Path) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(target.name)}\.staging-(?P<host>.+)-(?P<pid>\d+)-[^-]+$")


def remove_stale_staging(target: Path) -> list[Path]:
    """Remove the staging directories of earlier packs to `target` whose process is gone (this host only)."""
    pattern, host, removed = _staging_pattern(target), socket.gethostname(), []
    if not target.parent.is_dir():
        return removed
    for entry in target.parent.iterdir():
        match = pattern.match(entry.name)
        if not match or not entry.is_dir() or match["host"] != host:
            continue
        try:
            os.kill(int(match["pid"]), 0)
        except ProcessLookupError:
            shutil.rmtree(entry, ignore_errors=True)
            log.warning("removed %s, left by an interrupted pack (process %s)", entry, match["pid"])
            removed.append(entry)
        except PermissionError:
            pass  # alive, another user's
    return removed


def write_packed(
    data_dir: str,
    out: str,
    *,
    encoding: str = "raw",
    size: int = 256,
    dataset: str = "image_folder",
    train_split: str = "train",
    eval_split: str = "validation",
    workers: int | None = None,
    skip_bad_images: bool = False,
    shard_images: int = 0,
    shard_mb: float = DEFAULT_SHARD_MB,
) -> dict:
    """Write the pack (see the module docstring); returns its manifest."""
    from alexnet_jax.data import registry

    target = _check_arguments(
        data_dir, out, encoding=encoding, size=size, dataset=dataset, shard_images=shard_images, shard_mb=shard_mb
    )
    source = registry.open_source(
        dataset, data_dir=data_dir, train_split=train_split, eval_split=eval_split, skip_bad_images=skip_bad_images
    )
    splits = {"train": source.train, "validation": source.eval}
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target)
    if encoding == "raw":
        _check_room(target, sum(split.num_examples for split in splits.values()) * size * size * 3)
    staging = _make_staging(target)
    try:
        start = time.perf_counter()
        manifest = {
            "format": packed.FORMAT,
            "version": packed.FORMAT_VERSION,
            "encoding": encoding,
            "size": size,
            "jpeg_quality": JPEG_QUALITY if encoding == "jpeg" else None,
            "dataset": dataset,
            "source": str(data_dir),
            "class_names": list(source.class_names),
            "splits": {},
            "skipped": {},
        }
        shard = dict(
            encoding=encoding,
            size=size,
            skip_bad_images=skip_bad_images,
            shard_images=shard_images,
            shard_bytes=int(shard_mb * (1 << 20)),
        )
        with multiprocessing.get_context("spawn").Pool(workers or os.cpu_count()) as pool:
            for name, split in splits.items():
                record, skipped = _pack_split(pool, _examples(split), name, split.num_examples, staging, **shard)
                manifest["splits"][name] = record
                manifest["skipped"][name] = skipped
        manifest["seconds"] = round(time.perf_counter() - start, 1)
        _write_manifest(staging, manifest)
        staging.rename(target)  # atomic: DIR appears whole or not at all
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _check_arguments(data_dir, out, *, encoding, size, dataset, shard_images, shard_mb) -> Path:
    """The resolved --out, after every argument was checked (nothing is read or written yet)."""
    if encoding not in packed.ENCODINGS:
        raise UserError(f"--encoding={encoding!r} is not one of {', '.join(packed.ENCODINGS)}")
    if size < 1:
        raise UserError(f"--size={size} must be positive")
    if shard_images < 0 or shard_mb <= 0:
        raise UserError("--shard_images must be >= 0 (0: no limit) and --shard_mb positive")
    from alexnet_jax.data import sources

    return sources.new_output_directory(out, data_dir, dataset)


def _check_room(target: Path, needed: int) -> None:
    free = shutil.disk_usage(target.parent).free
    if needed > free:
        raise UserError(
            f"the raw pack needs {needed / 1e9:.1f} GB and {target.parent} has {free / 1e9:.1f} GB free; "
            "free space, choose another --out, or pass --encoding=jpeg (several times smaller)"
        )


def _make_staging(target: Path) -> Path:
    """A hidden sibling of --out, named by host and pid so a later pack can tell a dead one's leftovers."""
    prefix = f".{target.name}.staging-{socket.gethostname()}-{os.getpid()}-"
    staging = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the pack is an ordinary directory
    return staging


def _write_manifest(staging: Path, manifest: dict) -> None:
    with open(staging / packed.MANIFEST, "w") as handle:
        handle.write(json.dumps(manifest, indent=1) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _pack_split(
    pool, examples, name, total, staging, *, encoding, size, skip_bad_images, shard_images, shard_bytes
) -> tuple[dict, list[str]]:
    """Pack one split in source order; returns its manifest entry and the names of skipped images."""
    writer = ShardWriter(staging, name, encoding, shard_images=shard_images, shard_bytes=shard_bytes)
    pending = collections.deque()  # (label, name) of the tasks handed out and not yet collected, in order
    skipped = []

    def tasks():  # runs in the pool's task thread, which blocks once the pipe to the workers is full
        for source, label, example_name in examples:
            pending.append((label, example_name))
            yield source, size, encoding

    progress = _Progress(name, total)
    kept = []
    # imap, not imap_unordered: results come back in task order, so index i is example i of the source.
    for index, (record, error) in enumerate(pool.imap(_pack_one, tasks(), chunksize=CHUNKSIZE)):
        label, example_name = pending.popleft()
        if error is not None:
            if not skip_bad_images:
                raise UserError(
                    f"cannot read the image {example_name} ({error}); replace or delete it, or pass --skip_bad_images"
                )
            log.warning("skipping bad image %s: %s", example_name, error)
            skipped.append(example_name)
        else:
            writer.add(record)
            kept.append(label)
        progress.update(index + 1)
    shards = writer.close()
    if not kept:
        raise UserError(f"every image of the {name} split was bad or missing; nothing is left to pack")
    log.info("pack %s: %s images in %d shard(s), %d skipped", name, f"{len(kept):,}", len(shards), len(skipped))
    record = {
        "count": len(kept),
        "labels": save_npy(staging / f"{name}-labels.npy", np.asarray(kept, np.int32)),
        "shards": shards,
    }
    return record, skipped


# ---------------------------------------------------------------- --check


def check_packed(directory: str) -> list[str]:
    """Problems of a pack: a missing or unreadable file, a count or size that disagrees, a checksum mismatch."""
    root = Path(directory).expanduser()
    try:
        manifest = packed.read_manifest(root)
    except UserError as error:
        return [str(error)]
    problems = []
    size, encoding, classes = manifest["size"], manifest["encoding"], len(manifest["class_names"])
    for name, split in manifest["splits"].items():
        counted = 0
        for shard in split["shards"]:
            path = root / shard["file"]
            if not path.is_file():
                problems.append(f"{path}: missing")
                continue
            counted += shard["count"]
            actual = path.stat().st_size
            expected = shard["count"] * size * size * 3 if encoding == "raw" else shard["bytes"]
            if actual != expected:
                problems.append(f"{path}: {actual} bytes, the manifest says {expected}")
            elif file_sha256(path) != shard["sha256"]:
                problems.append(f"{path}: sha256 differs from the manifest (the file changed or is corrupt)")
            if encoding == "jpeg":
                problems.extend(_check_offsets(root, shard))
        if counted != split["count"]:
            problems.append(f"{name}: shards hold {counted} images, the manifest says {split['count']}")
        problems.extend(_check_labels(root, name, split, classes))
    return problems


def _check_offsets(root: Path, shard: dict) -> list[str]:
    path = root / shard["offsets"]["file"]
    if not path.is_file():
        return [f"{path}: missing"]
    if file_sha256(path) != shard["offsets"]["sha256"]:
        return [f"{path}: sha256 differs from the manifest"]
    offsets = np.load(path)
    if len(offsets) != shard["count"] + 1 or offsets[0] != 0 or offsets[-1] != shard["bytes"]:
        return [
            f"{path}: {len(offsets)} offsets ending at {offsets[-1]}, expected {shard['count'] + 1} ending at "
            f"{shard['bytes']}"
        ]
    if np.any(np.diff(offsets) <= 0):
        return [f"{path}: offsets do not increase"]
    return []


def _check_labels(root: Path, name: str, split: dict, classes: int) -> list[str]:
    path = root / split["labels"]["file"]
    if not path.is_file():
        return [f"{path}: missing"]
    if file_sha256(path) != split["labels"]["sha256"]:
        return [f"{path}: sha256 differs from the manifest"]
    labels = np.load(path)
    if labels.shape != (split["count"],):
        return [f"{path}: {labels.shape[0]} labels for {split['count']} images"]
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        return [f"{path}: labels outside 0..{classes - 1}"]
    return []
