"""Which loader reads a TFDS ArrayRecord dataset: tf.data over indices, or Grain; next to today's image files.

    python bench/make_jpegs.py --out=/tmp/jpegs --count=400
    python bench/tfds_folder.py --folder=/tmp/jpegs --data_dir=/tmp/jpegs_tfds --file_format=array_record
    pip install grain   # only to measure it
    python bench/loaders.py --folder=/tmp/jpegs --data_dir=/tmp/jpegs_tfds

The same 360 training JPEGs, the same training augmentation (augment.train_image:
crop window decode, resize to 224, flip, PCA offset; uint8 out), batches of 128 as
numpy, after a warm-up, alternating for --rounds rounds (medians reported):
  files:  pipeline.train_dataset over the image folder (FileSplit): today's path, the bar;
  tfdata: pipeline.train_dataset over the ArrayRecord split (indices -> records read
          in batches -> parsed -> the same decode map): the path the project keeps;
  grain:  grain.MapDataset over the TFDS data source (tfds.data_source, SkipDecoding),
          its shuffle and repeat, the same augmentation as a tf.function per example,
          batched, in --grain_workers worker processes (mp_prefetch) of --grain_threads threads.
Medians of img/s and of CPU ms per image (this process and its workers): on a shared
machine the CPU cost is the fairer figure, since a loader with more threads takes a
larger share of contended cores.
The last line is one JSON object: {files,tfdata,grain}_img_per_s, tfdata_vs_files,
grain_vs_files, grain_vs_tfdata, and the setup.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import time

import numpy as np
import tfds_folder

IMAGE_SIZE, RESIZE_SIZE = 224, 256


@functools.cache
def _tf_train_image():
    """augment.train_image as one traced function, per process (each Grain worker builds its own)."""
    import tensorflow as tf

    from alexnet_jax.data import augment

    signature = [tf.TensorSpec([], tf.string), tf.TensorSpec([2], tf.int64)]

    @tf.function(input_signature=signature, autograph=False)
    def train_image(data, seed):
        return augment.train_image(
            data, seed, image_size=IMAGE_SIZE, resize_size=RESIZE_SIZE, flip=True, pca_noise_std=0.1
        )

    return train_image


def grain_train_image(index: int, record: dict) -> dict:
    """The pipeline's training example, from one {'image', 'label'} record at stream position `index`."""
    image, color = _tf_train_image()(record["image"], np.array([0, index], np.int64))
    return {"images": image.numpy(), "labels": np.int32(record["label"]), "color": color.numpy()}


def grain_batches(data_dir: str, *, batch: int, workers: int, threads: int):
    import grain
    import tensorflow_datasets as tfds
    from absl import flags

    flags.FLAGS.mark_as_parsed()  # Grain reads its options from absl flags; this script has none
    source = tfds.data_source(
        tfds_folder.NAME, data_dir=data_dir, split="train", decoders={"image": tfds.decode.SkipDecoding()}
    )
    import loaders  # this file as a module, not __main__: workers unpickle the map by reference, and trace it once

    dataset = grain.MapDataset.source(source).shuffle(seed=0).repeat().map_with_index(loaders.grain_train_image)
    dataset = dataset.batch(batch, drop_remainder=True).to_iter_dataset(grain.ReadOptions(num_threads=threads))
    if workers:
        dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return iter(dataset)


def pipeline_batches(split, *, batch: int):
    from alexnet_jax.data import pipeline

    aug = pipeline.Augmentation(image_size=IMAGE_SIZE, resize_size=RESIZE_SIZE)
    return pipeline.train_batches(split, aug, per_process_batch=batch, seed=0)


def cpu_seconds() -> float:
    """CPU time of this process and its live children (Grain's workers) so far."""
    import psutil

    processes = [psutil.Process(), *psutil.Process().children(recursive=True)]
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def timed(batches, *, count: int, warmup: int, batch: int) -> tuple[float, float]:
    """(images/s, CPU ms per image) over `count` batches after `warmup` (start-up, tracing, spawns left out).

    On a shared machine the CPU time is the fairer figure: a loader with more
    threads or processes takes a larger share of contended cores.
    """
    for _ in range(warmup):
        next(batches)
    start, cpu_start = time.perf_counter(), cpu_seconds()
    for _ in range(count):
        images = next(batches)["images"]
    elapsed, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
    assert images.shape == (batch, IMAGE_SIZE, IMAGE_SIZE, 3) and images.dtype == np.uint8
    return count * batch / elapsed, 1000 * cpu / (count * batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", required=True, help="the image folder (bench/make_jpegs.py)")
    parser.add_argument("--data_dir", required=True, help="the same images as an ArrayRecord TFDS dataset")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--grain_workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--grain_threads",
        type=int,
        default=16,
        help="threads per Grain worker (Grain's default 16); 1 takes no more of a shared CPU than tf.data's pool",
    )
    parser.add_argument("--loaders", nargs="*", default=["files", "tfdata", "grain"])
    args = parser.parse_args()

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from alexnet_jax.data import registry

    folder = registry.open_source("image_folder", data_dir=args.folder).train
    records = registry.open_source(tfds_folder.NAME, data_dir=args.data_dir).train
    assert folder.num_examples == records.num_examples, "the folder and the TFDS dataset hold other images"
    makers = {
        "files": lambda: pipeline_batches(folder, batch=args.batch),
        "tfdata": lambda: pipeline_batches(records, batch=args.batch),
        "grain": lambda: grain_batches(
            args.data_dir, batch=args.batch, workers=args.grain_workers, threads=args.grain_threads
        ),
    }
    rounds: dict[str, list[tuple[float, float]]] = {name: [] for name in args.loaders}
    for round_index in range(args.rounds):
        for name in args.loaders:
            batches = makers[name]()  # a fresh one per round, dropped after: no read-ahead while others run
            rounds[name].append(timed(batches, count=args.batches, warmup=args.warmup, batch=args.batch))
            if hasattr(batches, "close"):
                batches.close()
            del batches
        print(f"round {round_index + 1}: " + ", ".join(f"{n} {v[-1][0]:,.0f} img/s" for n, v in rounds.items()))
    figures: dict[str, object] = {
        "train_examples": records.num_examples,
        "image_size": IMAGE_SIZE,
        "batch": args.batch,
        "timed_images": args.batch * args.batches,
        "rounds": args.rounds,
        "grain_workers": args.grain_workers,
        "grain_threads": args.grain_threads,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
    }
    medians = {name: float(np.median([rate for rate, _ in values])) for name, values in rounds.items()}
    for name, value in medians.items():
        figures[f"{name}_img_per_s"] = round(value, 1)
        figures[f"{name}_cpu_ms_per_img"] = round(float(np.median([cpu for _, cpu in rounds[name]])), 3)
        figures[f"{name}_rounds"] = [round(rate, 1) for rate, _ in rounds[name]]
    for a, b in (("tfdata", "files"), ("grain", "files"), ("grain", "tfdata")):
        if a in medians and b in medians:
            figures[f"{a}_vs_{b}"] = round(medians[a] / medians[b], 2)
            figures[f"{a}_cpu_vs_{b}"] = round(figures[f"{b}_cpu_ms_per_img"] / figures[f"{a}_cpu_ms_per_img"], 2)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
