"""Predict, nearest neighbours (Figure 4), conv1 filters (Figure 3) and training curves, on a real workdir.

The workdir is made as a run makes it: a TrainState from steps.init_state saved
by the project's Checkpointer, and config.json from runinfo.write_run_info. No
training is needed: the tools must reproduce what the saved params compute.
"""

import json
import os

import jax
import numpy as np
import optax
import pytest
import tensorflow as tf
from PIL import Image

from alexnet_jax import config as config_lib
from alexnet_jax.checkpointing import checkpoint, runinfo, trained
from alexnet_jax.commands import neighbors, plot, predict
from alexnet_jax.data import augment
from alexnet_jax.model import alexnet as model_lib
from alexnet_jax.reporting import curves, figures
from alexnet_jax.step import steps

IMAGE_SIZE = 64


@pytest.fixture(scope="module")
def run(image_folder, tmp_path_factory):
    """(workdir, config, state) of a paper-variant run on the 3-class image folder, checkpointed at step 0."""
    workdir = str(tmp_path_factory.mktemp("run"))
    config = config_lib.base_config()
    config.dataset = "image_folder"
    config.data_dir = str(image_folder)
    config.image_size = IMAGE_SIZE
    # He init: unlike the paper's N(0, 0.01), its outputs depend clearly on the input.
    model = model_lib.AlexNet(variant="paper", num_classes=3, init_scheme="modern")
    state = steps.init_state(model, optax.sgd(0.01), jax.random.key(0), IMAGE_SIZE)
    checkpointer = checkpoint.Checkpointer(workdir)
    checkpointer.save(0, state, {"model": "paper", "num_classes": 3, "optimizer": "sgd"})
    checkpointer.close()
    runinfo.write_run_info(
        workdir, config, ("class_0", "class_1", "class_2"), num_classes=3, resize_size=73, input_scale="standardized"
    )
    return workdir, config, state


def _validation_images(image_folder):
    return sorted(str(p) for p in (image_folder / "validation").rglob("*.jpg"))


def test_run_info_and_params_come_back(run, image_folder):
    workdir, _, state = run
    info = runinfo.read_run_info(workdir)
    assert info["dataset"] == "image_folder" and info["data_dir"] == str(image_folder)
    assert (info["image_size"], info["resize_size"], info["model"], info["num_classes"]) == (64, 73, "paper", 3)
    assert info["class_names"] == ["class_0", "class_1", "class_2"]
    assert info["config"]["batch_size"] == 128
    loaded = trained.load(workdir)
    assert (loaded.step, loaded.variant, loaded.image_size, loaded.input_scale) == (0, "paper", 64, "standardized")
    saved = jax.tree_util.tree_leaves(state.params)
    assert all(isinstance(leaf, np.ndarray) for leaf in jax.tree_util.tree_leaves(loaded.params))
    for restored, original in zip(jax.tree_util.tree_leaves(loaded.params), saved):
        np.testing.assert_array_equal(restored, np.asarray(original))


