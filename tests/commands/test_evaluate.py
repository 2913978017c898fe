"""python -m alexnet_jax.commands.evaluate on a tiny image folder: one model, an ensemble, 10 crops."""

import json
import os

import jax
import numpy as np
import optax
import pytest
from conftest import TEST_HIDDEN_UNITS

from alexnet_jax.checkpointing import checkpoint, runinfo
from alexnet_jax.commands import evaluate
from alexnet_jax.config import base_config
from alexnet_jax.evaluation import core as evaluation
from alexnet_jax.model import build
from alexnet_jax.reporting import metrics as metrics_lib
from alexnet_jax.step import steps


@pytest.fixture(scope="module")
def two_runs(image_folder, tmp_path_factory):
    """Two workdirs holding an untrained checkpoint each (one init, the second perturbed)."""
    config = base_config()
    config.dataset, config.data_dir = "image_folder", str(image_folder)
    config.image_size, config.init, config.num_classes = 63, "modern", 3
    config.eval_crops = 10  # the paper's test: evaluate's default for these runs
    config.hidden_units = TEST_HIDDEN_UNITS  # evaluate rebuilds the recorded width
    model = build.create_model(config, 3)
    tx = optax.sgd(0.01)
    state = steps.init_state(model, tx, jax.random.key(0), config.image_size)
    noise = jax.random.normal(jax.random.key(1), state.params["fc8"]["kernel"].shape)
    other_fc8 = {"kernel": state.params["fc8"]["kernel"] + 0.05 * noise, "bias": state.params["fc8"]["bias"]}
    other = state.replace(params={**state.params, "fc8": other_fc8})
    workdirs = []
    for name, run_state in (("a", state), ("b", other)):
        workdir = str(tmp_path_factory.mktemp(f"run_{name}"))
        saver = checkpoint.Checkpointer(workdir)
        saver.save(0, run_state, {"model": config.model, "num_classes": 3, "optimizer": config.optimizer})
        saver.close()
        runinfo.write_run_info(
            workdir,
            config,
            ("class_0", "class_1", "class_2"),
            num_classes=3,
            resize_size=72,
            input_scale=model.input_scale,
        )
        workdirs.append(workdir)
    return workdirs


def test_single_models_and_their_ensemble(two_runs, image_folder):
    from alexnet_jax.data import pipeline, sources
    from alexnet_jax.parallel import distributed

    runs = [evaluate.load_run(w) for w in two_runs]
    split = sources.image_folder(str(image_folder)).eval
    aug = pipeline.Augmentation(image_size=63, resize_size=72)
    batches = list(
        distributed.prefetch_to_device(
            pipeline.device_batches(pipeline.eval_dataset(split, aug, per_process_batch=8), 8)
        )
    )
    single = [evaluation.evaluate_runs([run], batches, keep_probabilities=True) for run in runs]
    both, both_probs = evaluation.evaluate_runs(runs, batches, keep_probabilities=True)
    for record, probs in [*single, (both, both_probs)]:
        assert record["eval/num_examples"] == 7  # the split's size: padding never counts
        assert probs.shape == (7, 3)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
        assert 0.0 <= record["eval/top1_acc"] <= record["eval/top5_acc"] == 1.0  # 3 classes: top-5 is sure
    assert not np.allclose(single[0][1], single[1][1])  # the two models differ
    np.testing.assert_allclose(both_probs, (single[0][1] + single[1][1]) / 2, rtol=1e-5, atol=1e-7)
    # The loss is the mean negative log of the ensemble's probability of the true label.
    expected = -np.log(both_probs[np.arange(7), split.labels]).mean()
    assert both["eval/loss"] == pytest.approx(expected, rel=1e-4)


def test_cli_ten_crops_out_and_metrics(two_runs, tmp_path, capsys):
    out = tmp_path / "results.json"
    argv = [f"--workdir={two_runs[0]}", f"--workdir={two_runs[1]}", "--crops=10", "--batch_size=8"]
    assert evaluate.main([*argv, f"--out={out}", "--write_metrics"]) == 0
    record = json.loads(out.read_text())
    assert record["eval/num_examples"] == 7 and record["crops"] == 10 and len(record["workdirs"]) == 2
    assert "ensemble of 2" in capsys.readouterr().out
    lines = (two_runs[0] + "/metrics.jsonl", two_runs[1] + "/metrics.jsonl")
    written = metrics_lib.read_metrics(two_runs[0])
    assert written[-1]["eval/top1_acc"] == record["eval/top1_acc"] and written[-1]["eval/crops"] == 10
    assert not os.path.exists(lines[1])  # only the first workdir, and only when asked


def test_evaluate_defaults_to_the_runs_own_eval_crops(two_runs, tmp_path):
    defaulted, _ = evaluate.evaluate(two_runs[:1], batch_size=8)
    assert defaulted["crops"] == 10  # config.eval_crops of the run, as the paper's figures are
    centre, _ = evaluate.evaluate(two_runs[:1], crops=1, batch_size=8)
    assert centre["crops"] == 1 and centre["eval/loss"] != defaulted["eval/loss"]


def test_the_split_asked_for_is_the_split_scored(two_runs, tmp_path, capsys):
    """An image folder has train/ (18 images) and validation/ (7): --split picks which is scored."""
    train, _ = evaluate.evaluate(two_runs[:1], crops=1, batch_size=8, split="train")
    validation, _ = evaluate.evaluate(two_runs[:1], crops=1, batch_size=8, split="validation")
    assert (train["eval/num_examples"], train["split"]) == (18, "train")
    assert (validation["eval/num_examples"], validation["split"]) == (7, "validation")
    assert evaluate.main([f"--workdir={two_runs[0]}", "--split=test", f"--out={tmp_path / 'r.json'}"]) == 2
    error = capsys.readouterr().err
    assert "'test'" in error and "only 'train' and 'validation'" in error and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "r.json").exists()


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert evaluate.main([f"--workdir={tmp_path}"]) == 2
    assert "config.json" in capsys.readouterr().err
