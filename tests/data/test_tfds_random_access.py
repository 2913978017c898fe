"""TFDS read by index: ImageNet prepared as ArrayRecord by the real imagenet2012 builder (miniature ILSVRC
tars), the one training order (a permutation of the split per epoch, dealt out to processes, sought in
constant time), exact evaluation over processes, and a TFRecord preparation that warns and still trains."""

import logging
import shutil
import subprocess

import numpy as np
import pytest
from conftest import NARROW_FC, NUM_VAL, PER_SYNSET, SYNSETS, child_env, launch_command, write_ilsvrc_tars

from alexnet_jax.data import pipeline, registry, sources
from alexnet_jax.reporting import metrics as metrics_lib

NUM_TRAIN = len(SYNSETS) * PER_SYNSET  # 12
AUG = pipeline.Augmentation(image_size=63, resize_size=72, flip=False, pca_noise_std=0.0)


def _order(num_examples, seed, start, count, process_index=0, process_count=1):
    stream = sources.train_order(num_examples, seed, start, process_index, process_count).take(count)
    return np.array([(index, position) for index, position in stream.as_numpy_iterator()]).reshape(-1, 2)


@pytest.mark.parametrize("num_examples", [12, 13])
def test_every_epoch_is_one_permutation_dealt_out_to_the_processes(num_examples):
    share = num_examples // 2
    epochs = 3
    drawn = {p: _order(num_examples, 5, 0, share * epochs, p, 2) for p in range(2)}
    for order in drawn.values():
        np.testing.assert_array_equal(order[:, 1], np.arange(share * epochs))  # positions count on
    seen_by_epoch = []
    for epoch in range(epochs):
        picks = [drawn[p][epoch * share : (epoch + 1) * share, 0] for p in range(2)]
        together = np.concatenate(picks)
        assert len(set(together.tolist())) == 2 * share  # no example twice in an epoch, across processes
        assert set(together.tolist()) <= set(range(num_examples))
        seen_by_epoch.append(picks)
    assert not np.array_equal(seen_by_epoch[0][0], seen_by_epoch[1][0])  # reshuffled, and dealt out anew
    assert set(seen_by_epoch[0][0].tolist()) != set(seen_by_epoch[1][0].tolist())


def test_a_resumed_order_seeks_to_its_position():
    """From any start position the stream is the tail of the uninterrupted one, epochs later included."""
    straight = _order(13, 2, 0, 40, 1, 2)
    for start in (1, 5, 6, 7, 17, 36):  # 6 per epoch: boundaries and places inside an epoch
        np.testing.assert_array_equal(_order(13, 2, start, 40 - start, 1, 2), straight[start:])
    far = 6 * 1_000_000 + 4  # a million epochs in: built as fast as epoch 0
    np.testing.assert_array_equal(_order(13, 2, far, 2, 1, 2)[:, 1], [far, far + 1])


def test_image_files_read_the_same_order():
    """FileSplit draws train_order's examples: the order is one function, not a copy per source."""
    paths = np.array([f"/nowhere/{index}.jpg" for index in range(13)])
    split = sources.FileSplit(paths, np.arange(13, dtype=np.int32))
    refs = split.train_examples(7, 3, 0, 2).take(10)
    order = _order(13, 7, 3, 10, 0, 2)
    got = [(ref.decode(), label, position) for ref, label, position in refs.as_numpy_iterator()]
    assert got == [(f"/nowhere/{index}.jpg", index, position) for index, position in order]


@pytest.fixture(scope="module")
def imagenet_dirs(tmp_path_factory):
    """The miniature tars prepared by the real builder: as ArrayRecord (the default) and as TFRecord (old)."""
    import tensorflow_datasets as tfds

    root = tmp_path_factory.mktemp("imagenet")
    manual_dir = write_ilsvrc_tars(root / "manual")
    array_record = root / "array_record"
    registry.open_source("imagenet2012", data_dir=str(array_record), manual_dir=str(manual_dir))
    tfrecord = root / "tfrecord"
    builder = tfds.builder("imagenet2012", data_dir=str(tfrecord), file_format="tfrecord")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
    return {"manual": manual_dir, "array_record": array_record, "tfrecord": tfrecord}


def _encoded_set(split):
    return sorted(ref for ref, _ in split.examples().as_numpy_iterator())


def test_imagenet_is_prepared_as_array_record_and_read_by_index(imagenet_dirs):
    source = registry.open_source("imagenet2012", data_dir=str(imagenet_dirs["array_record"]))
    assert isinstance(source.train, sources.ArrayRecordSplit) and isinstance(source.eval, sources.ArrayRecordSplit)
    assert (source.train.num_examples, source.eval.num_examples) == (NUM_TRAIN, NUM_VAL)
    assert sorted(path.name for path in imagenet_dirs["array_record"].rglob("*.array_record-*")) == [
        "imagenet2012-train.array_record-00000-of-00001",
        "imagenet2012-validation.array_record-00000-of-00001",
    ]
    # Random access: example i of the split is the i-th record, whichever order it is asked in.
    records = list(source.train.examples().as_numpy_iterator())
    assert source.train.encoded({9, 2}) == {9: records[9][0], 2: records[2][0]}
    # Training draws train_order's examples, and a resumed stream continues the uninterrupted one.
    drawn = list(source.train.train_examples(4, 0, 0, 1).take(2 * NUM_TRAIN).as_numpy_iterator())
    order = _order(NUM_TRAIN, 4, 0, 2 * NUM_TRAIN)
    assert [(image, label) for image, label, _ in drawn] == [tuple(records[index]) for index, _ in order]
    resumed = list(source.train.train_examples(4, 17, 0, 1).take(2 * NUM_TRAIN - 17).as_numpy_iterator())
    assert resumed == drawn[17:]