def test_predict_prints_what_the_model_computes(run, image_folder, capsys):
    workdir, _, state = run
    images = _validation_images(image_folder)[:2]
    assert predict.main([f"--workdir={workdir}", *images]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == images[0] and len(lines) == 2 * 4  # a path, then 3 classes (top-5 of 3)
    shown = [(line.split()[2], float(line.split()[1].rstrip("%"))) for line in lines[1:4]]
    assert {name for name, _ in shown} == {"class_0", "class_1", "class_2"}

    # The same numbers straight from the state that was saved, preprocessed as evaluation does.
    module = model_lib.AlexNet(variant="paper", num_classes=3)
    with open(images[0], "rb") as handle:
        pixels = augment.eval_image(tf.constant(handle.read()), image_size=64, resize_size=73).numpy()[None]
    expected = np.asarray(jax.nn.softmax(module.apply({"params": state.params}, pixels, train=False)))[0]
    for name, percent in shown:
        assert percent == pytest.approx(100 * expected[int(name[-1])], abs=0.006)
    assert [p for _, p in shown] == sorted((p for _, p in shown), reverse=True)

    classifier = predict.load_classifier(workdir)
    one = dict(predict.classify(classifier, images[:1], crops=1)[0])
    ten = dict(predict.classify(classifier, images[:1], crops=10)[0])
    assert sum(ten.values()) == pytest.approx(1.0, abs=1e-5)
    assert max(abs(one[name] - ten[name]) for name in one) > 1e-3  # ten crops averaged, not the centre alone

    assert predict.main([f"--workdir={workdir}", "/no/such.jpg"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_fc7_features_are_the_last_hidden_layer(run):
    _, _, state = run
    images = np.random.default_rng(0).standard_normal((2, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    module = model_lib.AlexNet(variant="paper", num_classes=3)
    features = np.asarray(neighbors.fc7_features(module, state.params, images))
    # Independently: an fc8 that is the identity outputs exactly what it is fed, fc7 after the ReLU.
    identity = dict(state.params, fc8={"kernel": np.eye(4096, dtype=np.float32), "bias": np.zeros(4096, np.float32)})
    wide = model_lib.AlexNet(variant="paper", num_classes=4096)
    expected = np.asarray(wide.apply({"params": identity}, images, train=False))
    assert features.shape == (2, 4096) and features.min() >= 0 and features.max() > 0
    np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-6)


def test_neighbors_finds_each_validation_image_itself_first(run, image_folder, tmp_path, capsys):
    workdir, _, _ = run
    queries = _validation_images(image_folder)[::3]  # 3 of the 7 validation images
    out = tmp_path / "neighbors.png"
    assert neighbors.main([f"--workdir={workdir}", "--query", *queries, "--k=4", "--batch_size=4", f"--out={out}"]) == 0
    console = capsys.readouterr().out
    blocks = console.split("\n/")  # one block per query
    assert len(blocks) == len(queries)
    for query, block in zip(queries, blocks):
        first = block.splitlines()[1].split()
        assert float(first[2]) < 1e-2 and first[-1] == query  # itself, at distance ~0
        distances = [float(line.split()[2]) for line in block.splitlines()[1:5]]
        assert distances == sorted(distances) and distances[1] > 100 * max(distances[0], 1e-3)
    grid = np.asarray(Image.open(out))
    assert grid.shape == (3 * (112 + 14 + 4), 5 * (112 + 4) + 12, 3)


def test_nearest_k_matches_brute_force():
    rng = np.random.default_rng(1)
    queries, pool = rng.standard_normal((3, 16)), rng.standard_normal((50, 16))
    nearest = neighbors.NearestK(queries, 5)
    for start in range(0, 50, 7):  # in uneven batches
        nearest.add(pool[start : start + 7], start)
    brute = np.linalg.norm(queries[:, None] - pool[None], axis=-1)
    np.testing.assert_array_equal(nearest.indices, np.argsort(brute, axis=1)[:, :5])
    np.testing.assert_allclose(nearest.distances, np.sort(brute, axis=1)[:, :5], rtol=1e-9)


def test_conv1_filter_grid_draws_two_towers():
    kernel = np.random.default_rng(2).standard_normal((11, 11, 3, 96)).astype(np.float32)
    grid = figures.conv1_filter_grid({"conv1": {"kernel": kernel}}, "paper", scale=2, gap=1)
    tile, block_width = 22, 8 * 23 - 1
    assert grid.dtype == np.uint8 and grid.shape == (6 * 23 - 1, 2 * block_width + 6, 3)

    def drawn(index, left):
        row, column = divmod(index, 8)
        return grid[row * 23 : row * 23 + tile : 2, left + column * 23 : left + column * 23 + tile : 2]

    for index in (0, 47):  # tower 1 on the left, tower 2 (filters 48-95) on the right
        for filter_index, left in ((index, 0), (index + 48, block_width + 6)):
            expected = kernel[..., filter_index]
            expected = (expected - expected.min()) / (expected.max() - expected.min()) * 255
            np.testing.assert_allclose(drawn(index, left), expected, atol=0.5)
    torchvision = figures.conv1_filter_grid({"conv1": {"kernel": kernel[..., :64]}}, "torchvision")
    assert torchvision.shape == (8 * 46 - 2, 8 * 46 - 2, 3)


def test_write_conv1_filters_png_and_tensorboard(run, tmp_path):
    _, _, state = run
    path = figures.write_conv1_filters(str(tmp_path), state.params, "paper", step=7)
    png = np.asarray(Image.open(path))
    np.testing.assert_array_equal(png, figures.conv1_filter_grid(state.params, "paper"))
    events = [f for f in os.listdir(tmp_path) if f.startswith("events.out.tfevents")]
    tags = [
        (event.step, value.tag)
        for event in tf.compat.v1.train.summary_iterator(str(tmp_path / events[0]))
        for value in event.summary.value
    ]
    assert (7, "conv1_filters") in tags


def test_plot_curves_several_runs(tmp_path, capsys):
    for name, offset in (("a", 0.0), ("b", 0.3)):
        os.makedirs(tmp_path / name)
        lines = [
            json.dumps({"step": step, "train/loss": 2.0 - step / 10 + offset, "train/top1_acc": step / 20})
            for step in range(1, 11)
        ]
        lines.insert(5, json.dumps({"step": 3, "train/loss": 9.0}))  # step 3 redone after a resume
        lines += [
            json.dumps({"step": s, "eval/loss": 1.5, "eval/top1_acc": 0.4, "eval/top5_acc": 0.8}) for s in (5, 10)
        ]
        lines.append('{"step": 11, "train/lo')  # cut short by a kill
        (tmp_path / name / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    series = curves.read_series(str(tmp_path / "a"))
    assert series["train/loss"][0] == list(range(1, 11)) and series["train/loss"][1][2] == 9.0
    assert series["eval/top5_acc"] == ([5, 10], [0.8, 0.8])

    assert plot.main([f"--workdir={tmp_path / 'a'}", f"--workdir={tmp_path / 'b'}"]) == 0
    image = np.asarray(Image.open(tmp_path / "a" / "curves.png"))
    assert image.shape[0] > 200 and image.shape[1] > 3 * image.shape[0] // 2
    assert len(np.unique(image.reshape(-1, image.shape[-1]), axis=0)) > 20  # lines were drawn
    assert plot.main([f"--workdir={tmp_path / 'missing'}"]) == 2
    assert "does not exist" in capsys.readouterr().err
    os.makedirs(tmp_path / "untrained")
    assert plot.main([f"--workdir={tmp_path / 'untrained'}"]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
