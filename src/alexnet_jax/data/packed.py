"""Read a packed dataset (data/pack.py): whole 256x256 images by index, and the batches training takes.

A raw pack is uint8 records in memory-mapped shards: a training batch is one
gather of B records into a fresh array, no decode and no per-pixel work, so
the host keeps up with any accelerator while the page cache (or the disk)
does. The random crop, flip and colour noise happen on the device
(device_augment.train_crops), from each batch's 'example_ids'. A jpeg pack
(quality 95, about a seventh of the bytes) decodes each image whole with
tf.io.decode_jpeg; TensorFlow is imported only for it, so a raw pack is read
on machines without TensorFlow.

open_packed gives a sources.Source whose splits are sources.Split with
augments_on_device = True: the training loop calls registry.train_batches(split, aug, ...)
and registry.eval_batches(split, aug, ...) as for any split and gets these batches.

The contracts are pipeline.train_dataset's and eval_dataset's (the permutations
are numpy's, not TensorFlow's): process i reads examples i, i + P, i + 2P, ...;
each epoch a permutation that is a pure function of (seed, epoch),
np.random.default_rng([seed, epoch]).permutation; position p of the stream
(counted from the start of training, over epochs) is its p-th example, and
example_id = p * P + i. A run resumed at step k starts at position
k * per_process_batch at no extra cost. Evaluation pads every process to the
same number of batches with mask 0.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import itertools
import json
import resource
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from alexnet_jax.data import sources
from alexnet_jax.data.sources import eval_steps, local_indices
from alexnet_jax.errors import UserError

FORMAT = "alexnet_jax.packed"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ENCODINGS = ("raw", "jpeg")
SPLITS = ("train", "validation")
MAX_EXAMPLE_ID = np.iinfo(np.int32).max
PREFETCH_BATCHES = 2
# libjpeg's accurate integer IDCT: closer to the packed pixels than TensorFlow's default (fast) one, and measured
# no slower on 256x256 images here (0.41-0.51 ms each either way).
JPEG_DCT_METHOD = "INTEGER_ACCURATE"


# ---------------------------------------------------------------- opening


def read_manifest(directory: str | Path) -> dict:
    """The manifest of a pack, or a UserError saying why `directory` is not one."""
    root = Path(directory).expanduser()
    path = root / MANIFEST
    if not path.is_file():
        raise UserError(
            f"{root} is not a packed dataset (no {MANIFEST}); write one with "
            f"python -m alexnet_jax.commands.pack --data_dir=SOURCE --out={root}"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"{path} is unreadable ({error}); pack the dataset again") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
        raise UserError(
            f"{root} is packed as {manifest.get('format')!r} version {manifest.get('version')!r}; this code reads "
            f"{FORMAT!r} version {FORMAT_VERSION}: pack the dataset again"
        )
    return manifest


class PackedSplit(sources.Split):
    """One split of a pack: num_examples images uint8 [size, size, 3] and their int32 labels, by index.

    A sources.Split whose batches are its own (train_batches / eval_batches below,
    no tf.data): training batches carry whole images and 'example_ids', and the
    step crops them (augments_on_device). read(indices) gives pixels, not the
    encoded bytes a tf.data split's read(ref) gives: a packed split never goes
    through pipeline.train_dataset / eval_dataset.
    """

    augments_on_device = True

    def __init__(self, root: Path, name: str, manifest: dict):
        self.root, self.name = root, name
        self.size, self.encoding = int(manifest["size"]), manifest["encoding"]
        entry = manifest["splits"][name]
        self.num_examples = int(entry["count"])
        self.labels = np.load(root / entry["labels"]["file"]).astype(np.int32)
        self.shards = tuple(entry["shards"])
        counts = [int(shard["count"]) for shard in self.shards]
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # [shards + 1]
        if self.labels.shape != (self.num_examples,) or self.starts[-1] != self.num_examples:
            raise UserError(f"{root}: the {name} split's files disagree with its manifest; run pack --check on it")
        for shard in self.shards:
            path = root / shard["file"]
            expected = shard["count"] * self.record_bytes if self.encoding == "raw" else shard["bytes"]
            if not path.is_file() or path.stat().st_size != expected:
                raise UserError(
                    f"{path} is missing or has the wrong size; run python -m alexnet_jax.commands.pack --check "
                    f"--data_dir={root}, and pack again"
                )
        self._maps: dict[int, np.ndarray] = {}
        self._offsets: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    @property
    def record_bytes(self) -> int:
        return self.size * self.size * 3

    def read(self, indices) -> np.ndarray:
        """uint8 [n, size, size, 3]: the images at `indices` ([n] ints), in that order."""
        indices = np.asarray(indices, np.int64).reshape(-1)
        if indices.size and (indices.min() < 0 or indices.max() >= self.num_examples):
            raise IndexError(f"indices outside 0..{self.num_examples - 1} of the {self.name} split")
        if self.encoding == "raw":
            return self._gather(indices)
        return decode_jpegs(self.jpeg_files(indices), self.size)

    def train_batches(self, aug=None, **kwargs) -> Prefetcher:
        """registry.train_batches' entry point for a pack; `aug` is unused (the step augments)."""
        return train_batches(self, **kwargs)

    def eval_batches(self, aug, **kwargs) -> Prefetcher:
        """registry.eval_batches' entry point for a pack: eval_batches with aug.eval_crops, aug.image_size."""
        if aug.resize_size != self.size:
            raise UserError(
                f"resize_size={aug.resize_size} but this pack holds {self.size}x{self.size} images; use {self.size}"
            )
        return eval_batches(self, crops=aug.eval_crops, image_size=aug.image_size, **kwargs)

    def encoded(self, indices) -> dict[int, bytes]:
        """sources.Split's {index: encoded image}: the stored JPEG, or a PNG of the raw pixels (lossless)."""
        indices = sorted(int(index) for index in indices)
        if self.encoding == "jpeg":
            return dict(zip(indices, self.jpeg_files(indices)))
        from PIL import Image

        result = {}
        for index, image in zip(indices, self.read(indices)):
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, "PNG")
            result[index] = buffer.getvalue()
        return result

    def describe(self, index: int) -> str:
        return f"{self.root} {self.name}[{index}]"

    def host_items(self):
        """(encoded image, label, a file name) of every example in order, as sources.Split gives them."""
        suffix = "JPEG" if self.encoding == "jpeg" else "png"
        for start in range(0, self.num_examples, 256):
            chunk = range(start, min(start + 256, self.num_examples))
            files = self.encoded(chunk)
            for index in chunk:
                yield files[index], int(self.labels[index]), f"{index:08d}.{suffix}"

    def jpeg_files(self, indices) -> list[bytes]:
        """The stored JPEG files at `indices`, in that order (jpeg packs only)."""
        if self.encoding != "jpeg":
            raise ValueError("jpeg_files() is for jpeg packs; a raw pack stores pixels")
        result = []
        for index in np.asarray(indices, np.int64).reshape(-1):
            shard = int(np.searchsorted(self.starts, index, side="right")) - 1
            local = int(index - self.starts[shard])
            offsets = self._shard_offsets(shard)
            result.append(self._shard_map(shard)[offsets[local] : offsets[local + 1]].tobytes())
        return result

    def _gather(self, indices: np.ndarray) -> np.ndarray:
        """Records in index order (sequential reads for the page cache and the disk), placed in request order."""
        out = np.empty((len(indices), self.size, self.size, 3), np.uint8)
        order = np.argsort(indices, kind="stable")
        ordered = indices[order]
        shard_of = np.searchsorted(self.starts, ordered, side="right") - 1
        for position, shard, index in zip(order.tolist(), shard_of.tolist(), ordered.tolist()):
            out[position] = self._shard_map(shard)[index - self.starts[shard]]
        return out

    def _shard_map(self, shard: int) -> np.ndarray:
        records = self._maps.get(shard)
        if records is None:
            with self._lock:
                records = self._maps.get(shard)
                if records is None:
                    _allow_open_files(len(self._maps) + 64)
                    info = self.shards[shard]
                    shape = (info["count"], self.size, self.size, 3) if self.encoding == "raw" else (info["bytes"],)
                    records = np.memmap(self.root / info["file"], np.uint8, "r", shape=shape)
                    self._maps[shard] = records
        return records

    def _shard_offsets(self, shard: int) -> np.ndarray:
        offsets = self._offsets.get(shard)
        if offsets is None:
            offsets = np.load(self.root / self.shards[shard]["offsets"]["file"])
            self._offsets[shard] = offsets
        return offsets


