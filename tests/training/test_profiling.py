"""config.profile_steps: a jax.profiler trace of a few steps of a real launched run, in WORKDIR/plugins/profile/,
and a profile that cannot be written leaves the run alone (a real read-only file system, not a mock)."""

import glob
import os

import pytest
from conftest import mounted_tmpfs

from alexnet_jax import config as config_lib
from alexnet_jax.errors import UserError
from alexnet_jax.training import profiling


@pytest.mark.parametrize("spec, window", [("", None), ("10-15", (10, 15)), ("7", (7, 7)), ("1-1", (1, 1))])
def test_step_ranges(spec, window):
    assert config_lib.parse_profile_steps(spec) == window


@pytest.mark.parametrize("spec", ["15-10", "0-3", "0", "a-b", "10-", "-5", " 10-15", "10 - 15", "10:15", "3-4-5"])
def test_a_bad_step_range_is_refused_by_validate_in_one_line(spec):
    config = config_lib.base_config()
    config.profile_steps = spec
    with pytest.raises(UserError, match=r"^config.profile_steps='.*' is not a step range; use 'FIRST-LAST'"):
        config_lib.validate(config, device_count=1)


@pytest.mark.parametrize("spec, enabled", [("", True), ("1-3", False)])
def test_off_or_not_process_zero_it_does_nothing(tmp_path, spec, enabled):
    profiler = profiling.StepProfiler(spec, str(tmp_path), enabled=enabled)
    for step in range(1, 5):
        profiler.before_step(step)
        profiler.after_step(step, None)
    profiler.stop()
    assert not profiler.tracing and os.listdir(tmp_path) == []


@pytest.fixture
def read_only_plugins(tmp_path):
    """WORKDIR/plugins on a read-only tmpfs: root too is refused there (EROFS)."""
    workdir = tmp_path / "read_only"
    with mounted_tmpfs(workdir / "plugins", "ro,size=1m"):
        yield workdir


@pytest.mark.slow
def test_a_run_writes_the_trace_of_its_steps_and_an_unwritable_profile_fails_nothing(
    image_folder, tmp_path, read_only_plugins
):
    from conftest import _finish, _start, _train_records

    settings = ["--config.num_train_steps=3", "--config.profile_steps=2-3"]
    profiled = _start(tmp_path / "profiled", image_folder, *settings)
    refused = _start(read_only_plugins, image_folder, *settings)
    output, refused_output = _finish(profiled), _finish(refused)
    assert profiled.returncode == 0, output[-3000:]
    traces = glob.glob(str(tmp_path / "profiled" / "plugins" / "profile" / "*" / "*.xplane.pb"))
    assert traces and all(os.path.getsize(path) > 1000 for path in traces), os.listdir(tmp_path / "profiled")
    assert "profiling steps 2-3" in output and "profile of steps 2-3 written" in output
    assert [record["step"] for record in _train_records(tmp_path / "profiled")] == [1, 2, 3]

    assert refused.returncode == 0, refused_output[-3000:]
    assert "not profiling steps 2-3: could not start a trace" in refused_output
    assert "Read-only file system" in refused_output
    assert [record["step"] for record in _train_records(read_only_plugins)] == [1, 2, 3]
