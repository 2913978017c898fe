"""Classify images with a trained run or converted weights: top-5 classes with probabilities.

    python -m alexnet_jax.commands.predict --workdir=runs/alexnet cat.jpg dog.png
    python -m alexnet_jax.commands.predict --checkpoint=weights/torchvision_alexnet --crops=10 cat.jpg

Images go through the evaluation preprocessing of data/augment.py (shorter side
to resize_size, centre image_size crop, the run's input scale); --crops=10 averages
the softmax over the paper's ten crops. Class names come from the run's
config.json or the converted checkpoint's model.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
from typing import Any

import jax
import numpy as np

from alexnet_jax import cli
from alexnet_jax.checkpointing import trained
from alexnet_jax.data.choices import EVAL_CROPS
from alexnet_jax.errors import UserError
from alexnet_jax.model import alexnet as model_lib


def load_classifier(
    path: str, *, image_size: int = -1, resize_size: int = -1, flag: str = "--workdir"
) -> trained.TrainedModel:
    """A workdir or converted checkpoint with its params on the default device (trained.load)."""
    model = trained.load(path, image_size=image_size, resize_size=resize_size, flag=flag)
    return dataclasses.replace(model, params=jax.device_put(model.params))


def read_image(path: str) -> bytes:
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist")
    with open(path, "rb") as handle:
        return handle.read()


def preprocess(
    image_bytes: bytes, *, image_size: int, resize_size: int, crops: int = 1, resize_method: str = "area"
) -> np.ndarray:
    """Encoded image -> uint8 [crops, S, S, 3], exactly as evaluation sees it (the model scales the pixels)."""
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
    classifier: trained.TrainedModel, paths: list[str], *, crops: int = 1, top: int = 5
) -> list[list[tuple[str, float]]]:
    """Per image: the `top` (name, probability) pairs, most probable first; crops' softmax averaged."""
    if crops not in EVAL_CROPS:
        raise UserError(f"--crops={crops} is unsupported; use 1 (centre) or 10 (the paper's test)")
    module = classifier.module()
    results = []
    for path in paths:
        images = preprocess(read_image(path), crops=crops, **classifier.sizes)
        probs = np.asarray(probabilities(module, classifier.params, images)).mean(axis=0)  # [num_classes]
        order = np.argsort(-probs, kind="stable")[: min(top, classifier.num_classes)]
        results.append([(classifier.names[i], float(probs[i])) for i in order])
    return results


@cli.command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m alexnet_jax.commands.predict", description=__doc__.split("\n\n")[0]
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", help="a run's directory: its newest checkpoint and config.json")
    source.add_argument("--checkpoint", help="a converted checkpoint (python -m alexnet_jax.commands.convert)")
    parser.add_argument("--crops", type=int, default=1, choices=EVAL_CROPS, help="1 = centre crop, 10 = the paper's")
    parser.add_argument("--top", type=int, default=5, help="how many classes to show")
    parser.add_argument("--image_size", type=int, default=-1, help="-1 = as the run was trained")
    parser.add_argument("--resize_size", type=int, default=-1, help="-1 = as the run was trained")
    parser.add_argument("images", nargs="+", help="JPEG or PNG files")
    args = parser.parse_args(argv)
    for path in args.images:  # fail before loading the checkpoint
        if not os.path.isfile(path):
            raise UserError(f"{path} does not exist")
    classifier = load_classifier(
        args.workdir or args.checkpoint,
        image_size=args.image_size,
        resize_size=args.resize_size,
        flag="--workdir" if args.workdir else "--checkpoint",
    )
    results = classify(classifier, args.images, crops=args.crops, top=args.top)
    for path, top in zip(args.images, results):
        print(path)
        for rank, (name, probability) in enumerate(top, start=1):
            print(f"  {rank}. {100 * probability:6.2f}%  {name}")
    return 0


if __name__ == "__main__":
    cli.run(main)
