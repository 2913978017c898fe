"""The paper's Figure 4: the images whose last hidden layer (fc7) is nearest to a query's.

    python -m alexnet_jax.commands.neighbors --workdir=runs/alexnet --query cat.jpg dog.jpg [--k=6]

For every query image, the k images of the run's validation split (or
--split=train, as in the paper) whose fc7 activations (config.hidden_units values,
4096 by default, after the ReLU) lie nearest in Euclidean distance. Writes a PNG
grid, one row per query: the query, then its neighbours nearest first, each captioned with its class.

The features are taken with Flax's capture_intermediates, so the model, its
parameter names and its outputs stay as they are. One pass over the split keeps
only the k best per query, so memory does not grow with the split.
"""

from __future__ import annotations

import argparse
import functools
import io
import logging
import os
from typing import Any

import jax
import numpy as np

from alexnet_jax import cli, paths
from alexnet_jax.checkpointing import runinfo, trained
from alexnet_jax.commands import predict
from alexnet_jax.errors import UserError
from alexnet_jax.model import alexnet as model_lib

log = logging.getLogger(__name__)

NEIGHBORS_FILE = "neighbors.png"
FEATURE_LAYER = "fc7"


@functools.partial(jax.jit, static_argnums=0)
def fc7_features(module: model_lib.AlexNet, params: Any, images: jax.Array) -> jax.Array:
    """[N, S, S, 3] -> [N, 4096]: the last hidden layer exactly as fc8 sees it in evaluation.

    capture_intermediates records the layers' outputs, so the model, its parameter
    names and its outputs stay as they are. The paper variant's fc7 output passes its
    test-time dropout scaling (drop_fc7) before fc8; torchvision's fc7 only its ReLU.
    """
    names = (FEATURE_LAYER, f"drop_{FEATURE_LAYER}")
    _, state = module.apply(
        {"params": params},
        images,
        train=False,
        capture_intermediates=lambda layer, method: layer.name in names and method == "__call__",
        mutable=["intermediates"],
    )
    captured = state["intermediates"]
    if names[1] in captured:
        return captured[names[1]]["__call__"][0]
    return jax.nn.relu(captured[FEATURE_LAYER]["__call__"][0])


def make_feature_fn(classifier: trained.TrainedModel):
    """numpy images [N, S, S, 3] -> float64 fc7 features [N, 4096] (float64 for exact distances)."""
    module = classifier.module()
    return lambda images: np.asarray(fc7_features(module, classifier.params, images), np.float64)


class NearestK:
    """The k smallest Euclidean distances per query seen so far, and their example indices."""

    def __init__(self, queries: np.ndarray, k: int):
        self.queries = queries  # [Q, D]
        self.query_sq = np.sum(queries * queries, axis=1)[:, None]  # [Q, 1]
        self.distances = np.full((len(queries), k), np.inf)
        self.indices = np.full((len(queries), k), -1, np.int64)

    def add(self, features: np.ndarray, first_index: int) -> None:
        squared = self.query_sq + np.sum(features * features, axis=1)[None] - 2.0 * self.queries @ features.T
        distances = np.sqrt(np.maximum(squared, 0.0))  # [Q, B]
        indices = np.broadcast_to(np.arange(first_index, first_index + len(features)), distances.shape)
        all_distances = np.concatenate([self.distances, distances], axis=1)
        all_indices = np.concatenate([self.indices, indices], axis=1)
        order = np.argsort(all_distances, axis=1, kind="stable")[:, : self.distances.shape[1]]
        self.distances = np.take_along_axis(all_distances, order, axis=1)
        self.indices = np.take_along_axis(all_indices, order, axis=1)


