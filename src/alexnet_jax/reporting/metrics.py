"""The metric writers (metrics.jsonl, TensorBoard, console line); what they write is step/metrics.py's.

Only process 0 writes; the other processes get a writer that does nothing.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

log = logging.getLogger(__name__)


class MetricWriter:
    """Appends one JSON object per call to WORKDIR/metrics.jsonl and mirrors it to TensorBoard."""

    def __init__(self, workdir: str, *, enabled: bool = True):
        self.enabled = enabled
        self._path = os.path.join(workdir, "metrics.jsonl")
        self._summary = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            try:
                import tensorflow as tf

                self._summary = tf.summary.create_file_writer(workdir)
            except ImportError:  # TensorBoard events are optional; metrics.jsonl is not.
                log.warning("TensorFlow is not installed: no TensorBoard event files")

    @property
    def summary_writer(self) -> Any:
        """The TensorBoard writer (None on other processes or without TensorFlow), for images."""
        return self._summary

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step)}
        record.update({key: _plain(value) for key, value in metrics.items()})
        with open(self._path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        if self._summary is not None:
            import tensorflow as tf

            with self._summary.as_default(step=int(step)):
                for key, value in record.items():
                    if key != "step" and isinstance(value, (int, float)):
                        tf.summary.scalar(key, value)
            self._summary.flush()

    def close(self) -> None:
        if self._summary is not None:
            self._summary.close()


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    return value


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


class Progress:
    """The console line: step, loss, images/s, the time left at the current pace, and input waits."""

    def __init__(self, total_steps: int, global_batch: int, *, data_wait_shown: float = 0.1):
        self.total_steps = total_steps
        self.global_batch = global_batch
        self.data_wait_shown = data_wait_shown

    def line(self, step: int, summary: dict[str, float]) -> str:
        img_per_s = summary["train/img_per_s"]
        steps_per_s = img_per_s / self.global_batch
        remaining = (self.total_steps - step) / steps_per_s if steps_per_s > 0 else math.inf
        line = (
            f"step {step}/{self.total_steps}  loss {summary['train/loss']:.4f}  {img_per_s:,.0f} img/s  "
            f"ETA {_duration(remaining)}"
        )
        wait = summary.get("train/data_wait_frac", 0.0)
        if wait > self.data_wait_shown:
            line += f"  waiting for input {100 * wait:.0f}%"
        return line


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def roll_back(workdir: str, step: int) -> int:
    """Move records past `step` (work after the checkpoint a run resumes from) aside.

    A run killed after its last checkpoint logged steps it will now redo; keeping
    them would give two values for one step. They go to metrics.rolled_back.jsonl,
    not away. The rewrite is atomic (write a copy, then rename). Returns how many moved.
    """
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as handle:
        lines = [line for line in handle if line.strip()]
    keep, moved = [], []
    for line in lines:
        try:
            record_step = json.loads(line)["step"]
        except (ValueError, KeyError):  # a line cut short by a kill
            moved.append(line if line.endswith("\n") else line + "\n")
            continue
        (keep if record_step <= step else moved).append(line)
    if not moved:
        return 0
    with open(os.path.join(workdir, "metrics.rolled_back.jsonl"), "a") as handle:
        handle.writelines(moved)
    temporary = path + ".tmp"
    with open(temporary, "w") as handle:
        handle.writelines(keep)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    return len(moved)
