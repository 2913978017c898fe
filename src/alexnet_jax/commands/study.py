"""Study the paper's ideas: train every setting of some config keys with several seeds, and compare them.

    python -m alexnet_jax.commands.study --config=configs/demo.py --workdir=DIR --vary=activation=relu,tanh --seeds=3 \\
        [--vary=KEY=V1,V2 ...] [--config.KEY=VALUE ...] [--target_train_error=0.25] [--train_set_eval]

Every setting (one value per --vary key; several keys make a grid) trains once per
seed, each a normal run (loop.train_and_evaluate, in this process) in
DIR/<setting>/seed<k>, e.g. DIR/activation=tanh/seed1. A finished run leaves
study_run.json there and is never trained again; a killed study, run again with the
same command, skips the finished runs and resumes the one it was in from its last
checkpoint. Then it writes:

    DIR/study.json   per setting: the per-seed curves (training error, held-out error,
                     loss against step), their mean and spread over seeds, the steps to
                     reach --target_train_error and their ratio to the first setting,
                     the final held-out top-1/top-5 error with its spread
    DIR/study.png    the paper's Figure 1 kind of picture: training error against step,
                     one line per setting (the mean), the band over seeds (min to max)
    DIR/study.md     a Markdown table of the same

Training error is the loop's own: 1 - the mean top-1 accuracy of the training batches
(augmented, dropout on) over each log interval (config.log_every_steps), as the paper's
Figure 1 plots it. --train_set_eval also scores the finished model on the whole training
split as evaluation does (centre crop, no dropout), the fair measure of overfitting.
Statistics: the spread is the sample standard deviation over seeds; a difference to the
first setting is shown with +- 2 standard errors (sqrt(s1^2/n1 + s2^2/n2)): a gap inside
that band is within noise.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import json
import logging
import math
import os
import sys
import time
from typing import Any

from alexnet_jax import cli
from alexnet_jax.errors import UserError

log = logging.getLogger("alexnet_jax.commands.study")  # also when run as __main__

STUDY_FORMAT = 1
RUN_DONE_FILE = "study_run.json"
JSON_FILE, PNG_FILE, TABLE_FILE = "study.json", "study.png", "study.md"
# Keys a study cannot vary: the seed is --seeds' job; the others say where the runs go.
NOT_VARIED = frozenset({"seed", "init_from"})
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


BASELINE = "baseline"


@dataclasses.dataclass(frozen=True)
class Setting:
    """One setting: {key: value} for every varied key, and its directory name (KEY=VALUE,...;
    one-at-a-time studies name the setting by the one key it changes, or "baseline")."""

    values: dict[str, Any]
    label: str = ""

    @property
    def name(self) -> str:
        text = self.label or ",".join(f"{key}={value}" for key, value in self.values.items())
        return text.replace(os.sep, "_")


def parse_vary(specs: list[str], config: Any) -> list[tuple[str, list[Any]]]:
    """--vary=KEY=V1,V2,... (repeatable) -> [(key, [values typed as config[key]])], checked against the config."""
    if not specs:
        raise UserError("--vary=KEY=V1,V2 is required: name a config key and the values to compare")
    varied: list[tuple[str, list[Any]]] = []
    for spec in specs:
        key, sep, listed = spec.partition("=")
        key = key.strip().removeprefix("config.")
        if not sep or not key or not listed.strip():
            raise UserError(f"--vary={spec!r}: write KEY=V1,V2 (e.g. --vary=activation=relu,tanh)")
        if key not in config:
            close = difflib.get_close_matches(key, list(config.keys()), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UserError(f"--vary={spec!r}: the config has no key {key!r}{hint}")
        if key in NOT_VARIED:
            raise UserError(f"--vary={spec!r}: {key} cannot be varied" + ("; use --seeds=N" if key == "seed" else ""))
        if any(key == other for other, _ in varied):
            raise UserError(f"--vary names {key!r} twice; give all its values in one --vary={key}=V1,V2")
        values = [_typed(key, text.strip(), config[key]) for text in listed.split(",")]
        if len(set(map(repr, values))) != len(values):
            raise UserError(f"--vary={spec!r} lists a value twice")
        varied.append((key, values))
    return varied


def _typed(key: str, text: str, current: Any) -> Any:
    """A --vary value as the type the config key holds (bool before int: a bool is an int)."""
    try:
        if isinstance(current, bool):
            if text.lower() in _TRUE + _FALSE:
                return text.lower() in _TRUE
            raise ValueError
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
        if isinstance(current, str):
            return text
    except ValueError:
        kind = "true/false" if isinstance(current, bool) else "integer" if isinstance(current, int) else "number"
        raise UserError(f"--vary: config.{key} takes {kind} values (it is {current!r}); {text!r} is not one") from None
    raise UserError(f"--vary: config.{key} holds a {type(current).__name__}; a study varies numbers, strings or bools")


def grid(varied: list[tuple[str, list[Any]]], *, one_at_a_time: bool = False) -> list[Setting]:
    """The settings to train, the first being the baseline every other is compared with.

    A grid: every combination of the varied values, in the order given. One at a time:
    the baseline (every key at its first value), then each other value of each key with
    the rest at the baseline, as the paper's ablations change one thing at a time.
    """
    keys = [key for key, _ in varied]
    if not one_at_a_time:
        return [Setting(dict(zip(keys, combo))) for combo in itertools.product(*(values for _, values in varied))]
    base = {key: values[0] for key, values in varied}
    settings = [Setting(dict(base), BASELINE)]
    for key, values in varied:
        settings += [Setting({**base, key: value}, f"{key}={value}") for value in values[1:]]
    return settings


def run_config(base: Any, setting: Setting, seed: int) -> Any:
    """The config of one run: the base config with the setting's values and the seed."""
    config = base.copy_and_resolve_references()
    with config.unlocked():
        for key, value in setting.values.items():
            config[key] = value
        config.seed = seed
    config.lock()
    return config


