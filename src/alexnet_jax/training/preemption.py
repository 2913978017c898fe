"""Stop cleanly on SIGTERM or SIGINT: finish the step, checkpoint, exit 0.

Orbax's `reached_preemption` only works under jax.distributed, so a single
process needs its own handler. Across processes the flags are combined at a
step every process reaches (a log step), so all of them stop at the same step.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

import jax
import numpy as np

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Records the first SIGTERM/SIGINT; a second one of the same kind acts as usual."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> StopRequest:
        if threading.current_thread() is not threading.main_thread():
            log.warning("not on the main thread: SIGTERM/SIGINT will not stop the run cleanly")
            return self
        for signum in SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # asked twice: give up on the clean stop
            self.restore()
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        log.warning(
            "received %s: stopping after this step with a checkpoint (send it again to stop at once)",
            signal.Signals(signum).name,
        )

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def requested(self, *, at_sync_point: bool) -> bool:
        """Whether to stop now. With several processes, only decided at sync points, by all together."""
        if jax.process_count() == 1:
            return self.signum is not None
        if not at_sync_point:
            return False
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.int32(self.signum is not None))
        return bool(np.any(flags))
