"""The start-up that every entry point shares: the user's TF_CPP_MIN_LOG_LEVEL, TensorFlow loaded
without Keras, and a bad config refused before TensorFlow loads."""

import os
import subprocess
import sys

import pytest
from conftest import child_env, launch_command

PROBE = """
import os, sys
import jax  # sets TF_CPP_MIN_LOG_LEVEL=1 itself when the variable is unset
from alexnet_jax import cli
asked = cli.native_notices_asked_for()
print(asked, os.environ["TF_CPP_MIN_LOG_LEVEL"])
cli.quiet_tensorflow()
import tensorflow as tf
print("keras" in sys.modules, int(tf.reduce_sum(tf.range(4))))
import keras  # still importable: the block lasted only while TensorFlow loaded
print(type(keras.__version__).__name__)
"""


@pytest.mark.parametrize(("given", "asked", "level"), [(None, False, "2"), ("0", True, "0"), ("3", False, "3")])
def test_the_users_log_level_is_read_from_the_starting_environment(given, asked, level):
    env = child_env()
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    if given is not None:
        env["TF_CPP_MIN_LOG_LEVEL"] = given
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == [str(asked), level, "False", "6", "str"], result.stdout
    if not asked:  # hidden: TensorFlow's notices and XLA's alike
        assert "oneDNN" not in result.stderr and "InitializeLog" not in result.stderr, result.stderr


def test_a_bad_config_is_refused_before_tensorflow_loads(tmp_path):
    command = launch_command(tmp_path / "run", "--config.learning_rate=-1")
    command[1:1] = ["-X", "importtime"]  # every module the child imports, listed on stderr
    result = subprocess.run(command, capture_output=True, text=True, env=child_env(2), timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "learning_rate=-1" in errors[0], result.stderr[-3000:]
    imported = [line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "import time:" in line]
    assert "jax" in imported  # the probe works
    assert not [name for name in imported if name.split(".")[0] in ("tensorflow", "tensorflow_datasets")]
    assert not os.path.exists(tmp_path / "run" / "checkpoints")
