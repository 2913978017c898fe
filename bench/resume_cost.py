"""What a resumed run pays before its first batch: a TFDS dataset as ArrayRecord (read by index) vs TFRecord (a stream).

    python bench/resume_cost.py [--work_dir=/tmp/resume_cost] [--examples=5000] > bench/results/resume_cost_cpu.jsonl

Builds, once, a TFDS dataset of --examples small real-photo training examples
(random square crops of scikit-image's photographs, one class per photo, as
--size JPEGs; bench/tfds_folder.py's builder, prepared locally, nothing
downloaded) in each file format. For each format it then starts
pipeline.train_dataset (the training loop's input) at step 0 and at a step
--epochs epochs and half an epoch in, and prints one JSON line per case: the
seconds from building the input to holding its first batch (median of --repeats)
and the records read by then. ArrayRecord builds the epoch's order and reads one
batch (plus read-ahead); TFRecord reads its epoch's stream up to the position (and
fills its shuffle buffer, 10,000 records: here the whole epoch). The last line
checks the bounds: ArrayRecord's far resume at most 1.5x its step-0 resume,
TFRecord's records read at most one epoch (plus read-ahead).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np
import tfds_folder

PHOTOS = ("astronaut", "chelsea", "coffee", "hubble_deep_field", "rocket", "immunohistochemistry")


def write_photo_crops(root: str, count: int, size: int, seed: int = 0) -> None:
    """ROOT/train/<photo>/*.JPEG (count crops in all) and ROOT/validation/<photo>/* (a few)."""
    import skimage.data
    from PIL import Image

    rng = np.random.default_rng(seed)
    photos = [Image.fromarray(getattr(skimage.data, name)()).convert("RGB") for name in PHOTOS]
    for split, total in (("train", count), ("validation", 6 * len(PHOTOS))):
        for index in range(total):
            label = index % len(PHOTOS)
            photo = photos[label]
            side = int(rng.integers(min(photo.size) // 3, 2 * min(photo.size) // 3 + 1))
            left, top = (int(rng.integers(0, extent - side + 1)) for extent in photo.size)
            directory = os.path.join(root, split, PHOTOS[label])
            os.makedirs(directory, exist_ok=True)
            crop = photo.crop((left, top, left + side, top + side)).resize((size, size), Image.BILINEAR)
            crop.save(os.path.join(directory, f"{index:06d}.JPEG"), quality=90)


class CountingRecords:
    """An ArrayRecord data source that counts the records read through it."""

    def __init__(self, records):
        self.records, self.read = records, 0

    def __getitems__(self, indices):
        self.read += len(indices)
        return self.records.__getitems__(indices)


def count_array_record_reads(split) -> CountingRecords:
    counter = CountingRecords(split._records)  # noqa: SLF001 (the bench looks inside on purpose)
    split.__dict__["_records"] = counter  # the cached property's slot
    return counter


def count_tfrecord_reads(split):
    """Every record the split's stream reads passes a counter (a host callback: counted runs are not timed)."""
    import tensorflow as tf

    counter = CountingRecords(None)
    stream = split._records  # noqa: SLF001

    def counted(process_index, process_count):
        def count(image, label):
            counter.read += 1
            return label

        def through(image, label):
            return image, tf.numpy_function(count, [image, label], label.dtype, stateful=True)

        return stream(process_index, process_count).map(through)

    split.__dict__["_records"] = counted  # an instance attribute hides the method
    return counter


def first_batch(split, *, start_step: int, batch: int, image_size: int) -> float:
    """Seconds from building the training input at start_step to holding its first batch."""
    from alexnet_jax.data import pipeline

    aug = pipeline.Augmentation(image_size=image_size, resize_size=image_size * 8 // 7)
    start = time.perf_counter()
    batches = pipeline.train_batches(split, aug, per_process_batch=batch, seed=0, start_step=start_step)
    next(batches)
    return time.perf_counter() - start


def open_split(data_dir: str):
    from alexnet_jax.data import registry

    return registry.open_source(tfds_folder.NAME, data_dir=data_dir).train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work_dir", default="/tmp/resume_cost")
    parser.add_argument("--examples", type=int, default=5000)
    parser.add_argument("--size", type=int, default=64, help="side of the stored JPEGs")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=50, help="the far resume: this many epochs and a half in")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    folder = os.path.join(args.work_dir, f"photos_{args.examples}_{args.size}")
    if not os.path.isdir(folder):
        write_photo_crops(folder, args.examples, args.size)
    steps_per_epoch = args.examples // args.batch
    far_step = args.epochs * steps_per_epoch + steps_per_epoch // 2
    lines = []
    for file_format in ("array_record", "tfrecord"):
        data_dir = os.path.join(args.work_dir, f"tfds_{args.examples}_{args.size}_{file_format}")
        if not os.path.isdir(os.path.join(data_dir, tfds_folder.NAME)):
            tfds_folder.prepare(folder, data_dir, file_format)
        counter = count_array_record_reads if file_format == "array_record" else count_tfrecord_reads
        for start_step in (0, far_step):
            image_size = args.size - args.size // 8
            seconds = [
                first_batch(open_split(data_dir), start_step=start_step, batch=args.batch, image_size=image_size)
                for _ in range(args.repeats)
            ]
            split = open_split(data_dir)
            reads = counter(split)
            first_batch(split, start_step=start_step, batch=args.batch, image_size=image_size)
            line = {
                "format": file_format,
                "reader": type(split).__name__,
                "resume_step": start_step,
                "resume_epoch": round(start_step / steps_per_epoch, 2),
                "seconds_to_first_batch": round(statistics.median(seconds), 3),
                "seconds_rounds": [round(value, 3) for value in seconds],
                "records_read_before_first_batch": reads.read,
                "train_examples": split.num_examples,
                "batch": args.batch,
                "image_size": image_size,
                "cpus": os.cpu_count(),
            }
            lines.append(line)
            print(json.dumps(line), flush=True)
    array_record = [line for line in lines if line["format"] == "array_record"]
    tfrecord_far = [line for line in lines if line["format"] == "tfrecord"][-1]
    check = {
        "array_record_far_vs_step0": round(
            array_record[1]["seconds_to_first_batch"] / array_record[0]["seconds_to_first_batch"], 2
        ),
        "array_record_far_within_1_5x": array_record[1]["seconds_to_first_batch"]
        <= 1.5 * array_record[0]["seconds_to_first_batch"],
        "tfrecord_far_records_read_in_epochs": round(
            tfrecord_far["records_read_before_first_batch"] / args.examples, 2
        ),
        "tfrecord_far_within_one_epoch": tfrecord_far["records_read_before_first_batch"]
        <= args.examples + 10 * args.batch,  # read-ahead of up to 10 batches of the next epoch
    }
    print(json.dumps(check))


if __name__ == "__main__":
    main()
