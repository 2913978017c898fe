"""data/pack.py and data/packed.py: the paper's 256x256 images packed once, read back decode-free.

Real photos (scikit-learn's two samples, cut to assorted sizes and modes), real
files and real processes; the expected pixels are computed here with PIL.
"""

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import NARROW_FC, REPO, write_image_folder
from PIL import Image

from alexnet_jax.commands import pack as pack_command
from alexnet_jax.data import pack, packed, registry, sources
from alexnet_jax.errors import UserError

SIZE = 256


def expected_patch(data: bytes, size: int) -> np.ndarray:
    """The documented pack of one image: shorter side to `size` (JPEG draft, then LANCZOS), central square."""
    with Image.open(io.BytesIO(data)) as picture:
        width, height = picture.size
        scaled = (size, round(height * size / width)) if width <= height else (round(width * size / height), size)
        picture.draft("RGB", scaled)
        picture = picture.convert("RGB")
        if picture.size != scaled:
            picture = picture.resize(scaled, Image.Resampling.LANCZOS)
        pixels = np.asarray(picture)
    top, left = (scaled[1] - size) // 2, (scaled[0] - size) // 2
    return pixels[top : top + size, left : left + size]


def _save(path, pixels, mode="RGB", fmt="JPEG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    picture = Image.fromarray(pixels)
    picture = picture.convert(mode) if mode != "P" else picture.quantize(64)
    picture.save(path, fmt, **({"quality": 90} if fmt == "JPEG" else {}))


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    from sklearn.datasets import load_sample_images

    china, flower = load_sample_images().images  # [427, 640, 3] each
    root = tmp_path_factory.mktemp("photos") / "folder"
    train, val = root / "train", root / "validation"
    _save(train / "cat" / "a_landscape.jpg", china[0:300, 0:400])
    _save(train / "cat" / "b_exact_256.jpg", china[50:427, 100:356])  # 256 x 377: no resize, only the crop
    _save(train / "cat" / "c_cmyk.jpg", flower[0:280, 0:300], mode="CMYK")
    _save(train / "cat" / "d_grey.jpg", flower[20:370, 100:360], mode="L")
    _save(train / "dog" / "e_png.png", china[100:370, 200:550], fmt="PNG")
    _save(train / "dog" / "f_small.jpg", flower[100:250, 300:500])  # 200 x 150: enlarged
    _save(train / "dog" / "g_palette.png", flower[50:350, 250:550], mode="P", fmt="PNG")
    _save(train / "dog" / "h_whole.jpg", flower)
    _save(val / "cat" / "v1.jpg", china[10:410, 20:620])
    _save(val / "dog" / "v2.jpg", flower[0:427, 0:300])
    _save(val / "dog" / "v3.png", china[0:300, 300:640], fmt="PNG")
    return root


@pytest.fixture(scope="module")
def photo_packs(photo_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("packs")
    for encoding in packed.ENCODINGS:
        argv = [f"--data_dir={photo_folder}", f"--out={out / encoding}", f"--encoding={encoding}", "--workers=2"]
        assert pack_command.main([*argv, "--shard_images=3"]) == 0
    return {encoding: packed.open_packed(str(out / encoding)) for encoding in packed.ENCODINGS}


def test_raw_pack_holds_the_exact_central_patches(photo_folder, photo_packs):
    source, pack_raw = sources.image_folder(str(photo_folder)), photo_packs["raw"]
    assert pack_raw.class_names == source.class_names == ("cat", "dog") and pack_raw.num_classes == 2
    assert (pack_raw.size, pack_raw.encoding) == (SIZE, "raw")
    for split, files in ((pack_raw.train, source.train), (pack_raw.eval, source.eval)):
        assert split.num_examples == files.num_examples
        np.testing.assert_array_equal(split.labels, files.labels)
        images = split.read(np.arange(split.num_examples))
        assert images.shape == (files.num_examples, SIZE, SIZE, 3) and images.dtype == np.uint8
        for image, path in zip(images, files.paths):
            with open(path, "rb") as handle:
                np.testing.assert_array_equal(image, expected_patch(handle.read(), SIZE), err_msg=path)
    assert len(pack_raw.train.shards) == 3  # 8 images, 3 per shard
    # The 256-wide image is only cropped: its central rows, pixel for pixel.
    with Image.open(photo_folder / "train" / "cat" / "b_exact_256.jpg") as picture:
        original = np.asarray(picture.convert("RGB"))
    top = (original.shape[0] - SIZE) // 2
    np.testing.assert_array_equal(pack_raw.train.read([1])[0], original[top : top + SIZE])
    # Random access in any order, repeats included.
    picks = [7, 0, 3, 3, 5]
    np.testing.assert_array_equal(pack_raw.train.read(picks), pack_raw.train.read(np.arange(8))[picks])
    # A sources.Source whose splits the training loop drives through registry.train_batches / eval_batches.
    assert isinstance(pack_raw, sources.Source) and isinstance(pack_raw.train, sources.Split)
    assert pack_raw.image_side == SIZE and pack_raw.train.augments_on_device and pack_raw.eval.augments_on_device
    for index, data in pack_raw.train.encoded({3, 1}).items():  # lossless PNGs of the raw pixels
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), pack_raw.train.read([index])[0])
    assert [label for _, label, _ in pack_raw.eval.host_items()] == list(pack_raw.eval.labels)


