"""What every `python -m alexnet_jax.*` tool and launch.py share: logging and one-line user errors.

A UserError becomes one line on stderr and exit status 2; programming errors keep
their traceback. TensorFlow's C++ start-up notices (oneDNN, absl) are silenced
before TensorFlow loads, unless the user set TF_CPP_MIN_LOG_LEVEL themselves.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
import sys
from collections.abc import Callable

from alexnet_jax.errors import UserError

EXIT_USER_ERROR = 2


_NOTICES_ASKED_FOR: bool | None = None


def native_notices_asked_for() -> bool:
    """Whether the user set TF_CPP_MIN_LOG_LEVEL to 0 or 1; if not, it becomes 2 (or stays 3).

    It covers XLA, started by JAX, as well as TensorFlow: both print the same C++ start-up
    notices below 2. Importing JAX sets the variable to 1 itself, so the user's value is read
    from the environment the process started with (/proc/self/environ), or, where that is not
    available, from os.environ, in which case call this before JAX is imported (launch.py does).
    """
    global _NOTICES_ASKED_FOR
    if _NOTICES_ASKED_FOR is None:
        given = _environment_at_start().get("TF_CPP_MIN_LOG_LEVEL")
        _NOTICES_ASKED_FOR = given in ("0", "1")
        if not _NOTICES_ASKED_FOR:
            os.environ["TF_CPP_MIN_LOG_LEVEL"] = given or "2"
        os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    return _NOTICES_ASKED_FOR


def _environment_at_start() -> dict[str, str]:
    try:
        with open("/proc/self/environ", "rb") as handle:
            entries = handle.read().split(b"\0")
    except OSError:
        return dict(os.environ)
    pairs = (entry.decode(errors="replace").partition("=") for entry in entries if b"=" in entry)
    return {name: value for name, _, value in pairs}


def quiet_tensorflow() -> None:
    """Load TensorFlow with its C++ start-up notices hidden, unless the user asked for them.

    Its oneDNN notice and absl's "All log messages before absl::InitializeLog()" are
    written to file descriptor 2 while the library loads, whatever TF_CPP_MIN_LOG_LEVEL
    says, so the load runs with that descriptor pointed at /dev/null. Setting
    TF_CPP_MIN_LOG_LEVEL=0 or 1 yourself shows them. A TensorFlow that fails to load
    raises after the descriptor is back, so nothing of ours is hidden.
    """
    asked = native_notices_asked_for()
    if importlib.util.find_spec("tensorflow") is None:
        return
    if asked:
        with _keras_not_loaded():
            import tensorflow  # noqa: F401
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull, _keras_not_loaded():
            os.dup2(devnull.fileno(), 2)
            import tensorflow  # noqa: F401
            import tensorflow_datasets  # noqa: F401  (loads TensorFlow's second copy of the notice)
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@contextlib.contextmanager
def _keras_not_loaded():
    """TensorFlow imports Keras (and scikit-learn with it) while it loads, in a try that tolerates
    its absence; nothing here uses Keras, and that import was 1.2 s of every start on 2 cores.
    Keras stays importable: the block lasts only while TensorFlow loads."""
    if "keras" in sys.modules:
        yield
        return
    sys.modules["keras"] = None  # `import keras...` raises ImportError, which TensorFlow expects
    try:
        yield
    finally:
        if sys.modules.get("keras", "") is None:
            del sys.modules["keras"]


def drop_closed_event_loop_noise() -> None:
    """Orbax's writer threads may report "Event loop is closed" while the process exits after a failed
    save; the failure itself was reported in one line already."""
    previous, previous_unraisable = sys.excepthook, sys.unraisablehook

    def closed_loop(value) -> bool:
        return isinstance(value, RuntimeError) and str(value) == "Event loop is closed"

    def hook(kind, value, traceback):
        if not closed_loop(value):
            previous(kind, value, traceback)

    def unraisable(info):
        if not closed_loop(info.exc_value):
            previous_unraisable(info)

    sys.excepthook, sys.unraisablehook = hook, unraisable


def setup_logging(*, level: int = logging.WARNING, project_level: int | None = None, stream=None) -> None:
    """The console shows our lines: WARNING and above from libraries, `project_level` from alexnet_jax."""
    fmt = "%(asctime)s %(message)s" if project_level is not None else "%(levelname)s: %(message)s"
    logging.basicConfig(level=level, format=fmt, stream=stream or sys.stderr, force=True)
    logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax's notes on read-only directories
    if project_level is not None:
        logging.getLogger("alexnet_jax").setLevel(project_level)


def warnings_only_unless_primary(process_index: int) -> None:
    """Processes other than 0 log warnings and errors only.

    srun and mpirun merge every process's output into one job log; there each step, evaluation and
    save is then said once (by process 0), while any process's warnings and errors still show.
    absl's logger (Orbax) stays at ERROR as setup_logging left it.
    """
    if process_index != 0:
        logging.getLogger().setLevel(logging.WARNING)
        logging.getLogger("alexnet_jax").setLevel(logging.WARNING)


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
