"""A lost or hung process ends a multi-process job in bounded time, with one line.

Without this, the other processes wait inside a collective: for a dead peer until JAX's
heartbeat gives up (100 s by default), which then aborts them with a C++ fatal message and a
stack dump; for a peer that hangs while alive, until XLA's collective timeout (30 minutes on
the CPU), since the heartbeat never sees it (jax-ml/jax#38503).

Every process runs two daemon threads, which keep running while the main thread is blocked
in a collective:
- the pulse: every few seconds it raises this process's counter in the key-value store of
  jax.distributed's coordination service, and reads everyone's. A peer whose counter has not
  moved for `peer_timeout_s` died, was stopped, or lost its host. A store that does not
  answer for that long means process 0 (which holds it) is gone.
- progress: the training loop beats at every step; no beat for `step_timeout_s` means a
  process hangs alive or a collective is stuck.
When either fires, the process writes one line (what happened, what to do, the step a
restart resumes from), posts it to the store so that every live process stops with the
same news, and exits with EXIT_LOST through os._exit: no exception could reach a main
thread that is blocked inside a collective. The heartbeat timeout is kept above the peer
timeout (config.validate), so this line, not JAX's dump, is the last thing printed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

EXIT_LOST = 75  # EX_TEMPFAIL: a temporary failure; run the same command again
PREFIX = "alexnet_jax/watchdog"


@dataclasses.dataclass
class PeerClock:
    """When each peer's pulse counter last moved, on this process's own clock (hosts' clocks differ)."""

    started: float
    counters: dict[int, str] = dataclasses.field(default_factory=dict)
    moved: dict[int, float] = dataclasses.field(default_factory=dict)

    def observe(self, counters: dict[int, str], now: float) -> None:
        for process, counter in counters.items():
            if self.counters.get(process) != counter:
                self.counters[process] = counter
                self.moved[process] = now

    def quiet(self, peer: int, now: float) -> float:
        """Seconds since the peer's counter last moved (since the start if never heard)."""
        return now - self.moved.get(peer, self.started)

    def silent(self, peers: list[int], now: float, timeout: float) -> tuple[int, float] | None:
        """(peer, seconds) of a peer silent for longer than `timeout`."""
        for peer in peers:
            if self.quiet(peer, now) > timeout:
                return peer, self.quiet(peer, now)
        return None


def restart_hint(resume_step: int | None) -> str:
    if resume_step is None:
        return "restart the job (the same command); no checkpoint is complete yet, so it starts from step 0"
    return f"restart the job (the same command); it resumes from step {resume_step}, the newest complete checkpoint"


class Watchdog:
    """The pulse and progress threads of one process (see the module's docstring).

    client: jax.distributed's key-value client (None: no pulse, progress only).
    resume_step: the step a restart would resume from (read from the checkpoint directory).
    """

    def __init__(
        self,
        *,
        client: Any,
        process_index: int,
        process_count: int,
        peer_timeout_s: float,
        step_timeout_s: float,
        resume_step: Callable[[], int | None],
        clock: Callable[[], float] = time.monotonic,
        end: Callable[[int], None] = os._exit,
    ):
        self.client, self.index, self.count = client, process_index, process_count
        self.peer_timeout_s, self.step_timeout_s = peer_timeout_s, step_timeout_s
        self.resume_step, self.clock, self.end = resume_step, clock, end
        self.interval = min(5.0, max(0.25, peer_timeout_s / 8))
        self._stop = threading.Event()
        self._fired = threading.Lock()
        self._lock = threading.Lock()
        now = clock()
        self._peers = PeerClock(started=now)
        self._contact = now  # the last time the store answered
        self._progress: float | None = None  # the last beat; None: not armed
        self._step = 0
        self._done: set[int] = set()  # finished, or left after an error
        self._news: str | None = None  # 'k: reason' of the process that stopped the job
        self._threads: list[threading.Thread] = []

    # --- the main thread's side ---------------------------------------------------------

    def start(self) -> Watchdog:
        """Start the threads; a single process has no peers to lose, and starts none."""
        if self.count == 1:
            return self
        targets = [self._watch] + ([self._pulse] if self.client is not None else [])
        for target in targets:
            thread = threading.Thread(target=target, name=f"alexnet_jax-{target.__name__[1:]}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def beat(self, step: int) -> None:
        """The loop made progress (a step was dispatched): the step clock starts again."""
        with self._lock:
            self._step, self._progress = step, self.clock()

    def idle(self) -> None:
        """The loop is over: what follows (the last checkpoint's write, figures) is no step."""
        with self._lock:
            self._progress = None

    @contextlib.contextmanager
    def paused(self):
        """No step clock inside (evaluation, a checkpoint write: their length is not a step's); peers still watched."""
        with self._lock:
            armed, self._progress = self._progress is not None, None
        try:
            yield
        finally:
            if armed:
                self.beat(self._step)

    def stop(self) -> None:
        """This process finished: peers stop expecting its pulse, and the threads end."""
        self._stop.set()
        if self.client is not None:
            with contextlib.suppress(Exception):
                self.client.key_value_set(f"{PREFIX}/done/{self.index}", "1", allow_overwrite=True)
        for thread in self._threads:
            thread.join(timeout=2 * self.interval)

    def abandon(self, error: BaseException) -> None:
        """This process failed (an error it raised): tell the others, say why here, and leave now.

        A normal exit would wait in JAX's shutdown barrier for peers that are blocked in a collective,
        then abort with a C++ dump; so with peers the process prints its error (one line for a
        UserError, the traceback for a programming error) and exits with os._exit. One process: nothing.
        """
        if self.count == 1:
            return
        if _from_a_collective(error):  # most likely a peer was lost: let the watchdog name it, if it can
            deadline = self.clock() + self.peer_timeout_s + 2 * self.interval
            while self.clock() < deadline and not self._stop.is_set():
                time.sleep(self.interval / 2)  # _watch fires (and exits) meanwhile if a peer fell silent
        if not self._fired.acquire(blocking=False):
            return
        from alexnet_jax.errors import UserError

        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        self._post(first_line)
        if isinstance(error, UserError):
            print(f"error: {error}", file=sys.stderr, flush=True)
        else:
            traceback.print_exception(error)
            sys.stderr.flush()
        self._leave(2 if isinstance(error, UserError) else 1)

    # --- the threads ---------------------------------------------------------------------

    def _pulse(self) -> None:
        counter = 0
        while not self._stop.is_set():
            counter += 1
            try:
                self.client.key_value_set(f"{PREFIX}/pulse/{self.index}", str(counter), allow_overwrite=True)
                entries = self.client.key_value_dir_get(f"{PREFIX}/")
            except Exception:  # the store is unreachable: _watch judges by how long it lasts
                self._stop.wait(self.interval)
                continue
            self._read(entries)
            self._stop.wait(self.interval)

    def _read(self, entries: list[tuple[str, str]]) -> None:
        now = self.clock()
        counters = {}
        with self._lock:
            for key, value in entries:
                kind, _, who = key.removeprefix(f"{PREFIX}/").partition("/")
                if kind == "pulse":
                    counters[int(who)] = value
                elif kind in ("done", "gone"):
                    self._done.add(int(who))
                elif kind == "news" and not value.startswith(f"{self.index}:"):
                    self._news = value
            self._contact = now
            self._peers.observe(counters, now)

    def _watch(self) -> None:
        while not self._stop.wait(self.interval / 2):
            reason = self._verdict(self.clock())
            if reason:
                self._fire(reason)

    def _verdict(self, now: float) -> str | None:
        with self._lock:
            contact, progress, step, news = self._contact, self._progress, self._step, self._news
            silent = self._peers.silent(self._peers_left(), now, self.peer_timeout_s) if self.client else None
        if news is not None:
            sender, _, what = news.partition(":")
            return f"process {sender} stopped the job ({what.strip()})"
        if self.client is not None and now - contact > self.peer_timeout_s:
            return f"the coordination service (process 0) has not answered for {now - contact:.0f} s"
        if silent is not None:
            peer, quiet = silent
            return f"process {peer} of {self.count} has not answered for {quiet:.0f} s (killed, stopped or host lost)"
        if progress is not None and now - progress > self.step_timeout_s:
            return (
                f"no training progress for {now - progress:.0f} s after step {step} "
                "(a process hangs or a collective is stuck)"
            )
        return None

    def _peers_left(self) -> list[int]:
        return [p for p in range(self.count) if p != self.index and p not in self._done]

    def _fire(self, reason: str) -> None:
        if not self._fired.acquire(blocking=False):
            return
        try:
            resume = self.resume_step()
        except Exception:  # the line matters more than the step
            resume = None
        if self.client is not None:
            self._post(reason)
        print(f"error: {reason}; process {self.index} exits. To go on, {restart_hint(resume)}", file=sys.stderr)
        sys.stderr.flush()
        self._leave(EXIT_LOST)

    def _post(self, reason: str) -> None:
        """The news for every live process, and this one's leaving; in a thread, as a stopped store blocks calls."""

        def post() -> None:
            with contextlib.suppress(Exception):  # a store that is gone: the others find out by themselves
                if self._news is None:  # not news to pass on: ours
                    self.client.key_value_set(f"{PREFIX}/news", f"{self.index}: {reason}", allow_overwrite=True)
                self.client.key_value_set(f"{PREFIX}/gone/{self.index}", "1", allow_overwrite=True)

        poster = threading.Thread(target=post, daemon=True)
        poster.start()
        poster.join(timeout=2.0)

    def _leave(self, status: int) -> None:
        """Exit; process 0 holds the store, so it first waits (bounded) for the others to read the news and go."""
        if self.index == 0 and self.client is not None:
            deadline = self.clock() + self.peer_timeout_s + 2 * self.interval
            while self.clock() < deadline and self._still_here():
                time.sleep(self.interval / 2)
        self.end(status)

    def _still_here(self) -> list[int]:
        """Peers that have neither finished, nor left, nor gone silent."""
        now = self.clock()
        with self._lock:
            return [p for p in self._peers_left() if self._peers.quiet(p, now) < self.peer_timeout_s]


def _from_a_collective(error: BaseException) -> bool:
    """An error of JAX's runtime (a collective whose peer went away raises one) rather than of our code."""
    import jax

    return isinstance(error, jax.errors.JaxRuntimeError)


def newest_checkpoint(directory: str) -> int | None:
    """The newest finished checkpoint under `directory`: Orbax renames a step's directory to its number when done."""
    try:
        steps = [int(name) for name in os.listdir(directory) if name.isdigit()]
    except OSError:
        return None
    return max(steps, default=None)
