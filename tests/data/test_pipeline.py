import numpy as np
import pytest

from alexnet_jax.data import pipeline, sources
from alexnet_jax.errors import UserError

AUG = pipeline.Augmentation(image_size=32, resize_size=37)


def _batches(dataset, count):
    iterator = dataset.as_numpy_iterator()
    return [next(iterator) for _ in range(count)]


def test_image_folder_lists_classes_and_files(image_folder):
    source = sources.image_folder(str(image_folder))
    assert source.class_names == ("class_0", "class_1", "class_2")
    assert source.train.num_examples == 18 and source.eval.num_examples == 7
    assert sorted(set(source.train.labels.tolist())) == [0, 1, 2]
    assert any(path.endswith(".png") for path in source.train.paths)


def test_image_folder_accepts_val(tmp_path):
    from conftest import write_image_folder

    write_image_folder(tmp_path, classes=2, train_per_class=2, eval_per_class=(1, 1))
    (tmp_path / "validation").rename(tmp_path / "val")
    assert sources.image_folder(str(tmp_path)).eval.num_examples == 2


def test_image_folder_errors_say_what_to_do(tmp_path):
    with pytest.raises(UserError, match="no train/ directory"):
        sources.image_folder(str(tmp_path))
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(UserError, match="validation/"):
        sources.image_folder(str(tmp_path))


def test_train_batches_shapes_and_determinism(image_folder):
    split = sources.image_folder(str(image_folder)).train
    first = _batches(pipeline.train_dataset(split, AUG, per_process_batch=4, seed=3), 3)
    again = _batches(pipeline.train_dataset(split, AUG, per_process_batch=4, seed=3), 3)
    other = _batches(pipeline.train_dataset(split, AUG, per_process_batch=4, seed=4), 3)
    assert first[0]["images"].shape == (4, 32, 32, 3) and first[0]["images"].dtype == np.uint8
    assert first[0]["labels"].dtype == np.int32
    assert first[0]["color"].shape == (4, 3) and first[0]["color"].dtype == np.float32
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a["images"], b["images"])
        np.testing.assert_array_equal(a["color"], b["color"])
    assert not np.array_equal(first[0]["images"], other[0]["images"])


def test_colour_offsets_are_exactly_the_papers_noise_of_each_example(image_folder):
    """Each example's offset comes from (seed, stream position): checked exactly, not statistically."""
    import tensorflow as tf
    from test_augment import expected_pca_offset

    split = sources.image_folder(str(image_folder)).train
    aug = pipeline.Augmentation(image_size=32, resize_size=37, pca_noise_std=0.1)
    batches = _batches(pipeline.train_dataset(split, aug, per_process_batch=4, seed=3), 2)
    colours = np.concatenate([b["color"] for b in batches])
    for position, colour in enumerate(colours):
        example_seed = tf.constant([3 * 2, position], tf.int64)
        pca_seed = tf.random.experimental.stateless_split(example_seed, 3)[2]
        np.testing.assert_allclose(colour, expected_pca_offset(pca_seed, 0.1), rtol=1e-5, atol=1e-8)


def test_train_resumes_at_the_exact_position(image_folder):
    """Batches from start_step=k equal batches k, k+1, ... of an uninterrupted stream, across epochs."""
    split = sources.image_folder(str(image_folder)).train  # 18 examples: batch 4 crosses epochs
    straight = _batches(pipeline.train_dataset(split, AUG, per_process_batch=4, seed=0), 10)
    resumed = _batches(pipeline.train_dataset(split, AUG, per_process_batch=4, seed=0, start_step=6), 4)
    for a, b in zip(straight[6:], resumed):
        np.testing.assert_array_equal(a["images"], b["images"])
        np.testing.assert_array_equal(a["labels"], b["labels"])
        np.testing.assert_array_equal(a["color"], b["color"])


def test_every_epoch_visits_every_example_once(image_folder):
    split = sources.image_folder(str(image_folder)).train
    plain = pipeline.Augmentation(image_size=32, resize_size=37, flip=False, pca_noise_std=0.0)
    batches = _batches(pipeline.train_dataset(split, plain, per_process_batch=6, seed=0), 6)  # 2 epochs
    labels = np.concatenate([b["labels"] for b in batches])
    for epoch in (labels[:18], labels[18:]):
        assert np.bincount(epoch).tolist() == np.bincount(split.labels).tolist()
    assert not np.array_equal(labels[:18], labels[18:])  # reshuffled each epoch


@pytest.mark.parametrize("process_count, batch", [(1, 4), (3, 2), (2, 3)])
def test_eval_counts_every_example_exactly_once(image_folder, process_count, batch):
    split = sources.image_folder(str(image_folder)).eval  # 7 examples
    steps = pipeline.eval_steps(split.num_examples, batch, process_count)
    seen_labels, seen_images = [], []
    for process_index in range(process_count):
        dataset = pipeline.eval_dataset(
            split, AUG, per_process_batch=batch, process_index=process_index, process_count=process_count
        )
        batches = list(dataset.as_numpy_iterator())
        assert len(batches) == steps  # every process runs the same number of eval steps
        for b in batches:
            keep = b["mask"] == 1
            seen_labels.extend(b["labels"][keep].tolist())
            seen_images.extend(b["images"][keep].reshape(int(keep.sum()), 32 * 32 * 3).sum(axis=1).round(3).tolist())
    assert sorted(seen_labels) == sorted(split.labels.tolist())
    assert len(set(seen_images)) == split.num_examples


def test_ten_crop_eval_batches(image_folder):
    split = sources.image_folder(str(image_folder)).eval
    aug = pipeline.Augmentation(image_size=32, resize_size=37, eval_crops=10)
    batch = next(pipeline.eval_dataset(split, aug, per_process_batch=4).as_numpy_iterator())
    assert batch["images"].shape == (4, 10, 32, 32, 3)


def test_device_batches_reshape(image_folder):
    split = sources.image_folder(str(image_folder)).train
    dataset = pipeline.train_dataset(split, AUG, per_process_batch=8, seed=0)
    batch = next(pipeline.device_batches(dataset, 4))
    assert batch["images"].shape == (4, 2, 32, 32, 3) and batch["labels"].shape == (4, 2)


def test_demo_digits_written_once(tmp_path):
    from alexnet_jax.data import demo

    root = demo.write_digits(str(tmp_path / "digits"))
    source = sources.image_folder(str(root))
    assert source.num_classes == 10
    assert source.train.num_examples + source.eval.num_examples == 1797
    assert 340 < source.eval.num_examples < 380
    stamp = (root / "COMPLETE").stat().st_mtime_ns
    assert demo.write_digits(str(tmp_path / "digits")) == root
    assert (root / "COMPLETE").stat().st_mtime_ns == stamp
