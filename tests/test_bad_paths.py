"""Every bad workdir or weights path is one line and exit status 2, never a traceback: launch.py and
the tools, driven through a read-only file system (a real read-only tmpfs), a file where a directory
should be, a directory without permission (the child runs without root's permission override), and
record files (model.json, config.json, MANIFEST.json) that are missing, empty or not JSON."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import child_env, launch_command, mounted_tmpfs

from alexnet_jax.checkpointing import checkpoint as checkpoint_lib
from alexnet_jax.checkpointing import manifest
from alexnet_jax.commands import convert, evaluate, neighbors, pack, plot, predict, resize

# Root passes permission bits by its capabilities; without them it meets them as any user does.
NO_OVERRIDE = ["setpriv", "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search"]
TOOLS = {"evaluate": evaluate.main, "predict": predict.main, "neighbors": neighbors.main, "plot": plot.main}


def _one_line(code: int, stderr: str, *expected: str) -> str:
    """The status is 2 and stderr is one `error:` line holding every expected text."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2, stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
    assert "Traceback" not in stderr
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def _tool(capsys, name: str, *argv: str) -> tuple[int, str]:
    code = TOOLS[name](list(argv))
    return code, capsys.readouterr().err


def _image(tmp_path) -> str:
    from PIL import Image

    path = str(tmp_path / "query.png")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(path)
    return path


def _tool_argv(name: str, flag: str, path: str, image: str) -> list[str]:
    """A full command line for `name` reading weights from `path`."""
    if name == "evaluate":
        return [f"--workdir={path}"]
    if name == "predict":
        return [f"{flag}={path}", image]
    if name == "neighbors":
        return [f"{flag}={path}", "--query", image, "--out", os.path.join(os.path.dirname(image), "grid.png")]
    return [f"--workdir={path}"]


def _read_only_tmpfs(directory):
    """A real read-only file system at `directory` (a tmpfs mounted ro), unmounted afterwards."""
    return mounted_tmpfs(str(directory), "size=1m,ro")


def _converted(tmp_path, model_json: bytes | None) -> str:
    """A converted checkpoint's directory whose model.json holds `model_json` (None: no file)."""
    directory = tmp_path / "converted"
    (directory / checkpoint_lib.PARAMS_DIR).mkdir(parents=True)
    if model_json is not None:
        (directory / checkpoint_lib.MODEL_FILE).write_bytes(model_json)
    return str(directory)


def _workdir(tmp_path, config_json: bytes | None) -> str:
    """A run's workdir (checkpoints/ present) whose config.json holds `config_json` (None: no file)."""
    directory = tmp_path / "run"
    (directory / checkpoint_lib.CHECKPOINTS_DIR).mkdir(parents=True)
    if config_json is not None:
        (directory / "config.json").write_bytes(config_json)
    return str(directory)


BAD_JSON = {
    "empty": (b"", "is empty"),
    "not JSON": (b'{"format": 1, "model": ', "is not JSON"),
    "a list": (b"[1]", "not an object"),
}


@pytest.mark.parametrize("content", list(BAD_JSON))
@pytest.mark.parametrize("name", ["predict", "neighbors"])
def test_a_converted_checkpoint_whose_model_json_is_bad_is_one_line(tmp_path, capsys, name, content):
    data, words = BAD_JSON[content]
    path = _converted(tmp_path, data)
    code, err = _tool(capsys, name, *_tool_argv(name, "--checkpoint", path, _image(tmp_path)))
    _one_line(code, err, os.path.join(path, "model.json"), words, "convert the weights again")


@pytest.mark.parametrize("content", list(BAD_JSON))
@pytest.mark.parametrize("name", ["evaluate", "predict"])
def test_a_workdir_whose_config_json_is_bad_is_one_line(tmp_path, capsys, name, content):
    data, words = BAD_JSON[content]
    path = _workdir(tmp_path, data)
    code, err = _tool(capsys, name, *_tool_argv(name, "--workdir", path, _image(tmp_path)))
    _one_line(code, err, os.path.join(path, "config.json"), words, "resume the run")


@pytest.mark.parametrize("name", ["evaluate", "predict", "neighbors", "plot"])
def test_a_weights_path_that_is_missing_or_a_file_is_one_line(tmp_path, capsys, name):
    image = _image(tmp_path)
    missing = str(tmp_path / "nowhere")
    _one_line(*_tool(capsys, name, *_tool_argv(name, "--workdir", missing, image)), missing, "does not exist")
    a_file = str(tmp_path / "weights.bin")
    open(a_file, "wb").close()
    _one_line(*_tool(capsys, name, *_tool_argv(name, "--workdir", a_file, image)), a_file, "is a file, not a directory")


def test_a_directory_that_is_neither_a_run_nor_converted_weights_is_one_line(tmp_path, capsys):
    path = _converted(tmp_path, None)  # params/ without model.json
    code, err = _tool(capsys, "predict", *_tool_argv("predict", "--checkpoint", path, _image(tmp_path)))
    _one_line(code, err, "--checkpoint=", "neither a converted checkpoint", "alexnet_jax.commands.convert")


def _saved_run(tmp_path, steps=(1, 2)) -> str:
    """A real workdir: Orbax checkpoints of a tiny params tree with their manifests."""
    workdir = str(tmp_path / "saved")
    checkpointer = checkpoint_lib.Checkpointer(workdir)
    for step in steps:
        params = {"fc8": {"bias": jnp.full((3,), float(step)), "kernel": jnp.ones((4, 3))}}
        checkpointer.save(step, {"params": params}, {"model": "torchvision", "num_classes": 3})
    checkpointer.close()
    return workdir