def test_jpeg_pack_is_close_to_the_raw_one(photo_packs):
    raw, jpeg = photo_packs["raw"], photo_packs["jpeg"]
    assert jpeg.encoding == "jpeg" and jpeg.class_names == raw.class_names
    for split_raw, split_jpeg in ((raw.train, jpeg.train), (raw.eval, jpeg.eval)):
        np.testing.assert_array_equal(split_jpeg.labels, split_raw.labels)
        want = split_raw.read(np.arange(split_raw.num_examples)).astype(np.int16)
        got = split_jpeg.read(np.arange(split_jpeg.num_examples)).astype(np.int16)
        assert got.shape == want.shape
        # JPEG quality 95 with 4:2:0 chroma: about 2-3 levels on these photos, worst on the palette image.
        errors = np.abs(got - want).mean(axis=(1, 2, 3))
        assert errors.mean() < 3 and errors.max() < 3.5, errors
    files = jpeg.train.jpeg_files([2, 0])
    assert all(data.startswith(b"\xff\xd8\xff") and data.endswith(b"\xff\xd9") for data in files)
    np.testing.assert_array_equal(jpeg.train.read([2, 0, 2]), jpeg.train.read([0, 1, 2])[[2, 0, 2]])


def test_eval_crops_equal_the_tf_data_ones(photo_packs):
    """1 and 10 crops cut on the host equal augment.eval_images of the 256 image, PNG-encoded (lossless)."""
    import tensorflow as tf

    from alexnet_jax.data import augment, pipeline

    for encoding, split in (("raw", photo_packs["raw"].eval), ("jpeg", photo_packs["jpeg"].eval)):
        images = split.read(np.arange(split.num_examples))  # the jpeg pack: its images as decoded
        files = [tf.io.encode_png(image).numpy() for image in images]
        for crops, image_size in ((1, 224), (10, 224), (1, 227), (10, 227)):  # 227: an odd margin of 29
            batches = list(packed.eval_batches(split, crops=crops, image_size=image_size, per_process_batch=2))
            assert len(batches) == 2
            got = np.concatenate([batch["images"] for batch in batches])
            mask = np.concatenate([batch["mask"] for batch in batches])
            np.testing.assert_array_equal(mask, [1, 1, 1, 0])
            assert not got[3].any()
            for index, data in enumerate(files):
                want = augment.eval_images(tf.constant(data), crops=crops, image_size=image_size, resize_size=SIZE)
                message = f"{encoding} {crops}x{image_size} #{index}"
                np.testing.assert_array_equal(got[index], want.numpy(), err_msg=message)
            # The same batches through the registry the training loop calls, with its Augmentation.
            aug = pipeline.Augmentation(image_size=image_size, resize_size=SIZE, eval_crops=crops)
            via_split = registry.eval_batches(split, aug, per_process_batch=2)
            via_split = np.concatenate([batch["images"] for batch in via_split])
            np.testing.assert_array_equal(via_split, got)
    with pytest.raises(UserError, match="resize_size"):
        registry.eval_batches(split, pipeline.Augmentation(image_size=224, resize_size=288), per_process_batch=2)


