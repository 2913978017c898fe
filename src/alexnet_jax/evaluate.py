"""Evaluate trained runs without training: one workdir is one model, several are an ensemble.

    python -m alexnet_jax.evaluate --workdir=runs/a [--workdir=runs/b ...] [--crops=10] \
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
import dataclasses
import functools
import json
import logging
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from alexnet_jax import convert, parallel, runinfo
from alexnet_jax import metrics as metrics_lib
from alexnet_jax import model as model_lib
from alexnet_jax.errors import UserError
from alexnet_jax.parallel import AXIS

log = logging.getLogger(__name__)

DEFAULT_PER_DEVICE_BATCH = 16


@dataclasses.dataclass(frozen=True)
class Run:
    """One trained model: where it came from, its params and what it was trained on."""

    workdir: str
    params: Any
    variant: str
    num_classes: int
    step: int | None
    info: dict[str, Any]  # WORKDIR/config.json

    def module(self) -> model_lib.AlexNet:
        return model_lib.AlexNet(variant=self.variant, num_classes=self.num_classes)


def load_run(workdir: str) -> Run:
    info = runinfo.read_run_info(workdir)
    if info is None:
        raise UserError(
            f"{workdir} has no config.json, so the dataset and input size it was trained with are unknown; "
            "evaluate runs made by this version of train.py"
        )
    params, meta = convert.load_params(workdir)
    return Run(
        workdir=workdir,
        params=params,
        variant=meta["model"],
        num_classes=int(meta["num_classes"]),
        step=meta.get("step"),
        info=info,
    )


def _ensemble_key(run: Run, key: str) -> Any:
    if key == "num_classes":
        return run.num_classes
    if key == "resize_method":
        return runinfo.resize_method(run.info)
    return run.info.get(key)


def check_ensemble(runs: list[Run]) -> None:
    """Averaging softmaxes only makes sense over the same classes seen at the same input size."""
    first = runs[0]
    for run in runs[1:]:
        for key in ("num_classes", "image_size", "resize_size", "resize_method"):
            mine, theirs = (_ensemble_key(r, key) for r in (run, first))
            if mine != theirs:
                raise UserError(
                    f"{run.workdir} has {key}={mine} but {first.workdir} has {theirs}: an ensemble needs "
                    "models of the same classes and input size"
                )
        if run.info.get("class_names") != first.info.get("class_names"):
            raise UserError(f"{run.workdir} and {first.workdir} were trained on different class names")


def example_probabilities(params: Any, images: jax.Array, *, module: model_lib.AlexNet) -> jax.Array:
    """Softmax per example [B, classes] of images [B, S, S, 3] or [B, crops, S, S, 3] (crops averaged)."""
    crops = images.shape[1] if images.ndim == 5 else 1
    flat = images.reshape((-1,) + images.shape[-3:])  # [B * crops, S, S, 3]
    logits = module.apply({"params": params}, flat, train=False)
    return jax.nn.softmax(logits.astype(jnp.float32)).reshape((images.shape[0], crops, -1)).mean(axis=1)


@functools.cache
def _p_probabilities(module: model_lib.AlexNet):
    # Params go in unreplicated (in_axes None); one slice of the batch per device.
    return jax.pmap(functools.partial(example_probabilities, module=module), axis_name=AXIS, in_axes=(None, 0))


@jax.jit
def batch_sums(probs: jax.Array, labels: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """Sums over the real (mask 1) examples of probs [..., classes], labels [...], mask [...]."""
    probs = probs.reshape((-1, probs.shape[-1]))
    labels, mask = labels.reshape(-1), mask.reshape(-1).astype(jnp.float32)
    log_probs = jnp.log(jnp.maximum(probs, jnp.finfo(jnp.float32).tiny))
    nll = -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
    return {
        "loss": jnp.sum(nll * mask),
        "top1_acc": jnp.sum(metrics_lib.correct_top_k(probs, labels, 1) * mask),
        "top5_acc": jnp.sum(metrics_lib.correct_top_k(probs, labels, 5) * mask),
        "num_examples": jnp.sum(mask),
    }


def evaluate_runs(
    runs: list[Run], batches, *, keep_probabilities: bool = False
) -> tuple[dict[str, float], np.ndarray | None]:
    """Exact metrics of the runs' averaged softmax over device batches {'images', 'labels', 'mask'}.

    With keep_probabilities, also the ensemble's probabilities [num_examples, classes]
    of the real examples, in the order read.
    """
    totals, kept = None, []
    modules = [run.module() for run in runs]
    # Replicated once on every local device: an unplaced tree would be copied to each device every batch.
    replicated = NamedSharding(parallel.local_mesh(), PartitionSpec())
    params = [jax.device_put(run.params, replicated) for run in runs]
    for batch in batches:
        probs = sum(_p_probabilities(m)(p, batch["images"]) for m, p in zip(modules, params)) / len(runs)
        sums = batch_sums(probs, batch["labels"], batch["mask"])
        totals = sums if totals is None else jax.tree_util.tree_map(jnp.add, totals, sums)
        if keep_probabilities:
            host_probs, mask = jax.device_get((probs, batch["mask"]))
            kept.append(host_probs.reshape((-1, host_probs.shape[-1]))[mask.reshape(-1) == 1])
    totals = jax.device_get(totals)
    count = float(totals["num_examples"])
    results = {
        "eval/loss": float(totals["loss"]) / count,
        "eval/top1_acc": float(totals["top1_acc"]) / count,
        "eval/top5_acc": float(totals["top5_acc"]) / count,
        "eval/num_examples": int(count),
    }
    return results, (np.concatenate(kept) if keep_probabilities else None)


def evaluate(
    workdirs: list[str],
    *,
    crops: int = 1,
    dataset: str = "",
    data_dir: str | None = None,
    split: str = "",
    batch_size: int = -1,
    skip_bad_images: bool = False,
    keep_probabilities: bool = False,
) -> tuple[dict[str, Any], np.ndarray | None]:
    """Load the runs, read the evaluation split once, and score their (averaged) softmax."""
    from alexnet_jax.data import pipeline, sources

    if crops not in (1, 10):
        raise UserError(f"--crops={crops} is unsupported; use 1 (centre) or 10 (the paper's test)")
    if not workdirs:
        raise UserError("pass at least one --workdir=DIR")
    runs = [load_run(workdir) for workdir in workdirs]
    check_ensemble(runs)
    info = runs[0].info
    config = info.get("config") or {}
    dataset = dataset or info["dataset"]
    data_dir = info.get("data_dir", "") if data_dir is None else data_dir
    split = split or info.get("eval_split") or "validation"
    source = sources.open_source(
        dataset,
        data_dir=data_dir,
        manual_dir=config.get("manual_dir", ""),
        train_split=config.get("train_split", "train"),
        eval_split=split,
        skip_bad_images=skip_bad_images,
    )
    if source.num_classes > runs[0].num_classes:
        raise UserError(
            f"{source.name} has {source.num_classes} classes but the model only {runs[0].num_classes}; "
            "evaluate on the dataset it was trained on"
        )
    local_devices = jax.local_device_count()
    batch_size = batch_size if batch_size > 0 else DEFAULT_PER_DEVICE_BATCH * local_devices
    if batch_size % local_devices:
        raise UserError(f"--batch_size={batch_size} is not divisible by the {local_devices} devices; use a multiple")
    aug = pipeline.Augmentation(
        image_size=int(info["image_size"]),
        resize_size=int(info["resize_size"]),
        eval_crops=crops,
        resize_method=runinfo.resize_method(info),  # as the run was trained
    )
    eval_ds = pipeline.eval_dataset(source.eval, aug, per_process_batch=batch_size)
    batches = parallel.prefetch_to_device(pipeline.device_batches(eval_ds, local_devices))
    results, probs = evaluate_runs(runs, batches, keep_probabilities=keep_probabilities)
    record: dict[str, Any] = dict(results)
    record.update(
        workdirs=[os.path.abspath(run.workdir) for run in runs],
        steps=[run.step for run in runs],
        crops=crops,
        dataset=dataset,
        data_dir=data_dir,
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m alexnet_jax.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", action="append", default=[], help="a run's directory; repeat for an ensemble")
    parser.add_argument("--crops", type=int, default=1, choices=(1, 10), help="1 = centre crop, 10 = the paper's")
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
    try:
        record, _ = evaluate(
            args.workdir,
            crops=args.crops,
            dataset=args.dataset,
            data_dir=args.data_dir,
            split=args.split,
            batch_size=args.batch_size,
            skip_bad_images=args.skip_bad_images,
        )
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
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
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s", force=True)
    logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax's notes on read-only directories
    sys.exit(main())
