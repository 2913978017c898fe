"""Input pipeline throughput: the training augmentation alone, next to two baselines.

    python bench/make_jpegs.py --out=/tmp/jpegs --count=400
    python bench/input_pipeline.py --data_dir=/tmp/jpegs [--dataset=image_folder] [--batch=128]

Measures images/s of pipeline.train_dataset (decode the crop window, flip,
resize to --image_size, uint8 pixels plus a PCA colour offset, batch, numpy as
the training loop receives it) after a warm-up, and on the same files:
  (a) PIL: decode, random crop (the paper's window) resized to image_size, flip,
      in a pool of --workers processes (one per core). PIL's BILINEAR shrink is
      antialiased: --resize_method=area is the like-for-like comparison;
  (b) bare tf.io.decode_jpeg of every file with tf.data AUTOTUNE (no crop, no resize).
The three alternate for --rounds rounds and the medians are reported. The last
line printed is one JSON object: img_per_s, pil_img_per_s, decode_img_per_s,
vs_pil (img_per_s / pil_img_per_s), vs_decode (img_per_s / decode_img_per_s),
and the setup. A TFDS --dataset runs the pipeline only (its
files are record shards, not JPEGs on disk).

Packed datasets (python -m alexnet_jax.commands.pack) join the rounds with --packed_dir:

    python -m alexnet_jax.commands.pack --data_dir=/tmp/jpegs --out=/tmp/jpegs_raw
    python -m alexnet_jax.commands.pack --data_dir=/tmp/jpegs --out=/tmp/jpegs_jpeg --encoding=jpeg
    python bench/input_pipeline.py --data_dir=/tmp/jpegs --packed_dir /tmp/jpegs_raw /tmp/jpegs_jpeg

packed.train_batches is timed as the training loop receives it (whole packed
images, labels, example ids; the crop happens on the device), with the CPU time
of this process, its reading threads included. Per encoding ENC:
packed_ENC_img_per_s, packed_ENC_cpu_ms_per_img, packed_ENC_vs_pipeline (x the
tf.data pipeline's img/s on the originals); for jpeg also bare tf.io.decode_jpeg
of the pack's own JPEG bytes from memory (packed_jpeg_decode_img_per_s) and
packed_jpeg_vs_decode / packed_jpeg_cpu_vs_decode (1.0 = as fast as bare decode).
With one --packed_dir also packed_img_per_s, packed_cpu_ms_per_img. --packed_only
times the packs alone (no TensorFlow needed for raw packs, e.g. on GPU hosts).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import time

import numpy as np


def cpu_seconds(who: int = resource.RUSAGE_SELF) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


class PipelineTimer:
    """pipeline.train_dataset as numpy batches, as the training loop receives them; timed in rounds."""

    def __init__(self, split, *, image_size: int, resize_size: int, resize_method: str, batch: int, warmup: int):
        from alexnet_jax.data import pipeline

        aug = pipeline.Augmentation(image_size=image_size, resize_size=resize_size, resize_method=resize_method)
        dataset = pipeline.train_dataset(split, aug, per_process_batch=batch, seed=0)
        self.iterator = dataset.as_numpy_iterator()
        self.batch, self.image_size = batch, image_size
        for _ in range(warmup):
            next(self.iterator)

    def __call__(self, batches: int) -> tuple[float, float]:
        """(images/s, CPU ms per image) over `batches` batches."""
        start, cpu_start = time.perf_counter(), cpu_seconds()
        for _ in range(batches):
            images = next(self.iterator)["images"]
        elapsed, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
        assert images.shape == (self.batch, self.image_size, self.image_size, 3) and images.dtype == np.uint8
        return batches * self.batch / elapsed, 1000 * cpu / (batches * self.batch)


def _pil_train_image(args: tuple[str, int, int, int]) -> int:
    """One training example the PIL way; returns a checksum so the work cannot be skipped."""
    from PIL import Image

    path, image_size, resize_size, seed = args
    rng = np.random.default_rng(seed)
    with Image.open(path) as picture:
        picture = picture.convert("RGB")
        width, height = picture.size
        shorter = min(width, height)
        side = max(1, round(shorter * image_size / resize_size))
        top = (height - shorter) // 2 + int(rng.integers(0, shorter - side + 1))
        left = (width - shorter) // 2 + int(rng.integers(0, shorter - side + 1))
        crop = picture.crop((left, top, left + side, top + side)).resize((image_size, image_size), Image.BILINEAR)
    pixels = np.asarray(crop, np.uint8)
    if rng.random() < 0.5:
        pixels = pixels[:, ::-1]
    return int(pixels[0, 0, 0])


class PilTimer:
    """A PIL process pool; create it before TensorFlow starts threads (the workers fork)."""

    def __init__(self, paths: list[str], *, image_size: int, resize_size: int, workers: int, repeats: int):
        self.work = [(path, image_size, resize_size, index) for index, path in enumerate(paths * repeats)]
        self.pool = multiprocessing.get_context("fork").Pool(workers)
        list(self.pool.imap_unordered(_pil_train_image, self.work[: 4 * workers], chunksize=1))  # warm-up

    def __call__(self) -> tuple[float, float]:
        """(images/s, CPU ms per image): wall time here, CPU time summed over the workers."""
        start = time.perf_counter()
        cpu = sum(self.pool.map(_timed_chunk, _chunks(self.work, 8), chunksize=1))
        return len(self.work) / (time.perf_counter() - start), 1000 * cpu / len(self.work)

    def close(self) -> None:
        self.pool.close()
        self.pool.join()


def _chunks(work: list, size: int) -> list[list]:
    return [work[index : index + size] for index in range(0, len(work), size)]


def _timed_chunk(chunk: list) -> float:
    """A worker's CPU seconds for a chunk of examples (the pool lives on, so RUSAGE_CHILDREN cannot see them)."""
    start = time.process_time()
    for item in chunk:
        _pil_train_image(item)
    return time.process_time() - start