# ---------------------------------------------------------------- order: train and eval


@pytest.fixture(scope="module")
def tiny_pack(tmp_path_factory):
    """39 training and 13 evaluation images, packed at 8x8: enough examples to cross epochs quickly."""
    root = write_image_folder(tmp_path_factory.mktemp("tiny"), classes=3, train_per_class=13, eval_per_class=(5, 4, 4))
    out = tmp_path_factory.mktemp("tiny_pack") / "pack"
    pack.write_packed(str(root), str(out), size=8, workers=1, shard_images=10)
    return packed.open_packed(str(out))


def _stream(split, steps, **kwargs):
    iterator = packed.train_batches(split, per_process_batch=8, **kwargs)
    batches = [next(iterator) for _ in range(steps)]
    iterator.close()
    return batches


def test_train_order_is_the_documented_pure_function(tiny_pack):
    split = tiny_pack.train
    all_images = split.read(np.arange(split.num_examples))
    batches = _stream(split, 10, seed=5)  # 80 positions: two epochs of 39 and two more
    ids = np.concatenate([batch["example_ids"] for batch in batches])
    np.testing.assert_array_equal(ids, np.arange(80))
    order = np.concatenate([np.random.default_rng([5, epoch]).permutation(39) for epoch in range(3)])[:80]
    images = np.concatenate([batch["images"] for batch in batches])
    np.testing.assert_array_equal(images, all_images[order])  # whole 8x8 images: the device crops
    np.testing.assert_array_equal(np.concatenate([b["labels"] for b in batches]), split.labels[order])
    assert all(b["labels"].dtype == np.int32 and b["example_ids"].dtype == np.int32 for b in batches)
    assert sorted(order[:39]) == list(range(39)) and sorted(order[39:78]) == list(range(39))
    assert not np.array_equal(order[:39], order[39:78])  # a new permutation each epoch
    assert not np.array_equal(_stream(split, 1, seed=6)[0]["images"], batches[0]["images"])  # another seed


def test_resume_at_any_step_continues_the_same_stream(tiny_pack):
    split = tiny_pack.train
    whole = _stream(split, 12, seed=3)
    for start in (1, 4, 5, 9):  # 4 and 9 begin inside a batch that crosses an epoch boundary (39 per epoch)
        resumed = _stream(split, 12 - start, seed=3, start_step=start)
        for want, got in zip(whole[start:], resumed):
            for key in ("images", "labels", "example_ids"):
                np.testing.assert_array_equal(got[key], want[key], err_msg=f"start_step={start} {key}")
    via_split = next(registry.train_batches(split, None, per_process_batch=8, seed=3, start_step=9))  # as the loop
    for key in ("images", "labels", "example_ids"):
        np.testing.assert_array_equal(via_split[key], whole[9][key])


