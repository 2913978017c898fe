"""Where examples come from: a TFDS builder, an image folder, or the bundled demo set.

A source yields encoded images (JPEG or PNG bytes) and integer labels; decoding
and augmentation happen later, in the pipeline, so a crop can be decoded alone.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import logging
import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from alexnet_jax.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
EVAL_SPLIT_DIRS = ("validation", "val")
IMAGENET_TARS = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")
JPEG_MAGIC = b"\xff\xd8\xff"
JPEG_END = b"\xff\xd9"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PNG_END = b"IEND"
# The end marker must lie in the file's last bytes: encoders may pad a little after it.
TAIL_BYTES = 1024
BAD_IMAGES_SHOWN = 10
READ_BATCH = 64  # records an ArrayRecord split reads per call (array_record reads them in parallel)

log = logging.getLogger("alexnet_jax.data")


class Split:
    """A split of encoded images that does its own reading: the pipeline never asks which kind it holds.

    Subclasses say how to list examples as tf.data of (ref, label) and how to turn a
    ref into encoded bytes inside the decode map (`read`), so the pipeline's
    decode, augmentation, batching and padding are one code path for all of them.
    Which batcher a split takes (the pipeline, or a pack's own) is registry.py's choice.
    """

    augments_on_device = False  # packed splits ship whole images; the step crops them
    num_examples: int

    def read(self, ref):
        """Encoded image bytes of a ref (a TF op, run inside the decode map)."""
        return ref

    def examples(self, process_index: int = 0, process_count: int = 1):
        """tf.data of (ref, label) in the split's fixed order: this process's share."""
        raise NotImplementedError

    def train_examples(self, seed: int, start_position: int, process_index: int, process_count: int):
        """Endless tf.data of (ref, label, position) from stream position start_position on."""
        raise NotImplementedError

    def encoded(self, indices: set[int]) -> dict[int, bytes]:
        """The encoded images at `indices` of the split's fixed order."""
        found: dict[int, bytes] = {}
        for index, (ref, _) in enumerate(self.examples().as_numpy_iterator()):
            if index in indices:
                found[index] = ref  # records hold the encoded bytes themselves
                if len(found) == len(indices):
                    break
        return found

    def describe(self, index: int) -> str:
        """Where example `index` comes from, for people."""
        return f"example {index}"

    def host_items(self):
        """(file path or encoded bytes, label, a file name for it) of every example, in order, on the host."""
        for index, (ref, label) in enumerate(self.examples().as_numpy_iterator()):
            yield ref, int(label), f"{index:08d}.JPEG"


@dataclasses.dataclass(frozen=True)
class FileSplit(Split):
    """A split held as image files on disk: random access by index."""

    paths: np.ndarray  # [N] str
    labels: np.ndarray  # [N] int32

    @property
    def num_examples(self) -> int:
        return len(self.paths)

    def read(self, ref):
        import tensorflow as tf

        return tf.io.read_file(ref)

    def examples(self, process_index: int = 0, process_count: int = 1):
        import tensorflow as tf

        indices = local_indices(self.num_examples, process_index, process_count)
        return tf.data.Dataset.from_tensor_slices((self.paths[indices], self.labels[indices]))

    def train_examples(self, seed: int, start_position: int, process_index: int, process_count: int):
        """train_order's indices as files: resuming costs nothing."""
        import tensorflow as tf

        paths, labels = tf.constant(self.paths), tf.constant(self.labels)
        order = train_order(self.num_examples, seed, start_position, process_index, process_count)
        return order.map(lambda index, position: (tf.gather(paths, index), tf.gather(labels, index), position))

    def encoded(self, indices: set[int]) -> dict[int, bytes]:
        result = {}
        for index in indices:
            with open(str(self.paths[index]), "rb") as handle:
                result[index] = handle.read()
        return result

    def describe(self, index: int) -> str:
        return str(self.paths[index])

    def host_items(self):
        for path, label in zip(self.paths, self.labels):
            yield str(path), int(label), os.path.basename(str(path))


@dataclasses.dataclass(frozen=True)
class ArrayRecordSplit(Split):
    """A split of a TFDS dataset prepared as ArrayRecord: read by index, so its order is train_order's.

    Records are read in small batches of indices (array_record reads them in
    parallel) and parsed inside tf.data; the image stays encoded (SkipDecoding),
    so decode and augmentation are the pipeline's, as for image files.
    """

    builder: object  # tfds.core.DatasetBuilder
    split: str
    image_key: str
    label_key: str
    num_examples: int

    @functools.cached_property
    def _records(self):
        """The split's serialized records by index (array_record's own reader: no per-record Python decode)."""
        import tensorflow_datasets as tfds

        raw = tfds.decode.DeserializeMethod.RAW_BYTES
        return self.builder.as_data_source(self.split, deserialize_method=raw).data_source

    def _read(self, indices_and_more):
        """tf.data of (index, *more) -> (encoded image, label, *more), in order.

        A batch of READ_BATCH records is one read and one parse (tf.train.Example
        features, as TFDS wrote them): the per-record cost stays close to reading
        image files.
        """
        import tensorflow as tf

        records = self._records
        spec = {key: tf.io.FixedLenFeature([], tf.as_dtype(self._serialized[key].dtype)) for key in self._keys}

        def read_batch(indices):
            return np.array(records.__getitems__(indices.tolist()), dtype=object)

        @tf.autograph.experimental.do_not_convert
        def read_and_parse(indices, *more):
            data = tf.ensure_shape(tf.numpy_function(read_batch, [indices], tf.string, stateful=False), indices.shape)
            example = tf.io.parse_example(data, spec)
            return (example[self.image_key], example[self.label_key], *more)

        batches = indices_and_more.batch(READ_BATCH).map(read_and_parse, num_parallel_calls=tf.data.AUTOTUNE)
        return batches.unbatch()

    @property
    def _keys(self) -> tuple[str, str]:
        return self.image_key, self.label_key

    @functools.cached_property
    def _serialized(self) -> dict:
        """How TFDS stored each feature: the image and label must be single values (bytes, an int), as in
        every image classification set, so that a batch parses in one op."""
        serialized = self.builder.info.features.get_serialized_info()
        for key in self._keys:
            if getattr(serialized.get(key), "shape", None) != ():
                raise UserError(f"TFDS feature {key!r} of {self.builder.name} is not stored as one value per example")
        return serialized

    def examples(self, process_index: int = 0, process_count: int = 1):
        import tensorflow as tf

        indices = local_indices(self.num_examples, process_index, process_count)
        return self._read(tf.data.Dataset.from_tensor_slices(indices))

    def train_examples(self, seed: int, start_position: int, process_index: int, process_count: int):
        """train_order's indices as records: a resumed run seeks to its position in constant time."""
        return self._read(train_order(self.num_examples, seed, start_position, process_index, process_count))

    def encoded(self, indices: set[int]) -> dict[int, bytes]:
        import tensorflow as tf

        wanted = sorted(indices)
        found = self._read(tf.data.Dataset.from_tensor_slices(np.array(wanted, np.int64)))
        return {index: image for index, (image, _) in zip(wanted, found.as_numpy_iterator())}

    def describe(self, index: int) -> str:
        return f"{self.split}[{index}]"


@dataclasses.dataclass(frozen=True)
class TfdsSplit(Split):
    """A split of a TFDS dataset prepared as TFRecord: a stream, so each epoch's order is a seeded shuffle of it.

    Epoch e's stream is a pure function of (seed, e): a resumed run starts at its
    epoch and skips only the records before its position in that epoch. Converting
    the dataset to ArrayRecord (convert_to_array_record) makes that skip free.
    """

    builder: object  # tfds.core.DatasetBuilder
    split: str
    image_key: str
    label_key: str
    num_examples: int
    shuffle_buffer: int = 10_000

    def _subsplit(self, process_index: int, process_count: int):
        import tensorflow_datasets as tfds

        return tfds.even_splits(self.split, n=process_count, drop_remainder=False)[process_index]

    def _records(self, process_index: int, process_count: int):
        import tensorflow_datasets as tfds

        read_config = tfds.ReadConfig(interleave_cycle_length=16, interleave_block_length=1)
        dataset = self.builder.as_dataset(
            split=self._subsplit(process_index, process_count),
            decoders={self.image_key: tfds.decode.SkipDecoding()},
            read_config=read_config,
        )
        return dataset.map(lambda example: (example[self.image_key], example[self.label_key]))

    def examples(self, process_index: int = 0, process_count: int = 1):
        return self._records(process_index, process_count)

    def train_examples(self, seed: int, start_position: int, process_index: int, process_count: int):
        import tensorflow as tf

        records = self._records(process_index, process_count)
        num_local = self.builder.info.splits[self._subsplit(process_index, process_count)].num_examples
        first_epoch, offset = divmod(start_position, num_local)

        @tf.autograph.experimental.do_not_convert
        def epoch_examples(epoch):
            shuffled = records.shuffle(self.shuffle_buffer, seed=_epoch_seed(seed, epoch)[1])
            positions = tf.data.Dataset.range(epoch * num_local, (epoch + 1) * num_local)
            stream = tf.data.Dataset.zip(shuffled, positions).map(lambda example, position: (*example, position))
            return stream.skip(tf.where(epoch == first_epoch, tf.constant(offset, tf.int64), 0))

        return tf.data.Dataset.range(first_epoch, np.iinfo(np.int64).max).flat_map(epoch_examples)

    def describe(self, index: int) -> str:
        return f"{self.split}[{index}]"


def local_indices(num_examples: int, process_index: int, process_count: int) -> np.ndarray:
    """The examples process i reads: i, i + P, i + 2P, ... (sizes differ by at most one)."""
    return np.arange(process_index, num_examples, process_count, dtype=np.int64)


def _epoch_seed(seed, epoch):
    """The stateless seed of an epoch's order (int64 [2])."""
    import tensorflow as tf

    return tf.stack([tf.cast(seed, tf.int64) * 2 + 1, tf.cast(epoch, tf.int64)])


def epoch_order(num_examples: int, seed, epoch, process_index: int, process_count: int):
    """int64 [num_examples // process_count]: the examples this process reads in `epoch`, in order.

    One permutation of the whole split per epoch, a pure function of (seed, epoch);
    process i takes its positions i, i + P, i + 2P, ... So within an epoch the
    processes together read every example once (less the num_examples % P left
    over, a different few each epoch), and each epoch deals them out afresh.
    """
    import tensorflow as tf

    share = num_examples // process_count
    permutation = tf.random.experimental.stateless_shuffle(
        tf.range(num_examples, dtype=tf.int64), seed=_epoch_seed(seed, epoch)
    )
    return permutation[process_index : share * process_count : process_count]


def train_order(num_examples: int, seed: int, start_position: int, process_index: int, process_count: int):
    """Endless tf.data of (example index, stream position), from start_position on: the one training order.

    Position p of this process's stream is epoch p // share, place p % share of
    epoch_order: a resumed run builds its epoch's order and starts at its place,
    at a cost that does not grow with the position.
    """
    import tensorflow as tf

    share = num_examples // process_count
    if share == 0:
        raise UserError(f"{num_examples} training examples cannot be shared by {process_count} processes")
    first_epoch, offset = divmod(start_position, share)

    @tf.autograph.experimental.do_not_convert
    def epoch_examples(epoch):
        start = tf.where(epoch == first_epoch, tf.constant(offset, tf.int64), 0)
        order = epoch_order(num_examples, seed, epoch, process_index, process_count)[start:]
        positions = epoch * share + tf.range(start, share, dtype=tf.int64)
        return tf.data.Dataset.from_tensor_slices((order, positions))

    return tf.data.Dataset.range(first_epoch, np.iinfo(np.int64).max).flat_map(epoch_examples)


def eval_steps(num_examples: int, per_process_batch: int, process_count: int) -> int:
    """Evaluation batches every process runs so that the largest shard is read whole (padding masks the rest)."""
    largest_shard = math.ceil(num_examples / process_count)
    return max(1, math.ceil(largest_shard / per_process_batch))


@dataclasses.dataclass(frozen=True)
class Source:
    name: str
    class_names: tuple[str, ...]
    train: Split
    eval: Split
    image_side: int | None = None  # packed sources: every image is image_side x image_side

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def image_folder(root: str, *, skip_bad_images: bool = False) -> Source:
    """ROOT/train/<class>/* and ROOT/validation/<class>/* (or val/), JPEG and PNG files.

    Every file is checked first (find_bad_images): a bad one stops here with its
    name, rather than as a decode error deep inside tf.data, unless
    skip_bad_images, which drops and logs it.
    """
    root_path = Path(root).expanduser()
    train_dir = root_path / "train"
    if not train_dir.is_dir():
        raise UserError(
            f"image folder {root_path} has no train/ directory; lay it out as "
            f"{root_path}/train/<class>/*.jpg and {root_path}/validation/<class>/*.jpg"
        )
    eval_dir = next((root_path / d for d in EVAL_SPLIT_DIRS if (root_path / d).is_dir()), None)
    if eval_dir is None:
        raise UserError(
            f"image folder {root_path} has no validation/ (or val/) directory next to train/; "
            "create one with the same <class> subdirectories"
        )
    class_names = tuple(sorted(p.name for p in train_dir.iterdir() if p.is_dir()))
    if not class_names:
        raise UserError(f"{train_dir} holds no class directories; put images in {train_dir}/<class>/")
    unknown = sorted(p.name for p in eval_dir.iterdir() if p.is_dir() and p.name not in class_names)
    if unknown:
        raise UserError(
            f"{eval_dir} has classes that train/ lacks: {unknown[:5]}; every evaluation class "
            "needs a training directory of the same name"
        )
    train = _list_files(train_dir, class_names)
    evaluation = _list_files(eval_dir, class_names)
    bad = find_bad_images(np.concatenate([train.paths, evaluation.paths]))
    if bad:
        train, evaluation = _handle_bad_images(bad, train, evaluation, skip=skip_bad_images)
    return Source(name=f"image_folder:{root_path}", class_names=class_names, train=train, eval=evaluation)


def check_image(path: str) -> str | None:
    """Why `path` cannot be trained on, or None if it looks whole.

    Cheap (two small reads, no decode): the format comes from the magic bytes, not
    the name, so a PNG named .JPEG is fine; a JPEG without its end marker or a PNG
    without its IEND chunk in its last TAIL_BYTES is truncated, unless a full
    decode succeeds (data appended after the image). CMYK JPEGs decode to RGB and pass.
    """
    try:
        with open(path, "rb") as handle:
            head = handle.read(len(PNG_MAGIC))
            size = handle.seek(0, os.SEEK_END)
            handle.seek(max(0, size - TAIL_BYTES))
            tail = handle.read()
    except OSError as error:
        return f"unreadable ({error.strerror})"
    if head.startswith(JPEG_MAGIC):
        return None if JPEG_END in tail or _decodes(path) else "truncated JPEG (no end marker)"
    if head.startswith(PNG_MAGIC):
        return None if PNG_END in tail or _decodes(path) else "truncated PNG (no IEND chunk)"
    if size == 0:
        return "empty file"
    return "not a JPEG or PNG image"


def _decodes(path: str) -> bool:
    """Full decode, for the rare file whose end marker is not at the end (some cameras append data)."""
    return decode_error(path) is None


def decode_error(path: str) -> str | None:
    """Why TensorFlow cannot decode `path` in full (the first line of its message), or None: the one full check."""
    import tensorflow as tf

    try:
        tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    except tf.errors.OpError as error:
        return error.message.splitlines()[0]
    return None


def find_bad_images(paths, *, threads: int = 32) -> list[tuple[str, str]]:
    """[(path, reason)] for every file check_image rejects, in the order given.

    Threads overlap the file opens, which dominate on network file systems.
    """
    with ThreadPoolExecutor(threads) as pool:
        reasons = list(pool.map(check_image, [str(path) for path in paths], chunksize=256))
    return [(str(path), reason) for path, reason in zip(paths, reasons) if reason is not None]


def new_output_directory(out: str, data_dir: str, dataset: str) -> Path:
    """The resolved --out of a tool that writes a copy of a dataset: new, and apart from its source."""
    target = Path(out).expanduser().resolve()
    if target.exists():
        raise UserError(f"{target} already exists; choose a new --out (nothing there is changed)")
    if dataset == "image_folder":
        root = Path(data_dir).expanduser().resolve()
        if target == root or root in target.parents or target in root.parents:
            raise UserError(f"--out={target} must lie outside --data_dir={root}, and not contain it")
    return target


def report_bad_images(bad: list[tuple[str, str]], *, skip: bool, how_to_skip: str) -> set[str]:
    """The one bad-image policy: stop naming the files, or (skip) log each and return their names.

    how_to_skip: the option that skips them in the caller ("--config.skip_bad_images=True",
    "--skip_bad_images").
    """
    listing = "; ".join(f"{path}: {reason}" for path, reason in bad[:BAD_IMAGES_SHOWN])
    more = f"; and {len(bad) - BAD_IMAGES_SHOWN} more" if len(bad) > BAD_IMAGES_SHOWN else ""
    if not skip:
        raise UserError(f"{len(bad)} bad image file(s): {listing}{more}. Replace or delete them, or set {how_to_skip}")
    for path, reason in bad:
        log.warning("skipping bad image %s: %s", path, reason)
    log.warning("skipped %d bad image file(s) (%s)", len(bad), how_to_skip)
    return {path for path, _ in bad}


def _handle_bad_images(
    bad: list[tuple[str, str]], train: FileSplit, evaluation: FileSplit, *, skip: bool
) -> tuple[FileSplit, FileSplit]:
    names = report_bad_images(bad, skip=skip, how_to_skip="--config.skip_bad_images=True")
    kept = []
    for split in (train, evaluation):
        keep = np.array([path not in names for path in split.paths], bool)
        if not keep.any():
            raise UserError(f"every image of a split was bad ({len(bad)} file(s)); nothing is left to read")
        kept.append(FileSplit(split.paths[keep], split.labels[keep]))
    return kept[0], kept[1]


def _list_files(split_dir: Path, class_names: tuple[str, ...]) -> FileSplit:
    paths, labels = [], []
    for label, name in enumerate(class_names):
        class_dir = split_dir / name
        if not class_dir.is_dir():
            continue
        for entry in sorted(os.scandir(class_dir), key=lambda e: e.name):
            if entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS):
                paths.append(entry.path)
                labels.append(label)
    if not paths:
        raise UserError(f"{split_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)}) in its class directories")
    return FileSplit(np.array(paths), np.array(labels, np.int32))