@dataclasses.dataclass(frozen=True)
class Run:
    setting: Setting
    seed: int
    workdir: str
    config: Any

    @property
    def done_file(self) -> str:
        return os.path.join(self.workdir, RUN_DONE_FILE)

    @property
    def done(self) -> bool:
        return os.path.exists(self.done_file)


def plan_runs(base: Any, settings: list[Setting], seeds: list[int], workdir: str) -> list[Run]:
    """Every setting x seed, each checked (config.validate, and against what its directory already holds)
    before anything trains: a bad value is one line, not a crash after an hour of other runs."""
    import jax

    from alexnet_jax import config as config_lib

    if jax.process_count() > 1:
        raise UserError("a study runs in one process; start it without jax.distributed")
    runs = []
    for setting in settings:
        for seed in seeds:
            config = run_config(base, setting, seed)
            try:
                config_lib.validate(config, device_count=jax.device_count(), process_count=1)
            except UserError as error:
                raise UserError(f"setting {setting.name}: {error}") from None
            run = Run(setting, seed, os.path.join(workdir, setting.name, f"seed{seed}"), config)
            _check_same_settings(run)
            runs.append(run)
    return runs


def _check_same_settings(run: Run) -> None:
    """A run directory made with other settings (an edited command) is refused, never mixed in or overwritten."""
    from alexnet_jax.checkpointing import runinfo
    from alexnet_jax.training import loop

    info = runinfo.read_run_info(run.workdir) if os.path.isdir(run.workdir) else None
    if info is None:
        return
    old, new = info.get("config") or {}, json.loads(run.config.to_json_best_effort())
    changed = [
        f"{key} {old.get(key)!r} -> {new.get(key)!r}"
        for key in sorted(set(old) | set(new))
        if key not in loop.RESUME_NEUTRAL_KEYS and old.get(key) != new.get(key)
    ]
    if changed:
        raise UserError(
            f"{run.workdir} was trained with other settings ({', '.join(changed)}); use another --workdir, "
            "or the command that made it"
        )