class DecodeTimer:
    """read_file + decode_jpeg of every file (no crop, no resize) with tf.data AUTOTUNE."""

    def __init__(self, paths: list[str], *, repeats: int):
        import tensorflow as tf

        def decode(path):
            return tf.shape(tf.io.decode_jpeg(tf.io.read_file(path), channels=3))

        dataset = tf.data.Dataset.from_tensor_slices(paths).repeat(repeats)
        self.dataset = dataset.map(decode, num_parallel_calls=tf.data.AUTOTUNE).batch(64).prefetch(tf.data.AUTOTUNE)
        for _ in self.dataset.take(2):  # warm-up
            pass

    def __call__(self) -> tuple[float, float]:
        """Timed from the third batch on: a fresh iterator's start-up is left out, as for the pipeline."""
        iterator = iter(self.dataset)
        for _ in range(2):
            next(iterator)
        start, cpu_start = time.perf_counter(), cpu_seconds()
        count = 0
        for shapes in iterator:
            count += int(shapes.shape[0])
        elapsed, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
        return count / elapsed, 1000 * cpu / count


class PackedTimer:
    """packed.train_batches as the training loop receives them; one fresh iterator per round."""

    def __init__(self, split, *, batch: int, warmup: int):
        from alexnet_jax.data import packed

        self.iterator = packed.train_batches(split, per_process_batch=batch, seed=0)
        self.batch, self.size = batch, split.size
        for _ in range(warmup):
            next(self.iterator)

    def __call__(self, batches: int) -> tuple[float, float]:
        """(images/s, CPU ms per image) over `batches` batches, the reading threads' CPU included."""
        start, cpu_start = time.perf_counter(), cpu_seconds()
        for _ in range(batches):
            images = next(self.iterator)["images"]
        elapsed, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
        assert images.shape == (self.batch, self.size, self.size, 3) and images.dtype == np.uint8
        return batches * self.batch / elapsed, 1000 * cpu / (batches * self.batch)

    def close(self) -> None:
        self.iterator.close()  # no read-ahead while the other timers run


