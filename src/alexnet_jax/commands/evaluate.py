"""Evaluate trained runs without training: one workdir is one model, several are an ensemble.

    python -m alexnet_jax.commands.evaluate --workdir=runs/a [--workdir=runs/b ...] [--crops=10] \
        [--dataset=NAME] [--data_dir=DIR] [--split=validation] [--out=results.json] [--write_metrics]

Each workdir's newest checkpoint (params only) and WORKDIR/config.json are read;
the evaluation split is the one the first run was evaluated on, unless the flags
say otherwise. Every example counts exactly once (pipeline.eval_dataset pads and
masks the last batch). Several workdirs are the paper's ensemble: the softmax of
every model (averaged over the crops first, with --crops=10) is averaged per
example before the loss and the top-k. The metric names are training's
(eval/loss, eval/top1_acc, eval/top5_acc, eval/num_examples).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import jax
import numpy as np

from alexnet_jax import cli, paths
from alexnet_jax.checkpointing import runinfo, trained
from alexnet_jax.data.choices import EVAL_CROPS
from alexnet_jax.errors import UserError
from alexnet_jax.evaluation.core import evaluate_runs
from alexnet_jax.parallel import distributed

DEFAULT_PER_DEVICE_BATCH = 16
# Models of an ensemble must agree on these to average their softmax per example.
ENSEMBLE_KEYS = ("num_classes", "image_size", "resize_size", "resize_method", "class_names")


def load_run(workdir: str) -> trained.TrainedModel:
    """A run to evaluate: its newest checkpoint, and config.json for where its images are."""
    workdir = paths.readable_directory(workdir, flag="--workdir")
    if runinfo.read_run_info(workdir) is None:
        raise UserError(
            f"{workdir} has no config.json, so the dataset and input size it was trained with are unknown; "
            "evaluate runs made by this version of the training loop"
        )
    return trained.load(workdir)


def check_ensemble(runs: list[trained.TrainedModel]) -> None:
    """Averaging softmaxes only makes sense over the same classes seen at the same input size."""
    first = runs[0]
    for run in runs[1:]:
        for key in ENSEMBLE_KEYS:
            mine, theirs = getattr(run, key), getattr(first, key)
            if mine != theirs:
                raise UserError(
                    f"{run.path} has {key}={_short(mine)} but {first.path} has {_short(theirs)}: an ensemble needs "
                    "models of the same classes and input size"
                )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) < 60 else text[:57] + "..."


def evaluate(
    workdirs: list[str],
    *,
    crops: int = -1,
    dataset: str = "",
    data_dir: str | None = None,
    split: str = "",
    batch_size: int = -1,
    skip_bad_images: bool = False,
    keep_probabilities: bool = False,
) -> tuple[dict[str, Any], np.ndarray | None]:
    """Load the runs, read the evaluation split once, and score their (averaged) softmax.

    crops: -1 = the first run's own config.eval_crops (10 for the paper's recipe).
    """
    from alexnet_jax.data import pipeline, registry

    if not workdirs:
        raise UserError("pass at least one --workdir=DIR")
    runs = [load_run(workdir) for workdir in workdirs]
    check_ensemble(runs)
    crops = runs[0].eval_crops if crops == -1 else crops
    if crops not in EVAL_CROPS:
        raise UserError(f"--crops={crops} is unsupported; use 1 (centre) or 10 (the paper's test)")
    config = dict(runs[0].run_info.get("config") or {})
    config.update(dataset=dataset or runs[0].run_info["dataset"])
    config.update(data_dir=runs[0].run_info.get("data_dir", "") if data_dir is None else data_dir)
    split = split or runs[0].run_info.get("eval_split") or "validation"
    config.update(eval_split=split, skip_bad_images=skip_bad_images, download=False)
    source = registry.open_source_from_config(config)
    if source.num_classes > runs[0].num_classes:
        raise UserError(
            f"{source.name} has {source.num_classes} classes but the model only {runs[0].num_classes}; "
            "evaluate on the dataset it was trained on"
        )
    local_devices = jax.local_device_count()
    batch_size = batch_size if batch_size > 0 else DEFAULT_PER_DEVICE_BATCH * local_devices
    if batch_size % local_devices:
        raise UserError(f"--batch_size={batch_size} is not divisible by the {local_devices} devices; use a multiple")
    aug = pipeline.Augmentation(eval_crops=crops, **runs[0].sizes)  # as the run was trained
    batches = distributed.prefetch_to_device(
        pipeline.device_batches(registry.eval_batches(source.eval, aug, per_process_batch=batch_size), local_devices)
    )
    results, probs = evaluate_runs(runs, batches, keep_probabilities=keep_probabilities)
    record: dict[str, Any] = dict(results)
    record.update(
        workdirs=[run.path for run in runs],
        steps=[run.step for run in runs],
        crops=crops,
        dataset=config["dataset"],
        data_dir=config["data_dir"],
        split=split,
    )
    return record, probs


def append_metrics(workdir: str, step: int | None, record: dict[str, Any]) -> None:
    """One metrics.jsonl line with the numeric results (plus eval/crops and eval/models)."""
    line = {"step": int(step or 0)}
    line.update({key: value for key, value in record.items() if key.startswith("eval/")})
    line.update({"eval/crops": record["crops"], "eval/models": len(record["workdirs"])})
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as handle:
        handle.write(json.dumps(line) + "\n")


@cli.command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m alexnet_jax.commands.evaluate", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--workdir", action="append", default=[], help="a run's directory; repeat for an ensemble")
    parser.add_argument(
        "--crops", type=int, default=-1, choices=(-1, *EVAL_CROPS), help="-1 = the run's config.eval_crops"
    )
    parser.add_argument("--dataset", default="", help="override config.json's dataset")
    parser.add_argument("--data_dir", default=None, help="override config.json's data_dir")
    parser.add_argument("--split", default="", help="override config.json's eval_split")
    parser.add_argument("--batch_size", type=int, default=-1, help=f"-1 = {DEFAULT_PER_DEVICE_BATCH} per device")
    parser.add_argument("--skip_bad_images", action="store_true", help="image folders: skip unreadable files")
    parser.add_argument("--out", default="", help="also write the results as JSON to this file")
    parser.add_argument(
        "--write_metrics", action="store_true", help="append the results to the first workdir's metrics.jsonl"
    )
    args = parser.parse_args(argv)
    if args.out:  # where the results go is checked before the evaluation, not after it
        paths.writable_directory(os.path.dirname(os.path.abspath(args.out)), flag="--out's directory")
    if args.write_metrics and args.workdir:
        paths.writable_directory(args.workdir[0], flag="--workdir (for --write_metrics)")
    record, _ = evaluate(
        args.workdir,
        crops=args.crops,
        dataset=args.dataset,
        data_dir=args.data_dir,
        split=args.split,
        batch_size=args.batch_size,
        skip_bad_images=args.skip_bad_images,
    )
    kind = "one model" if len(args.workdir) == 1 else f"ensemble of {len(args.workdir)} (softmax averaged)"
    print(
        f"{kind}, {record['crops']} crop(s), {record['dataset']} {record['split']}: "
        f"loss {record['eval/loss']:.4f}  top-1 {100 * record['eval/top1_acc']:.2f}%  "
        f"top-5 {100 * record['eval/top5_acc']:.2f}%  ({record['eval/num_examples']} examples)"
    )
    print(json.dumps(record))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(record, handle, indent=1)
    if args.write_metrics:
        append_metrics(args.workdir[0], record["steps"][0], record)
    return 0


if __name__ == "__main__":
    cli.run(main)