def test_processes_partition_every_epoch(tiny_pack):
    split = tiny_pack.train
    seen = []
    for process_index in range(2):
        local = packed.local_indices(39, process_index, 2)  # 20 and 19 examples
        batches = _stream(split, 5, seed=1, process_index=process_index, process_count=2)
        ids = np.concatenate([batch["example_ids"] for batch in batches])
        np.testing.assert_array_equal(ids, np.arange(40) * 2 + process_index)
        images = np.concatenate([batch["images"] for batch in batches])
        lookup = {split.read([index])[0].tobytes(): index for index in local}
        picks = [lookup[image.tobytes()] for image in images]  # every image is one of this process's own
        assert sorted(picks[: len(local)]) == list(local)  # one epoch: each local example once
        seen.extend(picks[: len(local)])
    assert sorted(seen) == list(range(39))


def test_example_ids_must_fit_int32(tiny_pack):
    iterator = packed.train_batches(tiny_pack.train, per_process_batch=8, seed=0, start_step=2**31 // 8)
    with pytest.raises(UserError, match="int32"):
        next(iterator)
    last = (2**31 - 1) // 8 - 1  # the last batch whose ids all fit
    assert next(packed.train_batches(tiny_pack.train, per_process_batch=8, seed=0, start_step=last))[
        "example_ids"
    ].max() == (last * 8 + 7)


def test_eval_over_eight_processes_counts_every_example_once(tiny_pack):
    from alexnet_jax.data import pipeline

    split = tiny_pack.eval  # 13 examples
    for crops in (1, 10):
        masked = 0
        for process_index in range(8):
            batches = list(
                packed.eval_batches(
                    split, crops=crops, image_size=6, per_process_batch=1, process_index=process_index, process_count=8
                )
            )
            assert len(batches) == pipeline.eval_steps(13, 1, 8) == packed.eval_steps(13, 1, 8) == 2
            mask = np.concatenate([batch["mask"] for batch in batches]).astype(bool)
            images = np.concatenate([batch["images"] for batch in batches])
            labels = np.concatenate([batch["labels"] for batch in batches])
            assert images.shape[1:] == ((6, 6, 3) if crops == 1 else (10, 6, 6, 3))
            local = pipeline.local_indices(13, process_index, 8)
            np.testing.assert_array_equal(local, packed.local_indices(13, process_index, 8))
            np.testing.assert_array_equal(images[mask], packed.eval_crops(split.read(local), crops=crops, image_size=6))
            np.testing.assert_array_equal(labels[mask], split.labels[local])
            masked += mask.sum()
        assert masked == 13
    devices = next(packed.device_batches(packed.eval_batches(split, crops=1, image_size=6, per_process_batch=8), 4))
    assert devices["images"].shape == (4, 2, 6, 6, 3) and devices["mask"].shape == (4, 2)


# ---------------------------------------------------------------- bad input, --check, interrupted packs


def test_bad_images_are_named_or_skipped(tmp_path, capsys):
    root = write_image_folder(tmp_path / "images", classes=2, train_per_class=3, eval_per_class=(1, 1))
    good = (root / "train" / "class_1" / "img_0.jpg").read_bytes()
    (root / "train" / "class_1" / "cut.jpg").write_bytes(good[:300])  # truncated: the listing's check names it
    assert pack_command.main([f"--data_dir={root}", f"--out={tmp_path / 'a'}", "--workers=1"]) == 2
    assert "cut.jpg" in capsys.readouterr().err and not (tmp_path / "a").exists()
    assert pack_command.main([f"--data_dir={root}", f"--out={tmp_path / 'a'}", "--workers=1", "--skip_bad_images"]) == 0
    assert packed.open_packed(str(tmp_path / "a")).train.num_examples == 6

    # Whole at both ends but undecodable (a 0x0 frame): only the decode in the pool finds it.
    data = bytearray(good)
    start = data.index(b"\xff\xc0")
    data[start + 5 : start + 9] = b"\x00\x00\x00\x00"
    (root / "train" / "class_0" / "zero.jpg").write_bytes(bytes(data))
    (root / "train" / "class_1" / "cut.jpg").unlink()
    with pytest.raises(UserError, match="zero.jpg"):
        pack.write_packed(str(root), str(tmp_path / "b"), size=16, workers=1)
    assert not (tmp_path / "b").exists()
    assert not [p for p in tmp_path.iterdir() if "staging" in p.name]
    manifest = pack.write_packed(str(root), str(tmp_path / "b"), size=16, workers=1, skip_bad_images=True)
    assert [os.path.basename(name) for name in manifest["skipped"]["train"]] == ["zero.jpg"]
    skipped = packed.open_packed(str(tmp_path / "b"))
    assert skipped.train.num_examples == 6 and list(skipped.train.labels) == [0, 0, 0, 1, 1, 1]

    with pytest.raises(UserError, match="already exists"):
        pack.write_packed(str(root), str(tmp_path / "b"))
    with pytest.raises(UserError, match="outside"):
        pack.write_packed(str(root), str(root / "inside"))
    assert pack_command.main([f"--data_dir={root}", f"--out={tmp_path / 'c'}", "--encoding=png"]) == 2
    assert "--encoding" in capsys.readouterr().err
    with pytest.raises(UserError, match="not a packed dataset"):
        packed.open_packed(str(root))


def test_check_finds_a_changed_byte(photo_packs, tmp_path, capsys):
    import shutil

    for encoding in packed.ENCODINGS:
        copy = tmp_path / encoding
        shutil.copytree(photo_packs[encoding].directory, copy)
        assert pack_command.main(["--check", f"--data_dir={copy}"]) == 0
        assert "ok" in capsys.readouterr().out
        shard = copy / ("train-00001." + encoding)
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
        assert pack_command.main(["--check", f"--data_dir={copy}"]) == 1
        output = capsys.readouterr().out
        assert "train-00001" in output and "sha256" in output and "1 problem(s)" in output
        (copy / f"validation-00000.{encoding}").write_bytes(b"short")
        assert pack_command.main(["--check", f"--data_dir={copy}"]) == 1
        assert "2 problem(s)" in capsys.readouterr().out
        with pytest.raises(UserError, match="--check"):
            packed.open_packed(str(copy))  # opening checks sizes (not checksums)
    assert pack_command.main(["--check", f"--data_dir={tmp_path}"]) == 1


def _session_processes(session: int) -> list[int]:
    """Live (not zombie) processes of a session."""
    live = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session and fields[0] != "Z":  # fields: state, ppid, pgrp, session, ...
            live.append(int(entry))
    return live


def test_a_killed_pack_leaves_no_output_and_the_next_pack_cleans_up(tmp_path):
    root = write_image_folder(tmp_path / "images", classes=2, train_per_class=200, eval_per_class=(20, 20))
    out = tmp_path / "pack"
    command = [sys.executable, "-m", "alexnet_jax.commands.pack", f"--data_dir={root}", f"--out={out}"]
    command += ["--workers=1", "--shard_images=16"]
    env = dict(os.environ, PYTHONPATH=os.path.join(REPO, "src"))
    process = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        shards = []
        while not shards and process.poll() is None and time.monotonic() < deadline:
            shards = list(tmp_path.glob(".pack.staging-*/train-00001.raw"))  # a shard written, more to come
            time.sleep(0.005)
        assert shards and process.poll() is None, f"the pack finished or never started: {process.communicate()}"
        process.kill()  # SIGKILL to the pack alone: its workers must notice and exit
        process.communicate(timeout=30)
        assert not out.exists()
        assert [p.name.startswith(".pack.staging-") for p in tmp_path.iterdir() if p.name != "images"] == [True]
        deadline = time.monotonic() + 20
        while _session_processes(process.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _session_processes(process.pid), "pool workers outlived the killed pack"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    # The next pack to the same --out removes the dead one's staging directory.
    pack.write_packed(str(root), str(out), size=16, workers=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "pack"]
    assert packed.open_packed(str(out)).train.num_examples == 400


def test_sigterm_removes_the_staging_directory(tmp_path):
    root = write_image_folder(tmp_path / "images", classes=2, train_per_class=200, eval_per_class=(1, 1))
    command = [sys.executable, "-m", "alexnet_jax.commands.pack", f"--data_dir={root}", f"--out={tmp_path / 'pack'}"]
    env = dict(os.environ, PYTHONPATH=os.path.join(REPO, "src"))
    process = subprocess.Popen([*command, "--workers=1", "--shard_images=16"], env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".pack.staging-*/train-00000.raw")) and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode != 0 and b"Traceback" not in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]