class PackedDecodeTimer(DecodeTimer):
    """Bare tf.io.decode_jpeg of a jpeg pack's own files, from memory, as the reader decodes them."""

    def __init__(self, split, *, repeats: int):
        import tensorflow as tf

        from alexnet_jax.data import packed

        files = split.jpeg_files(np.arange(split.num_examples))
        self.mean_kb = float(np.mean([len(data) for data in files])) / 1024

        def decode(data):
            return tf.shape(tf.io.decode_jpeg(data, channels=3, dct_method=packed.JPEG_DCT_METHOD))

        dataset = tf.data.Dataset.from_tensor_slices(files).repeat(repeats)
        self.dataset = dataset.map(decode, num_parallel_calls=tf.data.AUTOTUNE).batch(64).prefetch(tf.data.AUTOTUNE)
        for _ in self.dataset.take(2):  # warm-up
            pass


def _packed_rounds(args, packs: dict, rounds: dict, decode_timers: dict) -> None:
    """One round of every pack (and of bare decode of each jpeg pack's files)."""
    for key, source in packs.items():
        if key in decode_timers:
            rounds[key + "_decode"].append(decode_timers[key]())
        timer = PackedTimer(source.train, batch=args.batch, warmup=args.warmup)
        rounds[key].append(timer(args.batches))
        timer.close()
        del timer


