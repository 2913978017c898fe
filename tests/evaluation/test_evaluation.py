"""The one evaluation code path, against numpy: 10-crop averaging with distinct crops, masked
top-1/top-5 where padding would score as correct, and both entry points (training's Evaluator
and python -m alexnet_jax.commands.evaluate's evaluate_runs) giving the same exact figures."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TEST_HIDDEN_UNITS

from alexnet_jax.checkpointing import trained
from alexnet_jax.evaluation import core as evaluation
from alexnet_jax.model import build
from alexnet_jax.model.alexnet import AlexNet
from alexnet_jax.parallel import distributed, schemes
from alexnet_jax.reporting import metrics as reporting_metrics
from alexnet_jax.step import metrics as metrics_lib
from alexnet_jax.step import steps
from alexnet_jax.training import loop

SIZE, CLASSES, CROPS = 63, 7, 10


def _softmax(logits):
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def _reference(probs, labels, mask):
    """Exact eval metrics in numpy: ranks with ties in the label's favour, padding dropped."""
    real = mask == 1
    probs, labels = probs[real], labels[real]
    label_probs = probs[np.arange(len(labels)), labels]
    rank = (probs > label_probs[:, None]).sum(axis=1)
    return {
        "eval/loss": float(-np.log(label_probs).mean()),
        "eval/top1_acc": float((rank < 1).mean()),
        "eval/top5_acc": float((rank < 5).mean()),
        "eval/num_examples": int(real.sum()),
    }


def test_masked_sums_leave_out_padding_that_would_score_as_correct():
    rng = np.random.default_rng(0)
    probs = _softmax(rng.normal(size=(12, CLASSES)) * 3)
    predicted = probs.argmax(axis=1)
    labels = (predicted + 1 + rng.integers(0, CLASSES - 1, 12)) % CLASSES  # real rows: never top-1
    mask = np.array([1] * 8 + [0] * 4, np.int32)
    labels[8:] = predicted[8:]  # padded rows: all top-1 correct
    sums = metrics_lib.masked_sums(jnp.asarray(probs), jnp.asarray(labels), jnp.asarray(mask))
    results = metrics_lib.eval_results(sums)
    expected = _reference(probs, labels, mask)
    assert results["eval/top1_acc"] == expected["eval/top1_acc"] == 0.0
    assert results["eval/num_examples"] == 8
    for key in ("eval/loss", "eval/top5_acc"):
        assert results[key] == pytest.approx(expected[key], rel=1e-5)


@pytest.fixture(scope="module")
def model_and_params():
    model = AlexNet(
        variant="paper",
        num_classes=CLASSES,
        init_scheme="modern",
        input_scale="standardized",
        hidden_units=TEST_HIDDEN_UNITS,
    )
    params = jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)), train=False))()["params"]
    return model, jax.tree_util.tree_map(np.asarray, params)


@pytest.fixture(scope="module")
def ten_crop_batch(model_and_params):
    """16 examples of 10 distinct crops each; the last 5 are padding whose label is their prediction."""
    model, params = model_and_params
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (16, CROPS, SIZE, SIZE, 3), dtype=np.uint8)
    logits = np.asarray(
        jax.jit(lambda p, x: model.apply({"params": p}, x, train=False))(params, images.reshape((-1, SIZE, SIZE, 3)))
    )
    probs = _softmax(logits.reshape((16, CROPS, CLASSES))).mean(axis=1)  # the paper: average the softmax
    labels = rng.integers(0, CLASSES, 16).astype(np.int32)
    mask = np.array([1] * 11 + [0] * 5, np.int32)
    labels[11:] = probs[11:].argmax(axis=1)
    first_crop_only = _softmax(logits.reshape((16, CROPS, CLASSES))[:, 0])
    assert not np.allclose(first_crop_only, probs, atol=1e-4)  # the crops are distinct
    batch = {"images": images, "labels": labels, "mask": mask}
    return batch, _reference(probs, labels, mask)


def _device_batches(batch, devices=8):
    return [distributed.shard_to_devices({k: v.reshape((devices, -1) + v.shape[1:]) for k, v in batch.items()})]


def _check(results, expected):
    assert results["eval/num_examples"] == expected["eval/num_examples"] == 11
    for key in ("eval/loss", "eval/top1_acc", "eval/top5_acc"):
        assert results[key] == pytest.approx(expected[key], rel=2e-4, abs=1e-6), key


def test_training_evaluator_averages_ten_crops_and_masks_padding(model_and_params, ten_crop_batch):
    model, params = model_and_params
    batch, expected = ten_crop_batch
    _, p_eval = schemes.make_steps(model, optax_sgd(), lambda step: 0.0)
    inputs = loop.Inputs(train=iter(()), eval=lambda: iter(_device_batches(batch)), augment=None)
    writer = reporting_metrics.MetricWriter("unused", enabled=False)
    evaluator = loop.Evaluator(p_eval, inputs, writer, workdir="unused", variant="paper")
    state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=())
    _check(evaluator(1, state), expected)


def test_evaluate_cli_path_averages_ten_crops_and_masks_padding(model_and_params, ten_crop_batch):
    model, params = model_and_params
    batch, expected = ten_crop_batch
    run = trained.TrainedModel(
        path="run",
        params=params,
        variant="paper",
        num_classes=CLASSES,
        class_names=None,
        image_size=SIZE,
        resize_size=72,
        resize_method="bilinear",
        input_scale="standardized",
        eval_crops=CROPS,
        step=0,
        run_info={},
        architecture=build.architecture({"hidden_units": TEST_HIDDEN_UNITS}),
    )
    results, probs = evaluation.evaluate_runs([run], _device_batches(batch), keep_probabilities=True)
    _check(results, expected)
    assert probs.shape == (11, CLASSES)
    # An ensemble of a model with itself is the model.
    twice, _ = evaluation.evaluate_runs([run, dataclasses.replace(run, path="copy")], _device_batches(batch))
    _check(twice, expected)


def optax_sgd():
    import optax

    return optax.sgd(0.0)