def train_run(run: Run, *, train_set_eval: bool) -> dict[str, Any]:
    """Train (or resume) one run to its last step; returns what study_run.json records.

    A run stopped early on request (SIGTERM/SIGINT: the loop saves a checkpoint and returns)
    raises StudyStopped, and is resumed by the next study. A run whose training diverged is a
    result, not a failure of the study: recorded as diverged (study_run.json), left out of
    the statistics and counted in the table.
    """
    from alexnet_jax.data import registry
    from alexnet_jax.parallel import distributed
    from alexnet_jax.training import loop

    start = time.perf_counter()
    try:
        state = loop.train_and_evaluate(run.config, run.workdir)
    except loop.DivergenceError as error:
        record = {"setting": run.setting.values, "seed": run.seed, "diverged": str(error)}
        record["wall_s"] = round(time.perf_counter() - start, 1)
        _write_json(run.done_file, record)
        return record
    step = int(distributed.host_copy(state.step))
    del state
    total = loop.plan_run(run.config, registry.open_source_from_config(run.config)).total_steps
    if step != total:
        raise StudyStopped(f"{run.workdir} stopped at step {step} of {total}")
    record: dict[str, Any] = {"setting": run.setting.values, "seed": run.seed, "steps": step}
    if train_set_eval:
        record["train_set"] = _score_train_split(run)
    record["wall_s"] = round(time.perf_counter() - start, 1)
    _write_json(run.done_file, record)
    return record


class StudyStopped(Exception):
    """A run stopped before its last step (on request): the study stops too; run it again to go on."""


def _score_train_split(run: Run) -> dict[str, float]:
    """The finished model on its whole training split, as evaluation scores it (centre crop, no dropout),
    rebuilt from its workdir as evaluate and predict rebuild it (trained.load)."""
    import jax

    from alexnet_jax.checkpointing import trained
    from alexnet_jax.data import pipeline, registry
    from alexnet_jax.evaluation import core as evaluation
    from alexnet_jax.parallel import distributed

    model = trained.load(run.workdir)
    split = registry.open_source_from_config(run.config).train
    aug = pipeline.Augmentation(eval_crops=1, **model.sizes)
    devices = jax.local_device_count()
    # The run's own evaluation batch: the same compiled program (a compilation cache hit).
    batch = run.config.eval_batch_size if run.config.eval_batch_size > 0 else run.config.batch_size
    batches = registry.eval_batches(split, aug, per_process_batch=batch)
    device_batches = distributed.prefetch_to_device(pipeline.device_batches(batches, devices))
    results, _ = evaluation.evaluate_runs([model], device_batches)
    return results


# ---------------------------------------------------------------- reading the runs and summarising them

CURVES = {  # study curve -> (metrics.jsonl key, as an error 1 - accuracy)
    "train_error": ("train/top1_acc", True),
    "train_loss": ("train/loss", False),
    "eval_error": ("eval/top1_acc", True),
    "eval_top5_error": ("eval/top5_acc", True),
    "eval_loss": ("eval/loss", False),
}


def run_curves(workdir: str) -> dict[str, dict[str, list]]:
    """{curve: {"steps": [...], "values": [...]}} of one run, from its metrics.jsonl."""
    from alexnet_jax.reporting import curves

    series = curves.read_series(workdir)
    curves = {}
    for name, (key, is_error) in CURVES.items():
        steps, values = series.get(key, ([], []))
        curves[name] = {"steps": list(steps), "values": [1.0 - v if is_error else v for v in values]}
    return curves


def steps_to_reach(curve: dict[str, list], target: float) -> int | None:
    """The first logged step at which the curve is at or below target (None: never)."""
    for step, value in zip(curve["steps"], curve["values"]):
        if value <= target:
            return int(step)
    return None


