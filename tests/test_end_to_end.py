"""The real launch.py main on a generated image folder: metrics, checkpoints, resume, errors."""

import json
import os
import subprocess
import sys

from conftest import REPO, child_env

sys.path.insert(0, REPO)
import launch  # noqa: E402
from alexnet_jax import metrics as metrics_lib  # noqa: E402


def _run_launch(workdir, *overrides, monkeypatch):
    argv = [
        "launch.py",
        f"--config={os.path.join(REPO, 'configs', 'demo.py')}",
        f"--workdir={workdir}",
        *overrides,
    ]
    monkeypatch.setattr(sys, "argv", argv)  # ml_collections reads the overrides from sys.argv
    launch.FLAGS.unparse_flags()
    for name in [name for name in launch.FLAGS if name.startswith("config.")]:
        delattr(launch.FLAGS, name)  # the override flags of an earlier parse
    launch.FLAGS(argv)
    launch.main(["launch.py"])


def test_train_evaluate_checkpoint_and_resume(image_folder, tmp_path, capsys, monkeypatch):
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
    ]
    _run_launch(workdir, *common, "--config.num_train_steps=3", monkeypatch=monkeypatch)
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

    capsys.readouterr()
    _run_launch(workdir, *common, "--config.num_train_steps=5", monkeypatch=monkeypatch)
    console = capsys.readouterr().out
    assert "resumed from" in console and "at step 3" in console
    assert "step 5/5" in console and "8 local / 8 total devices" in console
    records = metrics_lib.read_metrics(str(workdir))
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 3, 4, 5]
    assert "4" in os.listdir(workdir / "checkpoints") and "5" in os.listdir(workdir / "checkpoints")
    json.dumps(records)  # plain JSON all through
    assert all(0.0 <= r["train/data_wait_frac"] <= 1.0 for r in records if "train/loss" in r)

    # The resumed steps read the batches a straight run reads at those steps (not the first ones again).
    straight_only = ["--config.num_train_steps=5", "--config.eval_every_steps=5", "--config.checkpoint_every_steps=5"]
    _run_launch(tmp_path / "straight", *common, *straight_only, monkeypatch=monkeypatch)
    keys = ("train/loss", "train/top1_acc", "train/grad_norm")
    straight_records = metrics_lib.read_metrics(str(tmp_path / "straight"))
    straight = {r["step"]: [r[k] for k in keys] for r in straight_records if "train/loss" in r}
    resumed = {r["step"]: [r[k] for k in keys] for r in records if "train/loss" in r}
    assert resumed == {step: straight[step] for step in resumed}


def _launch_subprocess(workdir, *overrides, devices=8):
    """Start launch.py in a child process (returns the Popen; output captured as text)."""
    env = child_env(devices)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # as a user's shell has it: the console must still show only our lines
    command = [
        sys.executable,
        os.path.join(REPO, "launch.py"),
        f"--config={os.path.join(REPO, 'configs', 'demo.py')}",
        f"--workdir={workdir}",
        *overrides,
    ]
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