def tfds_source(
    name: str,
    *,
    data_dir: str,
    manual_dir: str,
    train_split: str,
    eval_split: str,
    download: bool,
    convert_to_array_record: bool = False,
    prepare: Prepare = None,
) -> Source:
    """A TFDS image classification dataset, prepared on first use (as ArrayRecord) where that needs no download.

    prepare: how preparation (and a conversion) runs across processes (the loop passes
    parallel.prepare_on_process_0: one process works, the others wait); None: here, if needed.
    """
    prepare = prepare or _prepare_here
    import tensorflow_datasets as tfds

    # array-record has Linux wheels only: elsewhere TFDS writes (and this reads) TFRecord.
    file_format = "array_record" if importlib.util.find_spec("array_record") else None
    try:
        builder = tfds.builder(name, data_dir=data_dir or None, file_format=file_format)
    except tfds.core.registered.DatasetNotFoundError as error:
        raise UserError(
            f"config.dataset={name!r} is not a TFDS dataset, 'image_folder' or 'demo_digits' "
            f"({str(error).splitlines()[0]})"
        ) from None
    except ValueError:  # "File format is already set": prepared earlier, as TFRecord
        builder = tfrecord_builder(name, data_dir, convert=convert_to_array_record, prepare=prepare)
    was_prepared = builder.is_prepared()
    # Every process takes part (process 0 may see a directory the others lack); none prepares twice.
    prepare(
        f"{name} in {builder.data_dir}",
        lambda: _prepare(builder, name, manual_dir=manual_dir, download=download),
        lambda: was_prepared or _is_prepared(name, data_dir, file_format),
    )
    if not was_prepared:  # this builder's info predates the preparation
        builder = tfds.builder(name, data_dir=data_dir or None, file_format=file_format)
    image_key, label_key = _supervised_keys(builder, name)
    label_feature = builder.info.features[label_key]
    class_names = tuple(label_feature.names)
    splits = []
    for split in (train_split, eval_split):
        if split not in builder.info.splits:
            raise UserError(
                f"TFDS dataset {name!r} has no split {split!r}; it has {sorted(builder.info.splits)}: "
                "set config.train_split / config.eval_split"
            )
        split_class = ArrayRecordSplit if random_access(builder) else TfdsSplit
        splits.append(split_class(builder, split, image_key, label_key, builder.info.splits[split].num_examples))
    return Source(name=name, class_names=class_names, train=splits[0], eval=splits[1])