def spread(values: list[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (0 for one value), min and max, and the values themselves."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "n": n, "per_seed": list(values)}


def mean_curve(curves: list[dict[str, list]]) -> dict[str, list]:
    """Mean, std, min and max over seeds at the steps every seed logged."""
    common = sorted(set.intersection(*(set(c["steps"]) for c in curves))) if curves else []
    at = [dict(zip(c["steps"], c["values"])) for c in curves]
    stats = [spread([values[step] for values in at]) for step in common]
    return {"steps": common, **{k: [s[k] for s in stats] for k in ("mean", "std", "min", "max")}}


def summarize_setting(setting: Setting, finished: list[dict[str, Any]], target: float) -> dict[str, Any]:
    """One setting's entry of study.json from its finished runs ({"seed", "curves", "record"} each);
    diverged runs are listed apart and left out of every statistic."""
    runs = [r for r in finished if "diverged" not in r["record"]]
    by_curve = {name: mean_curve([r["curves"][name] for r in runs]) for name in CURVES}
    reached = [steps_to_reach(r["curves"]["train_error"], target) for r in runs]
    hit = [s for s in reached if s is not None]
    final = {}
    for name in ("eval_error", "eval_top5_error", "train_error"):
        last = [r["curves"][name]["values"][-1] for r in runs if r["curves"][name]["values"]]
        if last and len(last) == len(runs):
            final[name] = spread(last)
    if runs and all("train_set" in r["record"] for r in runs):
        final["train_set_error"] = spread([1.0 - r["record"]["train_set"]["eval/top1_acc"] for r in runs])
        if "eval_error" in final:
            gaps = [e - t for e, t in zip(final["eval_error"]["per_seed"], final["train_set_error"]["per_seed"])]
            final["generalisation_gap"] = spread(gaps)
    return {
        "name": setting.name,
        "values": setting.values,
        "seeds": [r["seed"] for r in runs],
        "diverged": [{"seed": r["seed"], "message": r["record"]["diverged"]} for r in finished if r not in runs],
        "runs": [
            {"seed": r["seed"], "workdir": r["workdir"], "curves": r["curves"], "wall_s": r["record"].get("wall_s")}
            for r in runs
        ],
        "mean_curves": by_curve,
        "steps_to_target": {
            "per_seed": reached,
            "reached": len(hit),
            **({"mean": spread(hit)["mean"], "std": spread(hit)["std"]} if hit else {"mean": None, "std": None}),
            "mean_curve": steps_to_reach(
                {"steps": by_curve["train_error"]["steps"], "values": by_curve["train_error"]["mean"]}, target
            ),
        },
        "final": final,
        "wall_s": sum(r["record"].get("wall_s") or 0.0 for r in runs),
    }


def compare(summaries: list[dict[str, Any]]) -> None:
    """Add each setting's ratio of steps to target and its error differences to the first setting (the baseline)."""
    base = summaries[0]
    for entry in summaries:
        mine, theirs = entry["steps_to_target"], base["steps_to_target"]
        all_reached = mine["reached"] == len(mine["per_seed"]) and theirs["reached"] == len(theirs["per_seed"])
        entry["steps_to_target"]["ratio_to_first"] = (
            mine["mean"] / theirs["mean"] if all_reached and theirs["mean"] else None
        )
        entry["vs_first"] = {}
        for name in ("eval_error", "eval_top5_error", "train_set_error", "generalisation_gap"):
            if name in entry["final"] and name in base["final"]:
                a, b = entry["final"][name], base["final"][name]
                se = math.sqrt(a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"])
                diff = a["mean"] - b["mean"]
                # One seed has no spread: nothing can be said about noise (None).
                beyond = bool(abs(diff) > 2 * se) if min(a["n"], b["n"]) > 1 else None
                entry["vs_first"][name] = {
                    "difference": diff,
                    "two_se": 2 * se,
                    "beyond_noise": beyond if entry is not base else False,
                }


def summarize(
    settings: list[Setting], finished: dict[str, list[dict[str, Any]]], *, target: float, extra: dict[str, Any]
) -> dict[str, Any]:
    """study.json: every setting that has finished runs, compared with the first."""
    summaries = [summarize_setting(s, finished[s.name], target) for s in settings if finished.get(s.name)]
    if summaries:
        compare(summaries)
    return {"format": STUDY_FORMAT, "target_train_error": target, **extra, "settings": summaries}


def finished_runs(runs: list[Run]) -> dict[str, list[dict[str, Any]]]:
    """{setting name: [{"seed", "workdir", "curves", "record"}]} of the runs with study_run.json."""
    found: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        if run.done:
            with open(run.done_file) as handle:
                record = json.load(handle)
            entry = {"seed": run.seed, "workdir": run.workdir, "curves": run_curves(run.workdir), "record": record}
            found.setdefault(run.setting.name, []).append(entry)
    return found


# ---------------------------------------------------------------- outputs


def _percent(stats: dict[str, Any] | None) -> str:
    if not stats:
        return "-"
    return f"{100 * stats['mean']:.1f} ± {100 * stats['std']:.1f}"


def table(study: dict[str, Any]) -> str:
    """The Markdown table of study.json (errors in %, mean ± standard deviation over seeds)."""
    target = 100 * study["target_train_error"]
    has_train_set = any("train_set_error" in s["final"] for s in study["settings"])
    header = ["setting", "seeds", f"steps to {target:g}% train error", "ratio", "final train error (%)"]
    header += ["train-set error (%)"] if has_train_set else []
    header += ["held-out top-1 error (%)", "held-out top-5 error (%)", "Δ top-1 vs first (± 2 SE)"]
    header += ["gap: held-out - train-set (%)"] if has_train_set else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for entry in study["settings"]:
        reach = entry["steps_to_target"]
        n = len(reach["per_seed"])
        if reach["mean"] is None:
            steps = f"not reached (0/{n})"
        else:
            steps = f"{reach['mean']:.0f} ± {reach['std']:.0f}" + (
                "" if reach["reached"] == n else f" ({reach['reached']}/{n} reached)"
            )
        ratio = reach.get("ratio_to_first")
        delta = entry["vs_first"].get("eval_error")
        if entry is study["settings"][0] or delta is None:
            delta_text = "baseline" if entry is study["settings"][0] else "-"
        else:
            delta_text = f"{100 * delta['difference']:+.1f} ± {100 * delta['two_se']:.1f}"
            verdicts = {True: " (beyond noise)", False: " (within noise)", None: " (one seed: no spread)"}
            delta_text += verdicts[delta["beyond_noise"]]
        seeds = str(len(entry["seeds"])) + (f" (+{len(entry['diverged'])} diverged)" if entry["diverged"] else "")
        row = [f"`{entry['name']}`", seeds, steps, "-" if ratio is None else f"{ratio:.2f}"]
        row += [_percent(entry["final"].get("train_error"))]
        row += [_percent(entry["final"].get("train_set_error"))] if has_train_set else []
        row += [_percent(entry["final"].get("eval_error")), _percent(entry["final"].get("eval_top5_error")), delta_text]
        row += [_percent(entry["final"].get("generalisation_gap"))] if has_train_set else []
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def figure(study: dict[str, Any], out_path: str) -> str:
    """Figure 1 of the paper, per setting: training error against step (mean line, min-max band over seeds),
    beside the held-out top-1 error. Matplotlib's Agg canvas, no pyplot state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), dpi=80, layout="constrained")
    FigureCanvasAgg(fig)
    train_ax, eval_ax = fig.subplots(1, 2)
    for index, entry in enumerate(study["settings"]):
        colour = f"C{index}"
        label = f"{entry['name']} ({len(entry['seeds'])} seeds" + (
            f", {len(entry['diverged'])} diverged)" if entry["diverged"] else ")"
        )
        for ax, name in ((train_ax, "train_error"), (eval_ax, "eval_error")):
            curve = entry["mean_curves"][name]
            if not curve["steps"]:
                continue
            percent = {k: [100 * v for v in curve[k]] for k in ("mean", "min", "max")}
            ax.plot(
                curve["steps"],
                percent["mean"],
                color=colour,
                label=label,
                marker="o" if ax is eval_ax else None,
                markersize=3,
            )
            ax.fill_between(curve["steps"], percent["min"], percent["max"], color=colour, alpha=0.2, linewidth=0)
    train_ax.axhline(100 * study["target_train_error"], color="grey", linestyle=":", linewidth=1)
    train_ax.set_title("training error (%)")
    eval_ax.set_title("held-out top-1 error (%)")
    for ax in (train_ax, eval_ax):
        ax.set_xlabel("step")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
    train_ax.legend(fontsize="small")
    temporary = os.path.join(os.path.dirname(os.path.abspath(out_path)), f".{os.path.basename(out_path)}.tmp.png")
    fig.savefig(temporary)
    os.replace(temporary, out_path)
    return out_path


def _write_json(path: str, record: Any) -> None:
    temporary = path + ".tmp"
    with open(temporary, "w") as handle:
        json.dump(record, handle, indent=1)
    os.replace(temporary, path)


def write_outputs(workdir: str, study: dict[str, Any]) -> None:
    """DIR/study.json, study.md and study.png from what has finished so far (each written atomically).

    A one-at-a-time study also gets study_<KEY>.md and .png per varied key: the baseline
    beside that key's other values, one idea's table and figure.
    """
    _write_json(os.path.join(workdir, JSON_FILE), study)
    if not study["settings"]:
        return
    parts = [("study", study)]
    if study.get("one_at_a_time") and study["settings"][0]["name"] == BASELINE:
        for key in study["vary"]:
            mine = [s for s in study["settings"] if s["name"].startswith(f"{key}=")]
            if mine:
                parts.append((f"study_{key}", dict(study, settings=[study["settings"][0], *mine])))
    for stem, part in parts:
        temporary = os.path.join(workdir, f"{stem}.md.tmp")
        with open(temporary, "w") as handle:
            handle.write(table(part))
        os.replace(temporary, os.path.join(workdir, f"{stem}.md"))
        figure(part, os.path.join(workdir, f"{stem}.png"))


# ---------------------------------------------------------------- the command


def run_study(
    base: Any,
    workdir: str,
    varied: list[tuple[str, list[Any]]],
    *,
    seeds: int,
    target_train_error: float = 0.25,
    train_set_eval: bool = False,
    one_at_a_time: bool = False,
    command: str = "",
) -> dict[str, Any]:
    """Train what is not finished yet, rewriting the outputs after every run; returns study.json's content."""
    if seeds < 1:
        raise UserError(f"--seeds={seeds} must be at least 1")
    if not 0.0 < target_train_error < 1.0:
        raise UserError(f"--target_train_error={target_train_error} must lie between 0 and 1 (0.25 = 25%)")
    settings = grid(varied, one_at_a_time=one_at_a_time)
    runs = plan_runs(base, settings, [base.seed + k for k in range(seeds)], workdir)
    os.makedirs(workdir, exist_ok=True)
    share_compilations(workdir)
    extra = {
        "command": command,
        "vary": {key: values for key, values in varied},
        "one_at_a_time": one_at_a_time,
        "seeds": [base.seed + k for k in range(seeds)],
        "log_every_steps": int(base.log_every_steps),
        "config": json.loads(base.to_json_best_effort()),
    }

    def outputs():
        study = summarize(settings, finished_runs(runs), target=target_train_error, extra=extra)
        write_outputs(workdir, study)
        return study

    todo = [run for run in runs if not run.done]
    log.info(
        "study: %d settings x %d seeds = %d runs in %s; %d finished earlier, %d to train",
        *(len(settings), seeds, len(runs), workdir, len(runs) - len(todo), len(todo)),
    )
    outputs()
    for position, run in enumerate(runs, 1):
        where = f"study: run {position}/{len(runs)} {run.setting.name} seed {run.seed}"
        if run.done:
            log.info("%s: finished earlier, skipped", where)
            continue
        log.info("%s: training in %s", where, run.workdir)
        record = train_run(run, train_set_eval=train_set_eval)
        if "diverged" in record:
            log.warning("%s: diverged (%s); recorded, the study goes on", where, record["diverged"])
        else:
            log.info("%s: done in %.0f s (%s)", where, record["wall_s"], _last_errors(run.workdir))
        outputs()
    study = outputs()
    log.info("study: wrote %s, %s and %s in %s", JSON_FILE, PNG_FILE, TABLE_FILE, workdir)
    return study


def _last_errors(workdir: str) -> str:
    curves = run_curves(workdir)
    parts = []
    for name, label in (("train_error", "train error"), ("eval_error", "held-out top-1 error")):
        if curves[name]["values"]:
            parts.append(f"{label} {100 * curves[name]['values'][-1]:.1f}%")
    return ", ".join(parts) or "no metrics"


def _flags(argv: list[str]):
    """The command line, parsed by absl into flag values of their own (config_flags for --config.*)."""
    from absl import flags
    from ml_collections import config_flags

    values = flags.FlagValues()
    # sys_argv: the overrides (--config.KEY=VALUE) are looked for in these arguments, not in sys.argv.
    config_flags.DEFINE_config_file(
        "config", None, "Path to a config file (configs/*.py).", flag_values=values, lock_config=True, sys_argv=argv
    )
    flags.DEFINE_string(
        "workdir", None, "The study's directory: one run per setting and seed below it.", flag_values=values
    )
    flags.DEFINE_multi_string(
        "vary", [], "KEY=V1,V2,...: a config key and its values; repeat for a grid.", flag_values=values
    )
    flags.DEFINE_integer(
        "seeds", 3, "Runs per setting, with seeds config.seed, config.seed + 1, ...", flag_values=values
    )
    flags.DEFINE_float(
        "target_train_error", 0.25, "Training error whose steps are compared (Figure 1: 0.25).", flag_values=values
    )
    flags.DEFINE_bool(
        "train_set_eval", False, "Also score each finished model on its whole training split.", flag_values=values
    )
    flags.DEFINE_bool(
        "one_at_a_time",
        False,
        "Instead of the grid: the baseline (every key's first value), then one key changed at a time.",
        flag_values=values,
    )
    flags.DEFINE_bool("help", False, "Show this help.", short_name="h", flag_values=values)
    try:
        values(argv)
    except (flags.Error, KeyError, AttributeError, TypeError, ValueError) as error:
        text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
        message = " ".join(line.strip() for line in text.replace("\\n", "\n").splitlines() if line.strip())
        raise UserError(message or type(error).__name__) from None
    for name in ("config", "workdir"):
        if values[name].value is None and not values.help:
            raise UserError(f"--{name} is required (python -m alexnet_jax.commands.study --help)")
    return values


def share_compilations(workdir: str) -> None:
    """Seeds of one setting compile the same programs: keep them in a persistent compilation cache
    (DIR/.compilation_cache) unless the user chose one, so each is compiled once per study."""
    import jax

    if os.environ.get("JAX_COMPILATION_CACHE_DIR") or jax.config.jax_compilation_cache_dir:
        return
    jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, ".compilation_cache"))


@cli.command
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else ["python -m alexnet_jax.commands.study", *argv])
    values = _flags(argv)
    if values.help:
        print(__doc__)
        print(values.get_help())
        return 0
    varied = parse_vary(values.vary, values.config)
    workdir = os.path.abspath(values.workdir)
    try:
        run_study(
            values.config,
            workdir,
            varied,
            seeds=values.seeds,
            target_train_error=values.target_train_error,
            train_set_eval=values.train_set_eval,
            one_at_a_time=values.one_at_a_time,
            command=" ".join(["python -m alexnet_jax.commands.study", *argv[1:]]),
        )
    except StudyStopped as stopped:
        log.warning("study stopped: %s; run the same command again to continue", stopped)
    return 0


if __name__ == "__main__":
    cli.native_notices_asked_for()  # before JAX loads
    cli.drop_closed_event_loop_noise()
    cli.setup_logging(project_level=logging.INFO, stream=sys.stdout)
    sys.exit(main())
