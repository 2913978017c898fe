"""The real launch.py main on a generated image folder: metrics, checkpoints, resume, errors."""

import json
import os
import subprocess

from conftest import NARROW_FC, child_env, launch_command

from alexnet_jax.reporting import metrics as metrics_lib


def _run_launch(workdir, *overrides, devices=2):
    """python launch.py with the demo config and overrides, on `devices` CPU devices; returns its stdout."""
    command = launch_command(
        workdir,
        *overrides,
    )
    result = subprocess.run(command, capture_output=True, text=True, env=child_env(devices), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_train_evaluate_checkpoint_and_resume(image_folder, tmp_path):
    workdir = tmp_path / "run"
    common = [
        "--config.dataset=image_folder",
        f"--config.data_dir={image_folder}",
        "--config.image_size=64",
        "--config.batch_size=16",
        "--config.log_every_steps=1",
        "--config.eval_every_steps=2",
        "--config.checkpoint_every_steps=2",
        "--config.num_classes=-1",
        "--config.schedule=constant",  # the lr does not depend on num_train_steps, which the resume raises
        NARROW_FC,  # the width is not the subject
    ]
    _run_launch(workdir, *common, "--config.num_train_steps=3")
    records = metrics_lib.read_metrics(str(workdir))
    train_steps = [r["step"] for r in records if "train/loss" in r]
    eval_records = [r for r in records if "eval/loss" in r]
    assert train_steps == [1, 2, 3]
    assert [r["step"] for r in eval_records] == [2, 3]
    for record in eval_records:
        assert record["eval/num_examples"] == 7  # every validation image, once
        assert 0.0 <= record["eval/top1_acc"] <= record["eval/top5_acc"] <= 1.0
    assert all(r["train/img_per_s"] >= 0 and r["train/learning_rate"] > 0 for r in records if "train/loss" in r)
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "3"]
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir))
    for figure in ("conv1_filters.png", "curves.png"):  # Figure 3 at each eval; curves at the end
        assert (workdir / figure).stat().st_size > 1000
    info = json.loads((workdir / "config.json").read_text())
    assert info["class_names"] == ["class_0", "class_1", "class_2"] and info["model"] == "paper"

    console = _run_launch(workdir, *common, "--config.num_train_steps=5")
    assert "resumed from" in console and "at step 3" in console
    assert "step 5/5" in console and "2 local / 2 total devices" in console
    records = metrics_lib.read_metrics(str(workdir))
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 3, 4, 5]
    assert "4" in os.listdir(workdir / "checkpoints") and "5" in os.listdir(workdir / "checkpoints")
    json.dumps(records)  # plain JSON all through
    assert all(0.0 <= r["train/data_wait_frac"] <= 1.0 for r in records if "train/loss" in r)

    # That the resumed steps read the batches a straight run reads at those steps is checked in-process
    # by test_pack.py::test_training_on_a_pack_resumes_exactly_and_evaluates_every_example (the same loop),
    # and bitwise for image folders by test_fault_tolerance.py's SIGTERM test.


def _launch_subprocess(workdir, *overrides, devices=8):
    """Start launch.py in a child process (returns the Popen; output captured as text)."""
    env = child_env(devices)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # as a user's shell has it: the console must still show only our lines
    command = launch_command(
        workdir,
        *overrides,
    )
    workdir.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=workdir.parent
    )


BAD_CONFIGS = [
    ("--config.batch_sise=8", "batch_sise"),
    ("--config.batch_size=12", "not divisible by the 8 devices"),
    ("--config.image_size=32", "image_size=32 is too small"),
    ("--config.learning_rate=-1", "learning_rate=-1"),
    ("--config.model=vgg", "not an AlexNet variant"),
    ("--config.dataset=no_such_dataset_xyz", "no_such_dataset_xyz"),
]


def test_bad_configs_fail_fast_with_one_clear_line(tmp_path):
    # All at once: each child spends its few seconds importing, so they overlap well.
    children = [
        _launch_subprocess(tmp_path / str(index) / "run", override) for index, (override, _) in enumerate(BAD_CONFIGS)
    ]
    for index, ((override, expected), child) in enumerate(zip(BAD_CONFIGS, children)):
        _, stderr = child.communicate(timeout=300)
        assert child.returncode != 0, override
        assert expected in stderr, (override, stderr)
        assert "Traceback" not in stderr, stderr
        assert "oneDNN" not in stderr and "InitializeLog" not in stderr, stderr  # TensorFlow's C++ notices
        assert not (tmp_path / str(index) / "run" / "checkpoints").exists()