# (what, prepare, is_prepared) -> None: runs prepare() where it should run, unless is_prepared().
Prepare = Callable[[str, Callable[[], None], Callable[[], bool]], None] | None


def _prepare_here(what: str, prepare: Callable[[], None], is_prepared: Callable[[], bool]) -> None:
    if not is_prepared():
        prepare()


def _is_prepared(name: str, data_dir: str, file_format: str | None) -> bool:
    """Whether the dataset is prepared now (a fresh look: a builder remembers what it saw when made)."""
    import tensorflow_datasets as tfds

    return tfds.builder(name, data_dir=data_dir or None, file_format=file_format).is_prepared()


def random_access(builder) -> bool:
    """Whether a prepared TFDS dataset can be read by index (ArrayRecord, prepared so or converted)."""
    proto = builder.info.as_proto
    formats = (proto.file_format, *proto.alternative_file_formats)
    return "array_record" in formats and importlib.util.find_spec("array_record") is not None


def tfrecord_builder(name: str, data_dir: str, *, convert: bool, prepare: Prepare = None):
    """The builder of a dataset prepared as TFRecord: converted to ArrayRecord if asked, else with a warning.

    Until converted it still trains, but each resume re-reads the start of its
    epoch; the warning names the conversion. TFDS's own `tfds convert_format`
    does the same copy, but its command line needs apache-beam installed.
    """
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir or None)
    if convert:  # by one process (prepare), as a preparation is
        (prepare or _prepare_here)(
            f"the ArrayRecord copy of {builder.data_dir}",
            lambda: _convert_logged(builder),
            lambda: random_access(tfds.builder(name, data_dir=data_dir or None)),
        )
        builder = tfds.builder(name, data_dir=data_dir or None)  # its info now lists the copy
    if random_access(builder):  # converted: read the ArrayRecord copy
        builder.info.set_file_format("array_record", override=True, override_if_initialized=True)
        return builder
    log.warning(
        "%s is prepared as TFRecord, which is read as a stream: a resumed run re-reads the start of its epoch. "
        "Convert it once to ArrayRecord (random access, resume in constant time): run again with "
        "--config.convert_to_array_record=True, or: pip install apache-beam && tfds convert_format "
        "--dataset_version_dir=%s --out_file_format=array_record",
        builder.data_dir,
        builder.data_dir,
    )
    return builder


