"""Input pipeline throughput: the training augmentation alone, next to two baselines.

    python bench/make_jpegs.py --out=/tmp/jpegs --count=400
    python bench/input_pipeline.py --data_dir=/tmp/jpegs [--dataset=image_folder] [--batch=128]

Measures images/s of pipeline.train_dataset (decode the crop window, resize to
--image_size, flip, PCA noise, normalise, batch, numpy as the training loop
receives it) after a warm-up, and on the same files:
  (a) PIL: decode, random crop (the paper's window) resized to image_size, flip,
      in a pool of --workers processes (one per core);
  (b) bare tf.io.decode_jpeg of every file with tf.data AUTOTUNE (no crop, no resize).
The last line printed is one JSON object: img_per_s, pil_img_per_s,
decode_img_per_s, vs_pil (img_per_s / pil_img_per_s), vs_decode (img_per_s /
decode_img_per_s), and the setup. A TFDS --dataset runs the pipeline only (its
files are record shards, not JPEGs on disk).
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


def time_pipeline(
    split, *, image_size: int, resize_size: int, batch: int, warmup: int, batches: int
) -> tuple[float, float]:
    """(images/s, CPU ms per image) of pipeline.train_dataset, as numpy batches."""
    from alexnet_jax.data import pipeline

    aug = pipeline.Augmentation(image_size=image_size, resize_size=resize_size)
    iterator = pipeline.train_dataset(split, aug, per_process_batch=batch, seed=0).as_numpy_iterator()
    for _ in range(warmup):
        next(iterator)
    start, cpu_start = time.perf_counter(), cpu_seconds()
    for _ in range(batches):
        images = next(iterator)["images"]
    elapsed, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
    assert images.shape == (batch, image_size, image_size, 3)
    return batches * batch / elapsed, 1000 * cpu / (batches * batch)


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
    pixels = np.asarray(crop, np.float32)
    if rng.random() < 0.5:
        pixels = pixels[:, ::-1]
    return int(pixels[0, 0, 0])


def time_pil(paths: list[str], *, image_size: int, resize_size: int, workers: int, repeats: int) -> tuple[float, float]:
    """(images/s, CPU ms per image) of a PIL process pool; run before TensorFlow starts (fork)."""
    work = [(path, image_size, resize_size, index) for index, path in enumerate(paths * repeats)]
    cpu_start = cpu_seconds(resource.RUSAGE_CHILDREN)
    pool = multiprocessing.get_context("fork").Pool(workers)
    list(pool.imap_unordered(_pil_train_image, work[: 4 * workers], chunksize=1))  # warm-up
    start = time.perf_counter()
    list(pool.imap_unordered(_pil_train_image, work, chunksize=8))
    elapsed = time.perf_counter() - start
    pool.close()
    pool.join()  # children's CPU time is counted once they are reaped
    cpu = cpu_seconds(resource.RUSAGE_CHILDREN) - cpu_start
    return len(work) / elapsed, 1000 * cpu / (len(work) + 4 * workers)


def time_bare_decode(paths: list[str], *, repeats: int) -> tuple[float, float]:
    """(images/s, CPU ms per image) of read_file + decode_jpeg over the files, AUTOTUNE."""
    import tensorflow as tf

    def decode(path):
        return tf.shape(tf.io.decode_jpeg(tf.io.read_file(path), channels=3))

    dataset = tf.data.Dataset.from_tensor_slices(paths).repeat(repeats)
    dataset = dataset.map(decode, num_parallel_calls=tf.data.AUTOTUNE).batch(64).prefetch(tf.data.AUTOTUNE)
    for _ in dataset.take(2):  # warm-up
        pass
    start, cpu_start = time.perf_counter(), cpu_seconds()
    count = 0
    for shapes in dataset:
        count += int(shapes.shape[0])
    elapsed, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
    return count / elapsed, 1000 * cpu / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", required=True, help="an image folder (ROOT/train/<class>/*) or a TFDS data_dir")
    parser.add_argument("--dataset", default="image_folder", help="image_folder or a TFDS name")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--resize_size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=3, help="batches before the clock starts")
    parser.add_argument("--batches", type=int, default=20, help="batches timed")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="PIL pool processes")
    parser.add_argument("--repeats", type=int, default=3, help="passes over the files for the baselines")
    parser.add_argument("--pipeline_only", action="store_true", help="skip the PIL and bare-decode baselines")
    args = parser.parse_args()

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from alexnet_jax.data import sources

    source = sources.open_source(args.dataset, data_dir=args.data_dir)
    split = source.train
    figures: dict[str, object] = {
        "dataset": args.dataset,
        "data_dir": args.data_dir,
        "train_examples": split.num_examples,
        "image_size": args.image_size,
        "resize_size": args.resize_size,
        "batch": args.batch,
        "timed_images": args.batch * args.batches,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
    }
    is_files = isinstance(split, sources.FileSplit) and not args.pipeline_only
    if is_files:  # PIL first: its pool forks before TensorFlow starts threads
        paths = [str(path) for path in split.paths]
        figures["mean_file_kb"] = round(float(np.mean([os.path.getsize(path) for path in paths])) / 1024, 1)
        pil, pil_cpu = time_pil(
            paths, image_size=args.image_size, resize_size=args.resize_size, workers=args.workers, repeats=args.repeats
        )
        figures.update(pil_img_per_s=round(pil, 1), pil_cpu_ms_per_img=round(pil_cpu, 3), pil_workers=args.workers)
        print(f"PIL pool of {args.workers}: {pil:,.0f} images/s, {pil_cpu:.2f} CPU ms/image", flush=True)
        decode, decode_cpu = time_bare_decode(paths, repeats=args.repeats)
        figures.update(decode_img_per_s=round(decode, 1), decode_cpu_ms_per_img=round(decode_cpu, 3))
        print(f"bare tf.io.decode_jpeg: {decode:,.0f} images/s, {decode_cpu:.2f} CPU ms/image", flush=True)
    rate, cpu = time_pipeline(
        split,
        image_size=args.image_size,
        resize_size=args.resize_size,
        batch=args.batch,
        warmup=args.warmup,
        batches=args.batches,
    )
    figures.update(img_per_s=round(rate, 1), cpu_ms_per_img=round(cpu, 3))
    print(f"pipeline.train_dataset: {rate:,.0f} images/s, {cpu:.2f} CPU ms/image", flush=True)
    if is_files:
        # Wall-clock ratios, and CPU-time ratios (what they would be with every core free).
        figures["vs_pil"] = round(rate / pil, 2)
        figures["vs_decode"] = round(rate / decode, 2)
        figures["cpu_vs_pil"] = round(pil_cpu / cpu, 2)
        figures["cpu_vs_decode"] = round(decode_cpu / cpu, 2)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