def find_neighbors(
    classifier: trained.TrainedModel,
    query_images: np.ndarray,
    split,
    *,
    k: int = 6,
    batch_size: int = 64,
    max_images: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Queries [Q, S, S, 3] -> (indices [Q, k], distances [Q, k], labels [Q, k]) into `split`.

    The split's images come through its own evaluation batches (centre crop, as the
    model was evaluated), in the split's fixed order; padding is masked out.
    """
    from alexnet_jax.data import pipeline, registry

    features = make_feature_fn(classifier)
    nearest = NearestK(features(query_images), k)
    aug = pipeline.Augmentation(eval_crops=1, **classifier.sizes)
    labels: list[np.ndarray] = []
    seen = 0
    for batch_index, batch in enumerate(registry.eval_batches(split, aug, per_process_batch=batch_size)):
        count = int(batch["mask"].sum())  # real examples come first; padding only ends the last batch
        if max_images > 0:
            count = min(count, max_images - seen)
        nearest.add(features(batch["images"])[:count], seen)
        labels.append(batch["labels"][:count])
        seen += count
        if (batch_index + 1) % 50 == 0:
            log.info("fc7 features of %d images", seen)
        if max_images > 0 and seen >= max_images:
            break
    if seen < k:
        raise UserError(f"the split has {seen} images, fewer than --k={k}")
    all_labels = np.concatenate(labels)
    return nearest.indices, nearest.distances, all_labels[nearest.indices]


def _tile(image_bytes: bytes, size: int) -> np.ndarray:
    """The centre square of an image, resized to size x size, uint8 RGB."""
    from PIL import Image

    image = Image.open(io.BytesIO(image_bytes)).convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(image)


def neighbor_grid(rows: list[list[tuple[bytes, str]]], *, tile: int = 112, gap: int = 4) -> np.ndarray:
    """rows of (encoded image, caption), query first -> uint8 [H, W, 3], white background.

    A wider gap separates each query from its neighbours.
    """
    from PIL import Image, ImageDraw

    caption = 14
    columns = max(len(row) for row in rows)
    height = len(rows) * (tile + caption + gap)
    width = columns * (tile + gap) + 3 * gap
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for row_index, row in enumerate(rows):
        top = row_index * (tile + caption + gap)
        for column, (image_bytes, text) in enumerate(row):
            left = column * (tile + gap) + (3 * gap if column else 0)
            canvas.paste(Image.fromarray(_tile(image_bytes, tile)), (left, top))
            limit = max(1, tile // 6)  # the default font is about 6 px a character
            draw.text(
                (left + 1, top + tile + 1), text if len(text) <= limit else text[: limit - 1] + "~", fill=(0, 0, 0)
            )
    return np.asarray(canvas)


def _short(name: str) -> str:
    return name.split(",")[0].split(" (n")[0]


@cli.command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m alexnet_jax.commands.neighbors", description=__doc__.split("\n\n")[0]
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", help="a run's directory: its newest checkpoint and config.json")
    source.add_argument("--checkpoint", help="a converted checkpoint; give --dataset and --data_dir too")
    parser.add_argument("--query", nargs="+", required=True, help="query images (JPEG or PNG)")
    parser.add_argument("--k", type=int, default=6, help="neighbours per query (the paper shows 6)")
    parser.add_argument("--split", choices=("validation", "train"), default="validation", help="where to search")
    parser.add_argument("--dataset", default="", help="default: the run's config.dataset")
    parser.add_argument("--data_dir", default="", help="default: the run's config.data_dir")
    parser.add_argument("--max_images", type=int, default=0, help="search only the first N images (0 = all)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--tile", type=int, default=112, help="side of each image in the grid, in pixels")
    parser.add_argument("--out", default="", help=f"PNG to write (default: WORKDIR/{NEIGHBORS_FILE})")
    args = parser.parse_args(argv)
    if not args.out and not args.workdir:
        parser.error("--checkpoint needs --out=PNG")
    out = args.out or os.path.join(args.workdir, NEIGHBORS_FILE)
    trained.check_path(args.workdir or args.checkpoint, flag="--workdir" if args.workdir else "--checkpoint")
    paths.writable_directory(os.path.dirname(os.path.abspath(out)), flag="--out's directory")
    rows = run(args)
    from PIL import Image

    Image.fromarray(neighbor_grid(rows, tile=args.tile)).save(out)
    print(f"wrote {out}")
    return 0


def run(args: argparse.Namespace) -> list[list[tuple[bytes, str]]]:
    """Find and print the neighbours; returns the grid's rows."""
    from alexnet_jax.data import registry

    if args.k < 1:
        raise UserError(f"--k={args.k} must be at least 1")
    classifier = predict.load_classifier(
        args.workdir or args.checkpoint, flag="--workdir" if args.workdir else "--checkpoint"
    )
    info = classifier.run_info or {}
    dataset = args.dataset or info.get("dataset")
    if not dataset:
        raise UserError("which images to search is unknown (no config.json): pass --dataset and --data_dir")
    config = {**(info.get("config") or {}), "dataset": dataset, "data_dir": args.data_dir or info.get("data_dir", "")}
    source = registry.open_source_from_config(config, eval_split=info.get("eval_split", "validation"))
    split = source.train if args.split == "train" else source.eval
    names = [_short(name) for name in runinfo.display_names(source.class_names, len(source.class_names))]
    query_bytes = [predict.read_image(path) for path in args.query]
    queries = np.concatenate([predict.preprocess(b, **classifier.sizes) for b in query_bytes])
    indices, distances, labels = find_neighbors(
        classifier, queries, split, k=args.k, batch_size=args.batch_size, max_images=args.max_images
    )
    images = split.encoded({int(i) for i in indices.ravel()})
    rows = []
    for path, image_bytes, row_indices, row_distances, row_labels in zip(
        args.query, query_bytes, indices, distances, labels
    ):
        print(path)
        row = [(image_bytes, os.path.basename(path))]
        for rank, (index, distance, label) in enumerate(zip(row_indices, row_distances, row_labels), start=1):
            where = split.describe(int(index))
            print(f"  {rank}. distance {distance:9.3f}  {names[label]:<24s} {where}")
            row.append((images[int(index)], names[label]))
        rows.append(row)
    return rows


if __name__ == "__main__":
    cli.run(main)