def _convert_logged(builder) -> None:
    log.warning("converting %s to ArrayRecord (once; the TFRecord files are kept)", builder.data_dir)
    convert_to_array_record(builder)


def convert_to_array_record(builder) -> None:
    """Write an ArrayRecord copy of every TFRecord shard beside it and list the format in dataset_info.json.

    What `tfds convert_format` does in place: the records' bytes are copied
    unchanged, shard by shard; a shard is renamed into place only when complete,
    so an interrupted conversion starts again where it stopped.
    """
    from tensorflow_datasets.core import dataset_info as dataset_info_lib
    from tensorflow_datasets.core import file_adapters
    from tensorflow_datasets.core.utils import py_utils

    tfrecord = file_adapters.ADAPTER_FOR_FORMAT[file_adapters.FileFormat.TFRECORD]
    array_record = file_adapters.ADAPTER_FOR_FORMAT[file_adapters.FileFormat.ARRAY_RECORD]
    for split_info in builder.info.splits.values():
        for path in split_info.filepaths:
            target = path.parent / path.name.replace(f".{tfrecord.FILE_SUFFIX}-", f".{array_record.FILE_SUFFIX}-")
            if target.exists():
                continue
            records = ((index, record.numpy()) for index, record in enumerate(tfrecord.make_tf_data(path)))
            with py_utils.incomplete_file(target) as partial:
                array_record.write_examples(partial, records)
    proto = builder.info.as_proto
    if "array_record" not in proto.alternative_file_formats:
        proto.alternative_file_formats.append("array_record")
    dataset_info_lib.write_dataset_info_proto(proto, dataset_info_dir=builder.data_path)


