"""Bad files in an image folder: truncated JPEG, not an image, CMYK JPEG, PNG named .JPEG."""

import io
import logging

import numpy as np
import pytest

from alexnet_jax.data import pipeline, registry, sources
from alexnet_jax.errors import UserError

AUG = pipeline.Augmentation(image_size=32, resize_size=37)


def _jpeg(mode="RGB", seed=0, size=(80, 60)):
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _png(seed=0):
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, size=(50, 70, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
def folder(tmp_path):
    """Two classes of good JPEGs; tests add the odd file under train/a/."""
    for split, count in (("train", 3), ("validation", 1)):
        for name in ("a", "b"):
            (tmp_path / split / name).mkdir(parents=True)
            for index in range(count):
                (tmp_path / split / name / f"ok_{index}.jpg").write_bytes(_jpeg(seed=index))
    return tmp_path


def _all_train_labels(split):
    plain = pipeline.Augmentation(image_size=32, resize_size=37, flip=False, pca_noise_std=0.0)
    dataset = pipeline.train_dataset(split, plain, per_process_batch=split.num_examples, seed=0)
    return next(dataset.as_numpy_iterator())


def test_cmyk_jpeg_just_works(folder):
    (folder / "train" / "a" / "cmyk.jpg").write_bytes(_jpeg("CMYK", seed=7))
    split = sources.image_folder(str(folder)).train
    assert split.num_examples == 7
    batch = _all_train_labels(split)
    assert batch["images"].shape == (7, 32, 32, 3) and batch["images"].dtype == np.uint8
    assert batch["images"].std() > 10  # real pixels, not a blank decode
    # Also the eval path (centre crop and ten crops) and the partial decode directly.
    import tensorflow as tf

    data = tf.constant(_jpeg("CMYK", seed=7))
    assert tf.io.decode_and_crop_jpeg(data, [0, 0, 40, 40], channels=3).shape == (40, 40, 3)
    from alexnet_jax.data import augment

    assert augment.eval_ten_crops(data, image_size=32, resize_size=37).shape == (10, 32, 32, 3)


def test_png_named_jpeg_just_works(folder):
    (folder / "train" / "a" / "n02105855_2933.JPEG").write_bytes(_png())
    split = sources.image_folder(str(folder)).train
    assert split.num_examples == 7
    assert _all_train_labels(split)["images"].shape == (7, 32, 32, 3)


@pytest.mark.parametrize(
    "name, content, reason",
    [
        ("cut.jpg", _jpeg(seed=3)[:1500], "truncated JPEG"),
        ("notes.jpg", b"this is not an image\n" * 10, "not a JPEG or PNG"),
        ("cut.png", _png()[:400], "truncated PNG"),
    ],
)
def test_bad_file_stops_with_its_name_or_is_skipped(folder, caplog, name, content, reason):
    bad = folder / "train" / "a" / name
    bad.write_bytes(content)
    with pytest.raises(UserError, match="skip_bad_images=True") as error:
        registry.open_source("image_folder", data_dir=str(folder))
    assert str(bad) in str(error.value) and reason in str(error.value)

    with caplog.at_level(logging.WARNING, logger="alexnet_jax.data"):
        source = registry.open_source("image_folder", data_dir=str(folder), skip_bad_images=True)
    assert source.train.num_examples == 6 and str(bad) not in source.train.paths
    assert str(bad) in caplog.text and "skipped 1 bad image" in caplog.text
    assert _all_train_labels(source.train)["images"].shape == (6, 32, 32, 3)


def test_data_appended_after_a_jpeg_is_fine(folder):
    """Some cameras append kilobytes after the end marker: a full decode settles it."""
    (folder / "train" / "a" / "trailer.jpg").write_bytes(_jpeg(seed=9) + b"SEFT" * 1000)
    assert sources.image_folder(str(folder)).train.num_examples == 7


def test_many_bad_files_are_counted(folder):
    for index in range(12):
        (folder / "validation" / "b" / f"junk_{index}.jpg").write_bytes(b"")
    with pytest.raises(UserError, match="12 bad image file") as error:
        sources.image_folder(str(folder))
    assert "and 2 more" in str(error.value) and "empty file" in str(error.value)


def test_corrupt_middle_is_a_user_error_not_a_traceback(folder):
    """A JPEG whose ends look fine but whose header is broken still stops with one clear message."""
    data = bytearray(_jpeg(seed=5))
    start = data.index(b"\xff\xc0")  # the frame header: zero the image size
    data[start + 5 : start + 9] = b"\x00\x00\x00\x00"
    (folder / "train" / "a" / "broken.jpg").write_bytes(bytes(data))
    split = sources.image_folder(str(folder)).train
    dataset = pipeline.train_dataset(split, AUG, per_process_batch=7, seed=0)
    with pytest.raises(UserError, match="failed to decode"):
        next(pipeline.device_batches(dataset, 1))
