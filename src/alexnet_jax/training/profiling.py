"""A jax.profiler trace of a few training steps, asked for in the config: config.profile_steps = "10-15".

The trace lands in WORKDIR/plugins/profile/<run>/, where TensorBoard's profile plugin
finds it (`tensorboard --logdir=WORKDIR`, Profile tab; or xprof). Only process 0
traces. Off ("") it costs one comparison a step. A profile is a diagnosis, never a
reason to lose a run: a failure to start or to write it is logged as a warning
and training goes on.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax

from alexnet_jax.config import parse_profile_steps

log = logging.getLogger(__name__)

PROFILE_DIR = os.path.join("plugins", "profile")  # under the workdir: TensorBoard's profile plugin layout


class StepProfiler:
    """Starts jax.profiler's trace before the window's first step and stops it once its last step has run.

    A run resumed inside the window traces the rest of it. Disabled (not process 0, or
    profile_steps ""), every call returns at its first comparison.
    """

    def __init__(self, spec: str, workdir: str, *, enabled: bool):
        self.window = parse_profile_steps(spec) if enabled else None
        self.workdir = workdir
        self.directory = os.path.join(workdir, PROFILE_DIR)
        self.tracing = False
        self._first = self._last = 0  # the steps the trace started at and has seen last

    def before_step(self, step: int) -> None:
        if self.window is not None and not self.tracing and self.window[0] <= step <= self.window[1]:
            self._start(step)

    def after_step(self, step: int, state: Any) -> None:
        if self.tracing:
            self._last = step
            if step >= self.window[1]:
                jax.block_until_ready(state)  # the trace holds the last step's device work, not only its dispatch
                self.stop()

    def stop(self) -> None:
        """Write the trace (also when the run ends or stops inside the window); warns, never raises."""
        if not self.tracing:
            return
        self.tracing, self.window = False, None  # one trace a run
        try:
            jax.profiler.stop_trace()
        except Exception as error:  # a profile must never fail the run
            log.warning(
                "could not write the profile of steps %d-%d to %s: %s", self._first, self._last, self.directory, error
            )
            return
        log.info(
            "profile of steps %d-%d written to %s (tensorboard --logdir=%s, Profile tab)",
            *(self._first, self._last, self.directory, self.workdir),
        )

    def _start(self, step: int) -> None:
        first, last = self.window
        try:
            # jax.profiler writes only at stop_trace: a directory it cannot write fails here, before the steps.
            os.makedirs(self.directory, exist_ok=True)
            probe = os.path.join(self.directory, f".write-probe-{os.getpid()}")
            with open(probe, "w"):
                pass
            os.remove(probe)
            jax.profiler.start_trace(self.workdir)  # -> WORKDIR/plugins/profile/<run>/
        except Exception as error:  # a profile must never fail the run
            log.warning(
                "not profiling steps %d-%d: could not start a trace in %s: %s", first, last, self.directory, error
            )
            self.window = None  # not tried again
            return
        self.tracing, self._first, self._last = True, step, step
        log.info("profiling steps %d-%d into %s", step, last, self.directory)