# ---------------------------------------------------------------- TFDS


def test_pack_a_prepared_imagenet2012(tmp_path):
    from conftest import NUM_VAL, SYNSETS, write_ilsvrc_tars

    manual_dir = write_ilsvrc_tars(tmp_path / "manual")
    data_dir = tmp_path / "tfds"
    source = registry.open_source("imagenet2012", data_dir=str(data_dir), manual_dir=str(manual_dir))
    out = tmp_path / "pack"
    argv = ["--dataset=imagenet2012", f"--data_dir={data_dir}", f"--out={out}", "--size=64", "--workers=1"]
    assert pack_command.main(argv) == 0
    result = packed.open_packed(str(out))
    assert result.class_names == source.class_names and result.class_names[:3] == SYNSETS
    assert result.train.num_examples == 12 and result.eval.num_examples == NUM_VAL
    for split, tfds_split in ((result.train, source.train), (result.eval, source.eval)):
        records = list(tfds_split.examples().as_numpy_iterator())  # (JPEG bytes, label) in the split's order
        np.testing.assert_array_equal(split.labels, [label for _, label in records])
        images = split.read(np.arange(split.num_examples))
        for image, (encoded, _) in zip(images, records):
            np.testing.assert_array_equal(image, expected_patch(encoded, 64))


