"""ImageNet through the real TFDS imagenet2012 builder, on a miniature set of ILSVRC-format tars:
preparation, reading, a short training run, and a pre-resized copy."""

import subprocess

import numpy as np
import pytest
from conftest import NARROW_FC, NUM_VAL, PER_SYNSET, SYNSETS, child_env, launch_command, write_ilsvrc_tars

from alexnet_jax.data import pipeline, registry, resize, sources
from alexnet_jax.reporting import metrics as metrics_lib


@pytest.mark.slow
def test_imagenet2012_prepared_by_tfds_and_read(tmp_path):
    manual_dir = write_ilsvrc_tars(tmp_path / "manual")
    data_dir = tmp_path / "tfds"
    source = registry.open_source("imagenet2012", data_dir=str(data_dir), manual_dir=str(manual_dir))
    assert source.num_classes == 1000 and source.class_names[:3] == SYNSETS
    assert source.train.num_examples == len(SYNSETS) * PER_SYNSET
    assert source.eval.num_examples == NUM_VAL
    # Prepared once: opening again reads the records without touching the tars.
    (manual_dir / "ILSVRC2012_img_train.tar").unlink()
    again = registry.open_source("imagenet2012", data_dir=str(data_dir), manual_dir=str(manual_dir))
    assert again.eval.num_examples == NUM_VAL

    aug = pipeline.Augmentation(image_size=63, resize_size=72)
    train_batches = pipeline.train_dataset(source.train, aug, per_process_batch=8, seed=0).as_numpy_iterator()
    labels = []
    for _ in range(3):  # 24 > 12 examples: the stream repeats
        batch = next(train_batches)
        assert batch["images"].shape == (8, 63, 63, 3) and batch["images"].dtype == np.uint8
        labels.extend(batch["labels"].tolist())
    assert set(labels) == {0, 1, 2}

    batches = list(pipeline.eval_dataset(source.eval, aug, per_process_batch=4).as_numpy_iterator())
    assert len(batches) == 2  # 7 examples, one padded slot
    mask = np.concatenate([b["mask"] for b in batches])
    assert mask.sum() == NUM_VAL
    val_labels = np.concatenate([b["labels"] for b in batches])[mask == 1]
    assert ((val_labels >= 0) & (val_labels < 1000)).all()
    assert len(set(val_labels.tolist())) > 1  # the real labels TFDS ships, not a constant

    # A short training run on it: the loop reads the TFDS records, and eval counts every image once.
    command = launch_command(
        tmp_path / "run",
        "--config.dataset=imagenet2012",
        f"--config.data_dir={data_dir}",
        f"--config.manual_dir={manual_dir}",
        "--config.batch_size=8",
        NARROW_FC,
        "--config.num_train_steps=2",
        "--config.log_every_steps=1",
        "--config.eval_every_steps=2",
        "--config.checkpoint_every_steps=2",
    )
    result = subprocess.run(command, capture_output=True, text=True, env=child_env(2), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    records = metrics_lib.read_metrics(str(tmp_path / "run"))
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2]
    assert [(r["step"], r["eval/num_examples"]) for r in records if "eval/loss" in r] == [(2, NUM_VAL)]
    assert all(np.isfinite(r["train/loss"]) for r in records if "train/loss" in r)

    # A pre-resized image-folder copy keeps all 1,000 classes in label order, and every example.
    resize.write_resized(str(data_dir), str(tmp_path / "copy"), size=80, dataset="imagenet2012", workers=1)
    copy = sources.image_folder(str(tmp_path / "copy"))
    assert copy.class_names == source.class_names
    assert copy.train.num_examples == 12 and copy.eval.num_examples == NUM_VAL
    assert sorted(copy.eval.labels.tolist()) == sorted(val_labels.tolist())


def test_launch_without_tars_stops_at_once(tmp_path):
    """One line naming both tars and where they were looked for; nothing compiled, no traceback."""
    empty, empty2 = tmp_path / "data", tmp_path / "manual"
    empty.mkdir()
    empty2.mkdir()
    command = launch_command(
        tmp_path / "run", f"--config.data_dir={empty}", f"--config.manual_dir={empty2}", config="default"
    )
    env = child_env()
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert result.returncode != 0
    assert not (tmp_path / "run" / "checkpoints").exists()  # stopped before any state was made
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "ILSVRC2012_img_train.tar" in errors[0] and "ILSVRC2012_img_val.tar" in errors[0]
    assert str(empty2) in errors[0] and "--config.manual_dir" in errors[0]
    assert "Traceback" not in result.stderr + result.stdout