def _manifest(workdir, step) -> str:
    return os.path.join(workdir, checkpoint_lib.CHECKPOINTS_DIR, str(step), manifest.MANIFEST_NAME)


def test_tools_read_the_newest_checkpoint_whose_manifest_holds_and_refuse_when_none_does(tmp_path, capsys):
    workdir = _saved_run(tmp_path)
    with open(_manifest(workdir, 2), "w") as handle:
        handle.write("{not json")
    params, _, step = checkpoint_lib.load_run_params(workdir)  # the damaged newest is passed over
    assert step == 1 and float(params["fc8"]["bias"][0]) == 1.0
    open(_manifest(workdir, 1), "w").close()  # empty
    code, err = _tool(capsys, "predict", *_tool_argv("predict", "--workdir", workdir, _image(tmp_path)))
    line = _one_line(code, err, "every checkpoint in", "is damaged", "MANIFEST.json is unreadable")
    assert "1:" in line and "2:" in line


def test_a_missing_manifest_is_trusted_as_training_trusts_it(tmp_path):
    workdir = _saved_run(tmp_path, steps=(3,))
    os.remove(_manifest(workdir, 3))  # a checkpoint saved before manifests existed
    _, _, step = checkpoint_lib.load_run_params(workdir)
    assert step == 3


def test_convert_refuses_a_bad_pth_and_an_unwritable_out_in_one_line(tmp_path, capsys):
    missing = str(tmp_path / "alexnet.pth")
    _one_line(convert.main([f"--pth={missing}", f"--out={tmp_path / 'out'}"]), capsys.readouterr().err, "--pth=")
    open(missing, "wb").close()
    a_file = str(tmp_path / "taken")
    open(a_file, "w").close()
    code = convert.main([f"--pth={missing}", f"--out={a_file}"])
    _one_line(code, capsys.readouterr().err, f"--out={a_file}", "is a file, not a directory")
    with _read_only_tmpfs(tmp_path / "ro") as read_only:
        code = convert.main([f"--pth={missing}", f"--out={read_only}/converted"])
        _one_line(code, capsys.readouterr().err, "--out=", "read-only file system")


def test_plot_refuses_an_output_it_cannot_write_before_plotting(tmp_path, capsys):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "metrics.jsonl").write_text(json.dumps({"step": 1, "train/loss": 1.0}) + "\n")
    with _read_only_tmpfs(tmp_path / "ro") as read_only:
        code, err = _tool(capsys, "plot", f"--workdir={workdir}", f"--out={read_only}/curves.png")
        _one_line(code, err, "--out's directory", "read-only file system")


def test_tools_refuse_an_output_directory_they_cannot_write_before_the_work(tmp_path, capsys):
    """evaluate --out / --write_metrics, and the data tools' --out, before anything is read."""
    with _read_only_tmpfs(tmp_path / "ro") as read_only:
        workdir = _workdir(tmp_path, None)
        code, err = _tool(capsys, "evaluate", f"--workdir={workdir}", f"--out={read_only}/results.json")
        _one_line(code, err, "--out's directory", "read-only file system")
        code, err = _tool(capsys, "evaluate", f"--workdir={read_only}", "--write_metrics")
        _one_line(code, err, "--write_metrics", "read-only file system")
        for tool in (pack, resize):
            code = tool.main([f"--data_dir={tmp_path}", f"--out={read_only}/copy"])
            _one_line(code, capsys.readouterr().err, "--out's directory", "read-only file system")


def _child(command, *, privileged=True):
    command = list(command) if privileged else [*NO_OVERRIDE, *command]
    return subprocess.run(command, capture_output=True, text=True, env=child_env(2), timeout=300)


def test_launch_refuses_a_read_only_workdir_in_one_line(tmp_path):
    with _read_only_tmpfs(tmp_path / "ro") as read_only:
        result = _child(launch_command(os.path.join(read_only, "run")))
        _one_line(result.returncode, result.stderr, f"--workdir={read_only}/run", "read-only file system")


def test_launch_refuses_a_workdir_that_is_a_file_in_one_line(tmp_path):
    a_file = tmp_path / "run"
    a_file.write_text("not a directory")
    result = _child(launch_command(a_file))
    _one_line(result.returncode, result.stderr, f"--workdir={a_file}", "is a file, not a directory")
    assert a_file.read_text() == "not a directory"


def test_launch_refuses_init_from_whose_model_json_is_not_json_before_tensorflow_loads(tmp_path):
    weights = _converted(tmp_path, b"{oops")
    command = launch_command(tmp_path / "run", f"--config.init_from={weights}")
    command[1:1] = ["-X", "importtime"]
    result = _child(command)
    line = _one_line(
        result.returncode,
        "\n".join(line for line in result.stderr.splitlines() if "import time:" not in line),
        os.path.join(weights, "model.json"),
        "is not JSON",
    )
    assert "config.init_from" in line or "model.json" in line
    imported = [line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "import time:" in line]
    assert not [name for name in imported if name.split(".")[0] == "tensorflow"]
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_paths_without_permission_are_one_line_for_launch_and_the_tools(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "checkpoints").mkdir()
    os.chmod(locked, 0)
    try:
        result = _child(launch_command(locked / "run"), privileged=False)
        _one_line(result.returncode, result.stderr, f"--workdir={locked}/run", "permission denied")
        result = _child(
            [sys.executable, "-m", "alexnet_jax.commands.predict", f"--workdir={locked}", os.path.abspath(__file__)],
            privileged=False,
        )
        _one_line(result.returncode, result.stderr, f"--workdir={locked}", "permission denied")
    finally:
        os.chmod(locked, 0o755)