def test_training_on_a_pack_resumes_exactly_and_evaluates_every_example(tmp_path):
    """python launch.py --config.dataset=packed: the step crops on the device; a run resumed from step 2
    redoes steps 3 and 4 exactly as the first run did (its input starts at the resume step), and the
    10-crop evaluation counts all 13 validation images once."""
    import shutil
    import subprocess

    from conftest import child_env, launch_command

    from alexnet_jax.reporting import metrics as metrics_lib

    root = write_image_folder(tmp_path / "images", classes=3, train_per_class=6, eval_per_class=(5, 4, 4))
    pack.write_packed(str(root), str(tmp_path / "pack"), size=72, workers=1)
    workdir = tmp_path / "run"
    command = launch_command(
        workdir,
        "--config.dataset=packed",
        f"--config.data_dir={tmp_path / 'pack'}",
        "--config.image_size=64",
        "--config.batch_size=8",
        "--config.eval_crops=10",
        NARROW_FC,
        "--config.num_train_steps=4",
        "--config.log_every_steps=1",
        "--config.eval_every_steps=4",
        "--config.checkpoint_every_steps=2",
        "--config.schedule=constant",
        "--config.random_flip=True",
    )

    def launch():
        result = subprocess.run(command, capture_output=True, text=True, env=child_env(2), timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    assert "packed:" in launch()
    records = metrics_lib.read_metrics(str(workdir))
    assert [(r["step"], r["eval/num_examples"]) for r in records if "eval/loss" in r] == [(4, 13)]
    shutil.rmtree(workdir / "checkpoints" / "4")  # as if killed after step 4's metrics
    assert "at step 2" in launch()
    keys = ("train/loss", "train/top1_acc", "train/grad_norm")
    redone = {r["step"]: [r[k] for k in keys] for r in metrics_lib.read_metrics(str(workdir)) if "train/loss" in r}
    with open(workdir / "metrics.rolled_back.jsonl") as handle:
        first = [json.loads(line) for line in handle]
    assert {r["step"]: [r[k] for k in keys] for r in first if "train/loss" in r} == {3: redone[3], 4: redone[4]}
