"""python -m alexnet_jax.commands.study: settings x seeds as normal runs, resumable after a SIGKILL, with
study.json, study.png and study.md; bad --vary input refused in one line before anything trains;
the runs' config.json rebuilds the very network they trained (evaluate, init_from)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, OutputReader, child_env

from alexnet_jax import config as config_lib
from alexnet_jax.checkpointing import trained
from alexnet_jax.commands import study
from alexnet_jax.reporting import metrics as metrics_lib
from alexnet_jax.training import loop

DEMO = os.path.join(REPO, "configs", "demo.py")


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "--vary=KEY=V1,V2 is required"),
        (["--vary=activaton=relu,tanh"], "has no key 'activaton'; did you mean 'activation'?"),
        (["--vary=activation"], "write KEY=V1,V2"),
        (["--vary=activation=relu,sigmoid"], "setting activation=sigmoid: config.activation='sigmoid' is unknown"),
        (["--vary=lrn=auto,on", "--config.model=torchvision"], "setting lrn=on: config.lrn='on': the torchvision"),
        (["--vary=batch_size=32,big"], "config.batch_size takes integer values (it is 32); 'big' is not one"),
        (["--vary=activation=relu,relu"], "lists a value twice"),
        (["--vary=seed=0,1"], "seed cannot be varied; use --seeds=N"),
        (["--vary=lr_drop_epochs=1,2"], "a study varies numbers, strings or bools"),
        (["--vary=activation=tanh", "--vary=activation=relu"], "names 'activation' twice"),
        (["--vary=activation=relu,tanh", "--seeds=0"], "--seeds=0 must be at least 1"),
        (["--vary=activation=relu,tanh", "--config.activaton=tanh"], "activaton"),
    ],
)
def test_bad_input_is_one_line_and_exit_2_before_training(tmp_path, capsys, args, message):
    workdir = tmp_path / "study"
    assert study.main([f"--config={DEMO}", f"--workdir={workdir}", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not workdir.exists()  # nothing trained, nothing written


def test_one_at_a_time_and_grid_settings_and_their_statistics():
    config = config_lib.base_config()
    varied = study.parse_vary(["activation=relu,tanh", "random_crop=true,off", "dropout_rate=0.5,0"], config)
    assert varied == [("activation", ["relu", "tanh"]), ("random_crop", [True, False]), ("dropout_rate", [0.5, 0.0])]
    assert [s.name for s in study.grid(varied[:2])] == [
        "activation=relu,random_crop=True",
        "activation=relu,random_crop=False",
        "activation=tanh,random_crop=True",
        "activation=tanh,random_crop=False",
    ]
    one = study.grid(varied, one_at_a_time=True)
    assert [s.name for s in one] == ["baseline", "activation=tanh", "random_crop=False", "dropout_rate=0.0"]
    assert one[2].values == {"activation": "relu", "random_crop": False, "dropout_rate": 0.5}
    assert study.steps_to_reach({"steps": [5, 10, 15], "values": [0.9, 0.25, 0.1]}, 0.25) == 10
    assert study.steps_to_reach({"steps": [5, 10], "values": [0.9, 0.5]}, 0.25) is None
    stats = study.spread([0.1, 0.2, 0.3])
    assert stats["mean"] == pytest.approx(0.2) and stats["std"] == pytest.approx(0.1) and stats["n"] == 3


def _study_command(workdir, photo_folder):
    return [
        sys.executable,
        "-u",
        "-m",
        "alexnet_jax.commands.study",
        f"--config={DEMO}",
        f"--workdir={workdir}",
        "--vary=activation=relu,tanh",
        "--seeds=2",
        "--train_set_eval",
        "--target_train_error=0.6",
        "--config.dataset=image_folder",
        f"--config.data_dir={photo_folder}",
        "--config.batch_size=8",
        "--config.num_train_steps=2",
        "--config.log_every_steps=1",
        "--config.eval_every_steps=2",
        "--config.checkpoint_every_steps=2",
        # Every other switch away from the paper too: config.json must rebuild all of them.
        "--config.pooling=non_overlapping",
        "--config.lrn=off",
        "--config.dropout_rate=0.3",
    ]


@pytest.mark.slow
def test_a_killed_study_resumes_writes_its_outputs_and_its_runs_rebuild(photo_folder, tmp_path):
    workdir = tmp_path / "study"
    command = _study_command(workdir, photo_folder)
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env())
    try:
        output = OutputReader(child.stdout)
        output.wait_for(r"run 1/4 activation=relu seed 0: done", timeout=400)
        output.wait_for(r"run 2/4 activation=relu seed 1: training")
        output.wait_for(r"step 1/2")
        child.kill()  # SIGKILL, in the middle of the second run
    finally:
        child.kill()
        child.wait()
    first = workdir / "activation=relu" / "seed0"
    before = {name: (first / name).read_bytes() for name in ("metrics.jsonl", study.RUN_DONE_FILE)}
    assert not (workdir / "activation=relu" / "seed1" / study.RUN_DONE_FILE).exists()

    again = subprocess.run(command, capture_output=True, text=True, env=child_env(), timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "1 finished earlier, 3 to train" in again.stdout
    assert "run 1/4 activation=relu seed 0: finished earlier, skipped" in again.stdout
    assert {name: (first / name).read_bytes() for name in before} == before  # not redone
    for setting in ("activation=relu", "activation=tanh"):
        for seed in (0, 1):
            records = metrics_lib.read_metrics(str(workdir / setting / f"seed{seed}"))
            assert [r["step"] for r in records if "train/loss" in r] == [1, 2]  # each step once

    result = json.loads((workdir / "study.json").read_text())
    assert [s["name"] for s in result["settings"]] == ["activation=relu", "activation=tanh"]
    for entry in result["settings"]:
        assert entry["seeds"] == [0, 1] and len(entry["runs"]) == 2
        for run in entry["runs"]:
            assert run["curves"]["train_error"]["steps"] == [1, 2]
            assert run["curves"]["eval_error"]["steps"] == [2] and run["curves"]["train_loss"]["values"]
        train_error = entry["mean_curves"]["train_error"]
        per_step = [[r["curves"]["train_error"]["values"][i] for r in entry["runs"]] for i in range(2)]
        assert train_error["mean"] == pytest.approx([np.mean(v) for v in per_step])
        assert train_error["min"] == [min(v) for v in per_step] and train_error["max"] == [max(v) for v in per_step]
        for name in ("eval_error", "eval_top5_error", "train_set_error"):
            assert entry["final"][name]["n"] == 2 and "std" in entry["final"][name]
        assert entry["final"]["eval_error"]["per_seed"] == [
            r["curves"]["eval_error"]["values"][-1] for r in entry["runs"]
        ]
        assert set(entry["steps_to_target"]) >= {"per_seed", "reached", "mean", "ratio_to_first"}
    assert "eval_error" in result["settings"][1]["vs_first"]
    assert (workdir / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (workdir / "study.md").read_text().splitlines()
    assert table[0].startswith("| setting |") and "steps to 60% train error" in table[0]
    assert len(table) == 4 and table[3].startswith("| `activation=tanh` | 2 |")

    # config.json rebuilds the same network: the evaluate path scores the run as its own evaluator did.
    from alexnet_jax.commands import evaluate

    tanh = str(workdir / "activation=tanh" / "seed0")
    loaded = trained.load(tanh)
    module = loaded.module()
    assert (module.activation, module.pooling, module.lrn, module.dropout_rate) == (
        "tanh",
        "non_overlapping",
        False,
        0.3,
    )
    record, _ = evaluate.evaluate([tanh])
    final = [r for r in metrics_lib.read_metrics(tanh) if "eval/loss" in r][-1]
    assert record["eval/top1_acc"] == final["eval/top1_acc"] and record["eval/num_examples"] == 20
    assert record["eval/loss"] == pytest.approx(final["eval/loss"], rel=1e-5)
    # init_from across switches loads (the shapes match) but says what differs.
    assert loop.warn_other_architecture(loaded, config_lib.base_config()) == [
        "activation 'tanh' -> 'relu'",
        "pooling 'non_overlapping' -> 'overlapping'",
        "lrn False -> None",
    ]


def test_a_diverged_run_is_counted_apart_and_left_out_of_the_statistics():
    settings = study.grid([("dropout_rate", [0.5, 0.0])])

    def run(seed, train_errors, eval_error, diverged=False):
        curves = {name: {"steps": [], "values": []} for name in study.CURVES}
        curves["train_error"] = {"steps": [5, 10], "values": train_errors}
        curves["eval_error"] = {"steps": [10], "values": [eval_error]}
        record = {"diverged": "training diverged at step 7"} if diverged else {"wall_s": 1.0}
        return {"seed": seed, "workdir": f"w{seed}", "curves": curves, "record": record}

    finished = {
        "dropout_rate=0.5": [run(0, [0.9, 0.6], 0.3), run(1, [0.8, 0.4], 0.2)],
        "dropout_rate=0.0": [run(0, [0.9, 0.5], 0.4), run(1, [1.0, 1.0], 1.0, diverged=True)],
    }
    result = study.summarize(settings, finished, target=0.5, extra={})
    base, other = result["settings"]
    assert other["seeds"] == [0] and other["diverged"] == [{"seed": 1, "message": "training diverged at step 7"}]
    assert other["final"]["eval_error"]["mean"] == pytest.approx(0.4) and other["final"]["eval_error"]["n"] == 1
    assert base["steps_to_target"]["per_seed"] == [None, 10] and other["steps_to_target"]["per_seed"] == [10]
    assert base["final"]["eval_error"]["mean"] == pytest.approx(0.25)
    assert other["vs_first"]["eval_error"]["beyond_noise"] is None  # one seed left: no spread to judge by
    assert "| `dropout_rate=0.0` | 1 (+1 diverged) |" in study.table(result)
