"""Classify images with a trained run or converted weights: top-5 classes with probabilities.

    python -m alexnet_jax.predict --workdir=runs/alexnet cat.jpg dog.png
    python -m alexnet_jax.predict --checkpoint=weights/torchvision_alexnet --crops=10 cat.jpg

Images go through the evaluation preprocessing of data/augment.py (shorter side
to resize_size, centre image_size crop, ImageNet mean/std); --crops=10 averages
the softmax over the paper's ten crops. Class names come from the run's
config.json or the converted checkpoint's model.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import os
import sys
from typing import Any

import jax
import numpy as np

from alexnet_jax import convert, runinfo
from alexnet_jax import model as model_lib
from alexnet_jax.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_IMAGE_SIZE = 224


@dataclasses.dataclass(frozen=True)
class Classifier:
    """Params plus what is needed to feed them: the variant, sizes and class names."""

    params: Any
    variant: str
    num_classes: int
    image_size: int
    resize_size: int
    resize_method: str  # config.resize_method of the run (runinfo.resize_method)
    names: list[str]  # display name per output unit
    meta: dict[str, Any]

    def module(self) -> model_lib.AlexNet:
        return model_lib.AlexNet(variant=self.variant, num_classes=self.num_classes)

    @property
    def sizes(self) -> dict[str, Any]:
        """The preprocessing it was trained with: keyword arguments of preprocess / augment.eval_image."""
        return dict(image_size=self.image_size, resize_size=self.resize_size, resize_method=self.resize_method)


def load_classifier(path: str, *, image_size: int = -1, resize_size: int = -1) -> Classifier:
    """A workdir or converted checkpoint; sizes: -1 = as trained (224 and 256 where unknown)."""
    params, meta = convert.load_params(path)
    if image_size <= 0:
        image_size = meta.get("image_size") or 0
        if not image_size:
            log.warning(
                "%s records no input size (no config.json): using %d; pass --image_size to match training",
                path,
                DEFAULT_IMAGE_SIZE,
            )
            image_size = DEFAULT_IMAGE_SIZE
    if resize_size <= 0:
        resize_size = meta.get("resize_size") or int(round(image_size * 256 / 224))
    if image_size < model_lib.min_image_size() or resize_size < image_size:
        raise UserError(
            f"image_size={image_size}, resize_size={resize_size}: need image_size >= "
            f"{model_lib.min_image_size()} and resize_size >= image_size"
        )
    num_classes = int(meta["num_classes"])
    if meta.get("class_names") is None:
        log.warning("%s records no class names (no config.json): classes are shown by index", path)
    return Classifier(
        params=jax.device_put(params),
        variant=meta["model"],
        num_classes=num_classes,
        image_size=int(image_size),
        resize_size=int(resize_size),
        resize_method=runinfo.resize_method(meta.get("run_info")),
        names=runinfo.display_names(meta.get("class_names"), num_classes),
        meta=meta,
    )


def read_image(path: str) -> bytes:
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist")
    with open(path, "rb") as handle:
        return handle.read()


def preprocess(
    image_bytes: bytes, *, image_size: int, resize_size: int, crops: int = 1, resize_method: str = "area"
) -> np.ndarray:
    """Encoded image -> uint8 [crops, S, S, 3], exactly as evaluation sees it (the model normalises)."""
    import tensorflow as tf

    from alexnet_jax.data import augment, pipeline

    pipeline.hide_accelerators_from_tf()
    try:
        images = augment.eval_images(
            tf.constant(image_bytes),
            crops=crops,
            image_size=image_size,
            resize_size=resize_size,
            resize_method=resize_method,
        )
    except tf.errors.InvalidArgumentError as error:
        raise UserError(f"cannot decode the image ({error.message.splitlines()[0]}); use JPEG or PNG") from None
    return images.numpy().reshape((crops, image_size, image_size, 3))


@functools.partial(jax.jit, static_argnums=0)
def probabilities(module: model_lib.AlexNet, params: Any, images: jax.Array) -> jax.Array:
    """images [N, S, S, 3] -> softmax probabilities [N, num_classes] (compiled once per module and shape)."""
    return jax.nn.softmax(module.apply({"params": params}, images, train=False))


def classify(
    classifier: Classifier, paths: list[str], *, crops: int = 1, top: int = 5
) -> list[list[tuple[str, float]]]:
    """Per image: the `top` (name, probability) pairs, most probable first; crops' softmax averaged."""
    if crops not in (1, 10):
        raise UserError(f"--crops={crops} is unsupported; use 1 (centre) or 10 (the paper's test)")
    module = classifier.module()
    results = []
    for path in paths:
        images = preprocess(read_image(path), crops=crops, **classifier.sizes)
        probs = np.asarray(probabilities(module, classifier.params, images)).mean(axis=0)  # [num_classes]
        order = np.argsort(-probs, kind="stable")[: min(top, classifier.num_classes)]
        results.append([(classifier.names[i], float(probs[i])) for i in order])
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m alexnet_jax.predict", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", help="a run's directory: its newest checkpoint and config.json")
    source.add_argument("--checkpoint", help="a converted checkpoint (python -m alexnet_jax.convert)")
    parser.add_argument("--crops", type=int, default=1, choices=(1, 10), help="1 = centre crop, 10 = the paper's")
    parser.add_argument("--top", type=int, default=5, help="how many classes to show")
    parser.add_argument("--image_size", type=int, default=-1, help="-1 = as the run was trained")
    parser.add_argument("--resize_size", type=int, default=-1, help="-1 = as the run was trained")
    parser.add_argument("images", nargs="+", help="JPEG or PNG files")
    args = parser.parse_args(argv)
    try:
        for path in args.images:  # fail before loading the checkpoint
            if not os.path.isfile(path):
                raise UserError(f"{path} does not exist")
        classifier = load_classifier(
            args.workdir or args.checkpoint, image_size=args.image_size, resize_size=args.resize_size
        )
        results = classify(classifier, args.images, crops=args.crops, top=args.top)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for path, top in zip(args.images, results):
        print(path)
        for rank, (name, probability) in enumerate(top, start=1):
            print(f"  {rank}. {100 * probability:6.2f}%  {name}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s", force=True)
    logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax's notes on read-only directories
    sys.exit(main())