def _packed_figures(figures: dict, packs: dict, medians: dict, decode_timers: dict) -> None:
    for key, source in packs.items():
        rate, cpu = medians[key]
        figures[f"{key}_size"] = source.size
        if "pipeline" in medians:
            figures[f"{key}_vs_pipeline"] = round(rate / medians["pipeline"][0], 2)
            figures[f"{key}_cpu_vs_pipeline"] = round(medians["pipeline"][1] / cpu, 2)
        if key in decode_timers:
            decode, decode_cpu = medians[key + "_decode"]
            figures[f"{key}_mean_kb"] = round(decode_timers[key].mean_kb, 1)
            figures[f"{key}_vs_decode"] = round(rate / decode, 2)
            figures[f"{key}_cpu_vs_decode"] = round(decode_cpu / cpu, 2)
    encodings = [source.encoding for source in packs.values()]
    figures["packed_encoding"] = encodings[0] if len(encodings) == 1 else encodings
    if len(packs) == 1:
        (key,) = packs
        figures["packed_img_per_s"] = figures[f"{key}_img_per_s"]
        figures["packed_cpu_ms_per_img"] = figures[f"{key}_cpu_ms_per_img"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", default="", help="an image folder (ROOT/train/<class>/*) or a TFDS data_dir")
    parser.add_argument("--dataset", default="image_folder", help="image_folder or a TFDS name")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--resize_size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=3, help="batches before the clock starts")
    parser.add_argument("--batches", type=int, default=20, help="batches timed")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="PIL pool processes")
    parser.add_argument("--repeats", type=int, default=3, help="passes over the files for the baselines")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timings of all three; medians reported")
    parser.add_argument("--resize_method", default="bilinear", help="bilinear or area (config.resize_method)")
    parser.add_argument("--pipeline_only", action="store_true", help="skip the PIL and bare-decode baselines")
    parser.add_argument("--packed_dir", nargs="*", default=[], help="packs (data/pack.py) to time as well")
    parser.add_argument("--packed_only", action="store_true", help="time only the --packed_dir packs")
    args = parser.parse_args()

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from alexnet_jax.data import packed, registry, sources

    packs = {}
    for directory in args.packed_dir:
        pack = packed.open_packed(directory)
        key = f"packed_{pack.encoding}" + (f"_{len(packs)}" if f"packed_{pack.encoding}" in packs else "")
        packs[key] = pack
    if args.packed_only and not packs:
        parser.error("--packed_only needs --packed_dir")
    if not args.packed_only and not args.data_dir:
        parser.error("--data_dir is required (or --packed_only with --packed_dir)")
    split = None if args.packed_only else registry.open_source(args.dataset, data_dir=args.data_dir).train
    figures: dict[str, object] = {
        "dataset": args.dataset,
        "data_dir": args.data_dir,
        "train_examples": split.num_examples if split is not None else None,
        "image_size": args.image_size,
        "resize_size": args.resize_size,
        "batch": args.batch,
        "timed_images": args.batch * args.batches,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
    }
    for key, pack in packs.items():
        figures[f"{key}_dir"] = pack.directory
    is_files = isinstance(split, sources.FileSplit) and not args.pipeline_only
    pil_timer = decode_timer = None
    if is_files:  # the PIL pool forks before TensorFlow starts threads
        paths = [str(path) for path in split.paths]
        figures["mean_file_kb"] = round(float(np.mean([os.path.getsize(path) for path in paths])) / 1024, 1)
        pil_timer = PilTimer(
            paths, image_size=args.image_size, resize_size=args.resize_size, workers=args.workers, repeats=args.repeats
        )
        decode_timer = DecodeTimer(paths, repeats=args.repeats)
        figures["pil_workers"] = args.workers
    packed_decode_timers = {
        key: PackedDecodeTimer(pack.train, repeats=args.repeats)
        for key, pack in packs.items()
        if pack.encoding == "jpeg"
    }
    # Rounds alternate the timers so that a noisy neighbour hits them alike; medians are reported.
    rounds: dict[str, list[tuple[float, float]]] = {"pipeline": [], "pil": [], "decode": []}
    for key in packs:
        rounds[key] = []
        if key in packed_decode_timers:
            rounds[key + "_decode"] = []
    for round_index in range(args.rounds):
        if is_files:
            rounds["pil"].append(pil_timer())
            rounds["decode"].append(decode_timer())
        if split is not None:
            # A fresh iterator per round, dropped after: a live one would prefetch while the others run.
            timer = PipelineTimer(
                split,
                image_size=args.image_size,
                resize_size=args.resize_size,
                resize_method=args.resize_method,
                batch=args.batch,
                warmup=args.warmup,
            )
            rounds["pipeline"].append(timer(args.batches))
            del timer
        _packed_rounds(args, packs, rounds, packed_decode_timers)
        print(
            f"round {round_index + 1}: "
            + ", ".join(f"{name} {values[-1][0]:,.0f} img/s" for name, values in rounds.items() if values),
            flush=True,
        )
    if pil_timer is not None:
        pil_timer.close()
    prefixes = {"pipeline": "", "pil": "pil_", "decode": "decode_"}
    medians = {}
    for name, values in rounds.items():
        if values:
            rate, cpu = float(np.median([v[0] for v in values])), float(np.median([v[1] for v in values]))
            medians[name] = (rate, cpu)
            prefix = prefixes.get(name, name + "_")
            figures[prefix + "img_per_s"] = round(rate, 1)
            figures[prefix + "cpu_ms_per_img"] = round(cpu, 4 if name.startswith("packed") else 3)
    figures["rounds"] = args.rounds
    figures["resize_method"] = args.resize_method
    if is_files:
        # Wall-clock ratios, and CPU-time ratios (what they would be with every core free).
        (rate, cpu), (pil, pil_cpu), (decode, decode_cpu) = medians["pipeline"], medians["pil"], medians["decode"]
        figures["vs_pil"] = round(rate / pil, 2)
        figures["vs_decode"] = round(rate / decode, 2)
        figures["cpu_vs_pil"] = round(pil_cpu / cpu, 2)
        figures["cpu_vs_decode"] = round(decode_cpu / cpu, 2)
    if packs:
        _packed_figures(figures, packs, medians, packed_decode_timers)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