def test_evaluation_over_two_processes_counts_every_validation_image_once(imagenet_dirs):
    source = registry.open_source("imagenet2012", data_dir=str(imagenet_dirs["array_record"]))
    whole = list(pipeline.eval_dataset(source.eval, AUG, per_process_batch=8).as_numpy_iterator())
    assert len(whole) == 1 and whole[0]["mask"].sum() == NUM_VAL
    images, labels = [], []
    for process_index in range(2):
        batches = list(
            pipeline.eval_dataset(
                source.eval, AUG, per_process_batch=2, process_index=process_index, process_count=2
            ).as_numpy_iterator()
        )
        assert len(batches) == pipeline.eval_steps(NUM_VAL, 2, 2) == 2  # the same count on both: 4 and 3 images
        for batch in batches:
            keep = batch["mask"] == 1
            images.extend(image.tobytes() for image in batch["images"][keep])
            labels.extend(batch["labels"][keep].tolist())
    assert len(images) == NUM_VAL
    assert sorted(images) == sorted(image.tobytes() for image in whole[0]["images"][:NUM_VAL])
    assert sorted(labels) == sorted(whole[0]["labels"][:NUM_VAL].tolist())


def test_a_tfrecord_preparation_warns_trains_resumes_within_its_epoch_and_converts(imagenet_dirs, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="alexnet_jax.data"):
        source = registry.open_source("imagenet2012", data_dir=str(imagenet_dirs["tfrecord"]))
    assert isinstance(source.train, sources.TfdsSplit)
    warnings = [record.getMessage() for record in caplog.records if "TFRecord" in record.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert "--config.convert_to_array_record=True" in warnings[0]
    assert "tfds convert_format --dataset_version_dir=" in warnings[0]
    assert "--out_file_format=array_record" in warnings[0]

    # Epoch e's stream is a pure function of (seed, e): a resume reads its own epoch only.
    straight = list(source.train.train_examples(3, 0, 0, 1).take(3 * NUM_TRAIN).as_numpy_iterator())
    for epoch in range(3):
        assert sorted(image for image, _, _ in straight[epoch * NUM_TRAIN : (epoch + 1) * NUM_TRAIN]) == sorted(
            _encoded_set(source.train)
        )
    assert [position for _, _, position in straight] == list(range(3 * NUM_TRAIN))
    resumed = list(source.train.train_examples(3, 2 * NUM_TRAIN + 5, 0, 1).take(NUM_TRAIN - 5).as_numpy_iterator())
    assert resumed == straight[2 * NUM_TRAIN + 5 :]
    batches = pipeline.train_dataset(source.train, AUG, per_process_batch=5, seed=0, start_step=4)
    assert next(batches.as_numpy_iterator())["images"].shape == (5, 63, 63, 3)

    # Converted when asked: the same records, now read by index; the TFRecord files are kept.
    copy = tmp_path / "tfds"
    shutil.copytree(imagenet_dirs["tfrecord"], copy)
    converted = registry.open_source("imagenet2012", data_dir=str(copy), convert_to_array_record=True)
    assert isinstance(converted.train, sources.ArrayRecordSplit)
    assert _encoded_set(converted.train) == _encoded_set(source.train)
    assert _encoded_set(converted.eval) == _encoded_set(source.eval)
    assert len(list(copy.rglob("*.tfrecord-*"))) == 2 and len(list(copy.rglob("*.array_record-*"))) == 2
    again = registry.open_source("imagenet2012", data_dir=str(copy))  # later runs read it by index, no key needed
    assert isinstance(again.train, sources.ArrayRecordSplit)


def _launch(workdir, data_dir, *overrides):
    command = launch_command(
        workdir,
        "--config.dataset=imagenet2012",
        f"--config.data_dir={data_dir}",
        "--config.image_size=64",
        NARROW_FC,
        "--config.batch_size=5",  # 2 steps an epoch of 12: batches cross epochs, step 6 resumes mid-epoch
        "--config.schedule=constant",  # so that a run of 6 steps continues as one of 12
        "--config.log_every_steps=1",
        "--config.eval_every_steps=1000",
        "--config.checkpoint_every_steps=6",
        *overrides,
    )
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env(1))


def _finish(process):
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-3000:]
    return output


def _losses(workdir):
    return [(r["step"], r["train/loss"]) for r in metrics_lib.read_metrics(str(workdir)) if "train/loss" in r]


@pytest.mark.slow
def test_six_and_six_steps_with_a_restart_are_twelve_straight_and_a_tfrecord_set_trains(imagenet_dirs, tmp_path):
    array_record, tfrecord = imagenet_dirs["array_record"], imagenet_dirs["tfrecord"]
    straight = _launch(tmp_path / "straight", array_record, "--config.num_train_steps=12")
    first = _launch(tmp_path / "restarted", array_record, "--config.num_train_steps=6")
    old = _launch(tmp_path / "tfrecord", tfrecord, "--config.num_train_steps=2")
    _finish(first)
    second = _finish(_launch(tmp_path / "restarted", array_record, "--config.num_train_steps=12"))
    assert "at step 6" in second and "exact resume no longer holds" not in second
    _finish(straight)
    losses = _losses(tmp_path / "straight")
    assert [step for step, _ in losses] == list(range(1, 13))
    assert _losses(tmp_path / "restarted") == losses  # bitwise: the same floats in metrics.jsonl

    output = _finish(old)
    assert sum("tfds convert_format" in line for line in output.splitlines()) == 1
    assert [step for step, _ in _losses(tmp_path / "tfrecord")] == [1, 2]