def _allow_open_files(count: int) -> None:
    """Each memory map holds a file descriptor: raise the soft limit (up to the hard one) for packs of many shards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and count > soft // 2:
        wanted = min(hard, max(2 * count, soft)) if hard != resource.RLIM_INFINITY else 2 * count
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


@dataclasses.dataclass(frozen=True)
class PackedSource(sources.Source):
    """A sources.Source (name, class_names, num_classes, train, eval, image_side) of a pack."""

    encoding: str = "raw"
    directory: str = ""

    @property
    def size(self) -> int:
        """Side of every stored image (sources.Source.image_side)."""
        return self.image_side


def open_packed(directory: str) -> PackedSource:
    """A pack written by python -m alexnet_jax.commands.pack; cheap (no checksums: pack --check does those)."""
    root = Path(directory).expanduser().resolve()
    manifest = read_manifest(root)
    if manifest["encoding"] not in ENCODINGS or set(manifest["splits"]) != set(SPLITS):
        raise UserError(f"{root}: unknown encoding or splits in {MANIFEST}; pack the dataset again")
    train, evaluation = (PackedSplit(root, name, manifest) for name in SPLITS)
    return PackedSource(
        name=f"packed:{root}",
        class_names=tuple(manifest["class_names"]),
        train=train,
        eval=evaluation,
        image_side=int(manifest["size"]),
        encoding=manifest["encoding"],
        directory=str(root),
    )


# ---------------------------------------------------------------- JPEG


class _JpegDecoder:
    """tf.io.decode_jpeg of a list of JPEG files into one uint8 array, in parallel inside TensorFlow."""

    def __init__(self):
        import tensorflow as tf

        from alexnet_jax.data import pipeline

        pipeline.hide_accelerators_from_tf()

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def decode(files):
            def one(data):
                return tf.ensure_shape(tf.io.decode_jpeg(data, channels=3, dct_method=JPEG_DCT_METHOD), [None, None, 3])

            return tf.map_fn(one, files, fn_output_signature=tf.uint8, parallel_iterations=64)

        self.decode = decode

    def __call__(self, files: list[bytes], size: int) -> np.ndarray:
        if not files:
            return np.zeros((0, size, size, 3), np.uint8)
        images = self.decode(files).numpy()
        if images.shape[1:] != (size, size, 3):
            raise UserError(f"a packed JPEG decoded to {images.shape[1:]}, not ({size}, {size}, 3); pack again")
        return images


_DECODER: list[_JpegDecoder] = []  # one per process, made on first use (tracing costs a few ms)
_DECODER_LOCK = threading.Lock()


def decode_jpegs(files: list[bytes], size: int) -> np.ndarray:
    """uint8 [n, size, size, 3] from n JPEG files of size x size images."""
    with _DECODER_LOCK:
        if not _DECODER:
            _DECODER.append(_JpegDecoder())
    return _DECODER[0](files, size)


# ---------------------------------------------------------------- order


class TrainOrder:
    """Which example each position of this process's training stream is: a pure function of (seed, position)."""

    def __init__(self, num_examples: int, *, seed: int, process_index: int = 0, process_count: int = 1):
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} outside 0..{process_count - 1}")
        self.indices = local_indices(num_examples, process_index, process_count)
        if len(self.indices) == 0:
            raise UserError(f"{num_examples} training examples cannot feed {process_count} processes")
        self.seed, self.process_index, self.process_count = seed, process_index, process_count
        self._epochs: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()  # prefetch threads share the cache

    def permutation(self, epoch: int) -> np.ndarray:
        """[local examples] the epoch's order; neighbouring epochs stay cached (batches cross boundaries)."""
        with self._lock:
            order = self._epochs.get(epoch)
            if order is None:
                order = np.random.default_rng([self.seed % 2**63, epoch]).permutation(len(self.indices))
                self._epochs = {e: o for e, o in self._epochs.items() if abs(e - epoch) <= 1}
                self._epochs[epoch] = order
        return order

    def positions(self, first: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(example indices [count], example ids [count] int32) of positions first .. first + count - 1."""
        positions = np.arange(first, first + count, dtype=np.int64)
        example_ids = positions * self.process_count + self.process_index
        if example_ids[-1] > MAX_EXAMPLE_ID:
            raise UserError(
                f"training position {first + count - 1} on {self.process_count} process(es) gives example ids past "
                f"int32 ({MAX_EXAMPLE_ID:,}: every example read counts, about 1,676 epochs of ImageNet); "
                "train for fewer steps"
            )
        epochs, offsets = np.divmod(positions, len(self.indices))
        picks = np.empty(count, np.int64)
        for epoch in np.unique(epochs).tolist():
            in_epoch = epochs == epoch
            picks[in_epoch] = self.permutation(epoch)[offsets[in_epoch]]
        return self.indices[picks], example_ids.astype(np.int32)


# ---------------------------------------------------------------- batches


def train_batches(
    split: PackedSplit,
    *,
    per_process_batch: int,
    seed: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    prefetch: int = PREFETCH_BATCHES,
    threads: int = 0,
) -> Prefetcher:
    """Endless batches from start_step on: {'images': uint8 [B, size, size, 3] whole packed images (the device
    crops them), 'labels': int32 [B], 'example_ids': int32 [B]}.

    Background threads read `prefetch` batches ahead, so the gather (raw) or the
    decode (jpeg) overlaps the step; threads=0: 1 for raw (a copy), 2 for jpeg (the
    next batch decodes while the last one's stragglers finish).
    """
    order = TrainOrder(split.num_examples, seed=seed, process_index=process_index, process_count=process_count)

    def batch(step: int) -> dict[str, np.ndarray]:
        indices, example_ids = order.positions(step * per_process_batch, per_process_batch)
        return {"images": split.read(indices), "labels": split.labels[indices], "example_ids": example_ids}

    threads = threads or (1 if split.encoding == "raw" else 2)
    return Prefetcher(batch, itertools.count(start_step), depth=prefetch, threads=threads)


def eval_crops(images: np.ndarray, *, crops: int, image_size: int) -> np.ndarray:
    """uint8 [n, size, size, 3] -> [n, S, S, 3] (crops=1, the centre) or [n, 10, S, S, 3] (crops=10: four
    corners and the centre, then their mirror images): augment.eval_images' pixels on a size x size image."""
    size = images.shape[1]
    if not 0 < image_size <= size:
        raise UserError(f"image_size={image_size} must lie in 1..{size}, the side of the packed images")
    centre, far = (size - image_size) // 2, size - image_size
    if crops == 1:
        return images[:, centre : centre + image_size, centre : centre + image_size]
    if crops != 10:
        raise ValueError(f"crops={crops} is unsupported; use 1 (centre) or 10 (the paper's test)")
    corners = [(0, 0), (0, far), (far, 0), (far, far), (centre, centre)]
    five = np.stack([images[:, t : t + image_size, s : s + image_size] for t, s in corners], axis=1)
    return np.concatenate([five, five[:, :, :, ::-1]], axis=1)  # [n, 10, S, S, 3]


def eval_batches(
    split: PackedSplit,
    *,
    crops: int,
    image_size: int,
    per_process_batch: int,
    process_index: int = 0,
    process_count: int = 1,
    prefetch: int = PREFETCH_BATCHES,
) -> Prefetcher:
    """Exactly eval_steps(...) batches {'images': uint8 [B, S, S, 3] or [B, 10, S, S, 3], 'labels', 'mask'};
    padding has mask 0, so every example counts once over all processes."""
    indices = local_indices(split.num_examples, process_index, process_count)
    steps = eval_steps(split.num_examples, per_process_batch, process_count)
    shape = (image_size, image_size, 3) if crops == 1 else (crops, image_size, image_size, 3)
    eval_crops(np.zeros((0, split.size, split.size, 3), np.uint8), crops=crops, image_size=image_size)  # checks

    def batch(step: int) -> dict[str, np.ndarray]:
        chunk = indices[step * per_process_batch : (step + 1) * per_process_batch]
        images = np.zeros((per_process_batch, *shape), np.uint8)
        labels = np.zeros(per_process_batch, np.int32)
        mask = np.zeros(per_process_batch, np.int32)
        images[: len(chunk)] = eval_crops(split.read(chunk), crops=crops, image_size=image_size)
        labels[: len(chunk)] = split.labels[chunk]
        mask[: len(chunk)] = 1
        return {"images": images, "labels": labels, "mask": mask}

    return Prefetcher(batch, range(steps), depth=prefetch, threads=1 if split.encoding == "raw" else 2)


def device_batches(batches: Iterable[dict[str, np.ndarray]], local_device_count: int) -> Iterator[dict]:
    """Batches reshaped to [local_devices, per_device_batch, ...] for the pmap'ed step (pipeline.device_batches)."""
    for batch in batches:
        yield {key: value.reshape((local_device_count, -1) + value.shape[1:]) for key, value in batch.items()}


# ---------------------------------------------------------------- prefetch


class Prefetcher:
    """make(step) for each step, in order, computed up to `depth` steps ahead by `threads` threads.

    Errors are raised in the consumer at the step that failed. The threads hold no
    reference to this object: dropping the iterator (or close()) stops the read-ahead.
    """

    def __init__(self, make: Callable[[int], dict], steps: Iterable[int], *, depth: int, threads: int = 1):
        self._make, self._steps = make, iter(steps)
        self._executor = ThreadPoolExecutor(max(1, threads), thread_name_prefix="packed-prefetch")
        self._pending: collections.deque[Future] = collections.deque()
        for _ in range(max(1, depth)):
            self._submit()

    def _submit(self) -> None:
        step = next(self._steps, None)
        if step is not None:
            self._pending.append(self._executor.submit(self._make, step))

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if not self._pending:
            self.close()
            raise StopIteration
        future = self._pending.popleft()
        self._submit()
        try:
            return future.result()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop reading ahead and drop what was read."""
        for future in self._pending:
            future.cancel()
        self._pending.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def __del__(self):
        try:  # noqa: SIM105  (at interpreter shutdown contextlib may already be gone)
            self.close()
        except Exception:
            pass