def _prepare(builder, name: str, *, manual_dir: str, download: bool) -> None:
    log.info("preparing TFDS dataset %s in %s (once; later runs read it)", name, builder.data_dir)
    import tensorflow_datasets as tfds

    if name.split(":")[0] == "imagenet2012":
        default_manual = Path(builder._data_dir_root) / "downloads" / "manual"  # noqa: SLF001
        manual = Path(manual_dir or default_manual).expanduser()
        missing = [tar for tar in IMAGENET_TARS if not (manual / tar).is_file()]
        if missing:
            raise UserError(
                f"ImageNet is not prepared in {builder.data_dir} and {manual} lacks "
                f"{' and '.join(missing)}: download both ILSVRC-2012 tars from image-net.org, put "
                f"them in one directory and run again with --config.manual_dir=THAT_DIR"
            )
        config = tfds.download.DownloadConfig(manual_dir=str(manual))
        builder.download_and_prepare(download_config=config)
        return
    if not download:
        raise UserError(
            f"TFDS dataset {name!r} is not prepared in {builder.data_dir}; run again with "
            "--config.download=True to let TFDS download and prepare it"
        )
    builder.download_and_prepare()


def _supervised_keys(builder, name: str) -> tuple[str, str]:
    keys = builder.info.supervised_keys
    if not keys or len(keys) < 2 or not isinstance(keys[0], str):
        raise UserError(
            f"TFDS dataset {name!r} has no (image, label) supervised keys; it is not an image classification set"
        )
    image_key, label_key = keys[0], keys[1]
    if not hasattr(builder.info.features[label_key], "num_classes"):
        raise UserError(f"TFDS dataset {name!r}: feature {label_key!r} is not a class label")
    return image_key, label_key
