"""Training curves from metrics.jsonl: loss, top-1 and top-5 error against step.

One colour per workdir; training solid, evaluation dashed with markers. The
paper plots error rates, so accuracies are drawn as 100% - accuracy."""

from __future__ import annotations

import json
import logging
import os

from alexnet_jax.errors import UserError

log = logging.getLogger(__name__)

CURVES_FILE = "curves.png"
PANELS = (
    ("loss", "loss", False),
    ("top1_acc", "top-1 error (%)", True),
    ("top5_acc", "top-5 error (%)", True),
)


def read_series(workdir: str) -> dict[str, tuple[list[int], list[float]]]:
    """{"train/loss": (steps, values), ...} from WORKDIR/metrics.jsonl.

    A line cut short by a kill is skipped; a step logged twice (work redone after
    a resume) keeps its last value, and steps come out sorted.
    """
    path = os.path.join(workdir, "metrics.jsonl")
    by_key: dict[str, dict[int, float]] = {}
    with open(path) as handle:
        for line in handle:
            try:
                record = json.loads(line)
                step = int(record["step"])
            except (ValueError, KeyError, TypeError):
                continue
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float):
                    by_key.setdefault(key, {})[step] = float(value)
    return {key: (sorted(values), [values[s] for s in sorted(values)]) for key, values in by_key.items()}


def plot_curves(workdirs: list[str] | str, out_path: str) -> str:
    """Draw the curves of one or several runs into one PNG (three panels). Returns out_path.

    Workdirs without metrics.jsonl are skipped with a warning; none at all is an error.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if isinstance(workdirs, str):
        workdirs = [workdirs]
    runs = []
    for workdir in workdirs:
        if os.path.exists(os.path.join(workdir, "metrics.jsonl")):
            runs.append((workdir, read_series(workdir)))
        else:
            log.warning("%s has no metrics.jsonl; left out of the plot", workdir)
    if not runs:
        raise UserError(f"no metrics.jsonl in {', '.join(workdirs)}: train first, or pass the right --workdir")

    # Figure + the Agg canvas directly: no pyplot, no global backend state.
    figure = Figure(figsize=(15, 4.2), dpi=80, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(PANELS))
    labels = _labels([workdir for workdir, _ in runs])
    for colour_index, ((_, series), label) in enumerate(zip(runs, labels)):
        colour = f"C{colour_index}"
        for ax, (metric, title, is_error) in zip(axes, PANELS):
            for split, style in (("train", {"linestyle": "-"}), ("eval", {"linestyle": "--", "marker": "o"})):
                key = f"{split}/{metric}"
                if key not in series:
                    continue
                steps, values = series[key]
                if is_error:
                    values = [100.0 * (1.0 - value) for value in values]
                ax.plot(steps, values, color=colour, label=f"{label} {split}", markersize=3, **style)
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.grid(True, alpha=0.3)
    for ax, (_, _, is_error) in zip(axes, PANELS):
        if is_error:
            ax.set_ylim(bottom=0)
    axes[0].legend(fontsize="small")
    directory = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(directory, exist_ok=True)
    temporary = os.path.join(directory, f".{os.path.basename(out_path)}.tmp.png")
    figure.savefig(temporary)
    os.replace(temporary, out_path)
    return out_path


def _labels(workdirs: list[str]) -> list[str]:
    """Short names: the workdirs' last path parts, or more of them where those collide."""
    parts = [os.path.abspath(w).rstrip(os.sep).split(os.sep) for w in workdirs]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = [os.sep.join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [os.path.abspath(w) for w in workdirs]
