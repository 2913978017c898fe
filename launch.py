"""Train AlexNet: python launch.py --config=configs/default.py --workdir=DIR [--config.KEY=VALUE ...]

Kept short on purpose: the logic lives in the alexnet_jax package, where it is tested.
"""

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from alexnet_jax import cli
from alexnet_jax.errors import UserError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics.jsonl and TensorBoard events.")
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0, for a multi-process run started by hand.")
flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run started by hand.")
flags.DEFINE_integer("process_id", None, "This process's index (0 .. num_processes - 1).")
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, but a bad --config override is one line, not a traceback."""
    try:
        return FLAGS(argv)
    except (flags.Error, KeyError, AttributeError, TypeError, ValueError) as error:
        text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
        text = text.replace("\\n", "\n").replace("\\'", "'")
        lines = (line.strip().strip("'\"") for line in text.splitlines())
        message = " ".join(line for line in lines if line) or type(error).__name__
        print(f"error: {message} (see {argv[0]} --helpfull)", file=sys.stderr)
        sys.exit(cli.EXIT_USER_ERROR)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cli.setup_logging(project_level=logging.INFO, stream=sys.stdout)
    import jax

    from alexnet_jax.parallel import accelerators, distributed
    from alexnet_jax.training import loop

    try:
        accelerators.select_platform(FLAGS.config.platform)  # before JAX starts a backend
        # Before any computation: TPU pods, SLURM and Open MPI are detected; by hand, the flags say.
        distributed.initialize_distributed(
            FLAGS.coordinator_address,
            FLAGS.num_processes,
            FLAGS.process_id,
            heartbeat_timeout_s=FLAGS.config.heartbeat_timeout_s,
        )
        cli.warnings_only_unless_primary(jax.process_index())  # a job log shows each step once
        accelerators.check_devices(FLAGS.config.platform)  # no training on the CPU by accident, before any data
        loop.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except UserError as error:
        cli.print_error(error)
        sys.exit(cli.EXIT_USER_ERROR)


if __name__ == "__main__":
    # TensorFlow loads later (loop.train_and_evaluate, without its C++ start-up notices), once the
    # flags, the config and the workdir's lock have passed: a mistake there is reported in seconds.
    cli.native_notices_asked_for()  # before the config file imports JAX
    cli.drop_closed_event_loop_noise()
    app.run(main, flags_parser=parse_flags)
