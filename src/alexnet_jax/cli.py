"""What every `python -m alexnet_jax.*` tool and launch.py share: logging and one-line user errors.

A UserError becomes one line on stderr and exit status 2; programming errors keep
their traceback. TensorFlow's C++ start-up notices (oneDNN, absl) are silenced
before TensorFlow loads, unless the user set TF_CPP_MIN_LOG_LEVEL themselves.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable

from alexnet_jax.errors import UserError

EXIT_USER_ERROR = 2


def quiet_tensorflow() -> None:
    """Hide TensorFlow's C++ INFO/WARNING start-up lines (it reads this once, when it loads)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")


def setup_logging(*, level: int = logging.WARNING, project_level: int | None = None, stream=None) -> None:
    """The console shows our lines: WARNING and above from libraries, `project_level` from alexnet_jax."""
    fmt = "%(asctime)s %(message)s" if project_level is not None else "%(levelname)s: %(message)s"
    logging.basicConfig(level=level, format=fmt, stream=stream or sys.stderr, force=True)
    logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax's notes on read-only directories
    if project_level is not None:
        logging.getLogger("alexnet_jax").setLevel(project_level)


def command(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """Decorate a tool's main(argv): a UserError is printed as one line and returns 2."""

    @functools.wraps(main)
    def wrapped(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except UserError as error:
            print_error(error)
            return EXIT_USER_ERROR

    return wrapped


def print_error(error: BaseException) -> None:
    print(f"error: {error}", file=sys.stderr)


def run(main: Callable[[], int]) -> None:
    """The `if __name__ == "__main__"` of every tool: quiet TensorFlow, set up logging, exit with main's status."""
    quiet_tensorflow()
    setup_logging()
    sys.exit(main())
