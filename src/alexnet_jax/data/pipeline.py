"""tf.data pipelines over any split of encoded images: per-process shard, order, decode + augment, batch.

Training order is a pure function of (seed, epoch, position) for splits read by
index (image files, TFDS ArrayRecord: sources.train_order), so a run resumed at
step k starts reading exactly where step k left off, at a cost that does not grow
with the position; a TFDS TFRecord split re-reads the start of its epoch. Evaluation pads every process to
the same number of batches and marks padding with mask 0, so every example counts
exactly once on any device and process count. The splits (sources.py) say how to
list and read their examples; nothing here asks which kind of split it holds.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Iterator

import numpy as np
import tensorflow as tf

from alexnet_jax.data import augment
from alexnet_jax.data.sources import Split, eval_steps, local_indices
from alexnet_jax.errors import UserError

AUTOTUNE = tf.data.AUTOTUNE


@dataclasses.dataclass(frozen=True)
class Augmentation:
    image_size: int
    resize_size: int
    flip: bool = True
    pca_noise_std: float = 0.1
    eval_crops: int = 1
    resize_method: str = "bilinear"  # choices.RESIZE_METHODS
    random_crop: bool = True  # False: training takes the centre crop


def hide_accelerators_from_tf() -> None:
    """Keep TensorFlow on the CPU: the accelerators belong to JAX."""
    try:
        tf.config.set_visible_devices([], "GPU")
        tf.config.set_visible_devices([], "TPU")
    except (RuntimeError, ValueError):
        pass  # already initialised, or no such device type


def _options() -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    options.autotune.enabled = True
    options.experimental_optimization.map_parallelization = True
    options.experimental_optimization.inject_prefetch = True
    options.experimental_warm_start = True
    options.threading.max_intra_op_parallelism = 1
    options.threading.private_threadpool_size = _usable_cpus()
    return options


def _usable_cpus() -> int:
    """The cores this process may run on (CPU affinity, e.g. one slice per GPU process), not the host's."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no sched_getaffinity (macOS)
        return os.cpu_count() or 1


def train_dataset(
    split: Split,
    aug: Augmentation,
    *,
    per_process_batch: int,
    seed: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
) -> tf.data.Dataset:
    """Endless batches from start_step on: {'images': [B, S, S, 3] uint8, 'labels': [B] int32,
    'color': [B, 3] float32 PCA colour offsets, added on the device (preprocess.model_input)}."""
    hide_accelerators_from_tf()
    examples = split.train_examples(seed, start_step * per_process_batch, process_index, process_count)

    # No AutoGraph: these functions branch on Python values only (tf.cond where a tensor decides), and
    # rewriting them took 1.8 s of every start on 2 cores. The graph they trace is the same.
    @tf.autograph.experimental.do_not_convert
    def prepare(ref, label, position):
        # Each example's randomness: a pure function of the seed, process and stream position.
        example_seed = tf.stack([tf.cast(seed, tf.int64) * 2, position * process_count + process_index])
        image, color = augment.train_image(
            split.read(ref),  # the file is read in the same map as its decode: one hop fewer
            example_seed,
            image_size=aug.image_size,
            resize_size=aug.resize_size,
            flip=aug.flip,
            pca_noise_std=aug.pca_noise_std,
            resize_method=aug.resize_method,
            random_crop=aug.random_crop,
        )
        return {"images": image, "labels": tf.cast(label, tf.int32), "color": color}

    dataset = examples.map(prepare, num_parallel_calls=AUTOTUNE)
    dataset = dataset.batch(per_process_batch, drop_remainder=True)
    return dataset.prefetch(AUTOTUNE).with_options(_options())


def eval_dataset(
    split: Split,
    aug: Augmentation,
    *,
    per_process_batch: int,
    process_index: int = 0,
    process_count: int = 1,
) -> tf.data.Dataset:
    """Exactly eval_steps(...) batches {'images', 'labels', 'mask'}; padding has mask 0.

    images are uint8 [B, S, S, 3], or [B, 10, S, S, 3] with eval_crops=10.
    """
    hide_accelerators_from_tf()
    steps = eval_steps(split.num_examples, per_process_batch, process_count)
    num_local = len(local_indices(split.num_examples, process_index, process_count))

    @tf.autograph.experimental.do_not_convert
    def prepare(ref, label):
        image = augment.eval_images(
            split.read(ref),
            crops=aug.eval_crops,
            image_size=aug.image_size,
            resize_size=aug.resize_size,
            resize_method=aug.resize_method,
        )
        return {"images": image, "labels": tf.cast(label, tf.int32), "mask": tf.constant(1, tf.int32)}

    dataset = split.examples(process_index, process_count).map(prepare, num_parallel_calls=AUTOTUNE)
    padding = steps * per_process_batch - num_local
    if padding:
        crops = () if aug.eval_crops == 1 else (aug.eval_crops,)
        blank = {
            "images": tf.zeros(crops + (aug.image_size, aug.image_size, 3), tf.uint8),
            "labels": tf.constant(0, tf.int32),
            "mask": tf.constant(0, tf.int32),
        }
        dataset = dataset.concatenate(tf.data.Dataset.from_tensors(blank).repeat(padding))
    dataset = dataset.batch(per_process_batch, drop_remainder=True)
    return dataset.prefetch(AUTOTUNE).with_options(_options())


def train_batches(split: Split, aug: Augmentation, **kwargs) -> Iterator[dict[str, np.ndarray]]:
    """train_dataset as numpy batches, as the training loop receives them."""
    return numpy_batches(train_dataset(split, aug, **kwargs))


def eval_batches(split: Split, aug: Augmentation, **kwargs) -> Iterator[dict[str, np.ndarray]]:
    """eval_dataset as numpy batches."""
    return numpy_batches(eval_dataset(split, aug, **kwargs))


def numpy_batches(dataset: tf.data.Dataset) -> Iterator[dict[str, np.ndarray]]:
    """A dataset's batches as numpy.

    An image that passed the source's cheap check but still fails to decode
    (corrupt in the middle) stops the run with a UserError, not a bare TF traceback.
    """
    iterator = dataset.as_numpy_iterator()
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except tf.errors.InvalidArgumentError as error:
            raise UserError(
                f"an image failed to decode ({error.message.splitlines()[0]}); find it with "
                "python -m alexnet_jax.commands.resize --check --data_dir=ROOT, then replace or delete it"
            ) from None
        yield batch


def device_batches(
    batches: Iterable[dict[str, np.ndarray]] | tf.data.Dataset, local_device_count: int
) -> Iterator[dict[str, np.ndarray]]:
    """numpy batches reshaped to [local_devices, per_device_batch, ...] for the pmap'ed step."""
    if isinstance(batches, tf.data.Dataset):
        batches = numpy_batches(batches)
    for batch in batches:
        yield {key: value.reshape((local_device_count, -1) + value.shape[1:]) for key, value in batch.items()}
