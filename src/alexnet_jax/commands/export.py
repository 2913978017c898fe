"""Export a trained model to PyTorch (a torchvision AlexNet state dict) or to ONNX.

    python -m alexnet_jax.commands.export --workdir=runs/tv --to=torchvision --out=alexnet.pth
    python -m alexnet_jax.commands.export --checkpoint=weights/torchvision_alexnet --to=onnx --out=alexnet.onnx

torchvision: a state dict that `torchvision.models.alexnet(num_classes=N)` loads
with strict=True. It takes torchvision's own input (RGB in [0, 1], normalised by
the ImageNet mean/std); a run trained on the paper's raw pixels has that scale
folded into conv1, which is exact (raw = 255 * std * standardised, per channel,
and conv1's zero padding is zero in both). The paper variant has no torchvision
counterpart (LRN, two towers) and is refused.

onnx: jax2onnx traces model.apply itself, so the file takes what the model takes:
uint8 RGB pixels [batch, S, S, 3] at the run's image size, scaled inside as the
run was trained, and returns logits [batch, num_classes]. Its metadata_props
carry the class names and the preprocessing (metadata()).

Each file is checked before it is written: onnxruntime (or torchvision) runs it on
probe images and must give our logits to PARITY_TOLERANCE of their scale. Needs
requirements-extras.txt (pip install -r requirements-extras.txt).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import io
import json
import logging
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from alexnet_jax import cli
from alexnet_jax.checkpointing import checkpoint, runinfo, trained
from alexnet_jax.commands import convert
from alexnet_jax.errors import UserError
from alexnet_jax.model import alexnet as model_lib
from alexnet_jax.model import preprocess

INSTALL = "pip install -r requirements-extras.txt"
TARGETS = ("torchvision", "onnx")
SUFFIXES = {"torchvision": (".pth", ".pt"), "onnx": (".onnx",)}
# Opset 17 (2022): runs on onnxruntime >= 1.12 and most other runtimes; AlexNet needs nothing newer.
ONNX_OPSET = 17
METADATA_FORMAT = 1
# The exported file must give our logits to this fraction of their largest magnitude.
PARITY_TOLERANCE = 1e-4
PROBE_IMAGES = 2


@dataclasses.dataclass(frozen=True)
class Parity:
    """How closely an exported file reproduces our logits on the same pixels."""

    max_abs_diff: float
    logit_scale: float  # max |our logit|
    same_top1: bool

    @property
    def relative(self) -> float:
        return self.max_abs_diff / max(self.logit_scale, 1e-30)

    @property
    def ok(self) -> bool:
        return self.relative <= PARITY_TOLERANCE and self.same_top1

    def __str__(self) -> str:
        return f"max |diff| {self.max_abs_diff:.3g} at logit scale {self.logit_scale:.3g} ({self.relative:.2g})"


def parity(ours: np.ndarray, theirs: np.ndarray) -> Parity:
    ours, theirs = np.asarray(ours, np.float32), np.asarray(theirs, np.float32)
    if ours.shape != theirs.shape:
        raise ValueError(f"logits of shape {theirs.shape}, expected {ours.shape}")
    return Parity(
        max_abs_diff=float(np.abs(ours - theirs).max()),
        logit_scale=float(np.abs(ours).max()),
        same_top1=bool(np.array_equal(ours.argmax(-1), theirs.argmax(-1))),
    )


def our_logits(model: trained.TrainedModel, images: np.ndarray) -> np.ndarray:
    """uint8 [N, S, S, 3] -> float32 logits [N, num_classes], as evaluation computes them."""
    module = model.module()
    return np.asarray(jax.jit(lambda p, x: module.apply({"params": p}, x, train=False))(model.params, images))


def probe_images(model: trained.TrainedModel, count: int = PROBE_IMAGES) -> np.ndarray:
    """Fixed uint8 pixels [count, S, S, 3] for the check before writing (the tests use real photos)."""
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (count, model.image_size, model.image_size, 3), dtype=np.uint8)


def without_triton() -> None:
    """Keep torch from loading triton in this process, which has TensorFlow loaded (cli.run loads it).

    PyPI's Linux torch brings triton, torch.compile's GPU code generator; importing torchvision
    imports torch._dynamo, which imports triton, and triton's LLVM beside TensorFlow's segfaults
    the process (seen with torch 2.14.1 and TensorFlow 2.21). Export never compiles with torch;
    torch treats a triton that cannot be imported as absent.
    """
    if "triton" not in sys.modules:
        sys.modules["triton"] = None  # `import triton` raises ImportError, which torch expects


def _require(module: str, purpose: str) -> Any:
    if module.split(".")[0] in ("torch", "torchvision"):
        without_triton()
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{purpose} needs {module}, which is not installed: {INSTALL}") from None
    except (OSError, RuntimeError) as error:  # e.g. a torchvision built for another torch
        first_line = str(error).splitlines()[0] if str(error) else ""
        raise UserError(
            f"{purpose} needs {module}, which does not import here ({type(error).__name__}: {first_line}): {INSTALL}"
        ) from None


# --- torchvision -----------------------------------------------------------------


def torchvision_state_dict(model: trained.TrainedModel) -> dict[str, np.ndarray]:
    """The state dict (numpy) that torchvision's AlexNet loads, for torchvision's input scaling."""
    _refuse_paper(model.variant)
    state_dict = convert.to_torchvision(model.params)
    if model.input_scale == "raw":
        # raw = pixel - 255 * mean = (255 * std) * standardised: fold 255 * std into conv1's input channels.
        fold = 255.0 * np.asarray(preprocess.STDDEV_RGB, np.float64)  # [3]
        weight = state_dict["features.0.weight"].astype(np.float64)  # [out, 3, 11, 11]
        state_dict["features.0.weight"] = (weight * fold[None, :, None, None]).astype(np.float32)
    elif model.input_scale != "standardized":
        raise ValueError(f"unknown input_scale {model.input_scale!r}")
    return state_dict


def torchvision_input(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC pixels -> what torchvision's AlexNet takes: ToTensor + Normalize(ImageNet), NCHW float32."""
    mean = np.asarray(preprocess.MEAN_RGB, np.float32)
    stddev = np.asarray(preprocess.STDDEV_RGB, np.float32)
    standardised = (images.astype(np.float32) / 255.0 - mean) / stddev
    return np.ascontiguousarray(standardised.transpose(0, 3, 1, 2))


def check_torchvision(state_dict: dict[str, np.ndarray], model: trained.TrainedModel, images: np.ndarray) -> Parity:
    """Load into torchvision.models.alexnet(num_classes=N) with strict=True and compare logits."""
    torch = _require("torch", "--to=torchvision")
    torchvision = _require("torchvision", "checking the exported state dict")
    network = torchvision.models.alexnet(weights=None, num_classes=model.num_classes)
    network.load_state_dict({name: torch.from_numpy(array) for name, array in state_dict.items()}, strict=True)
    network.eval()
    with torch.no_grad():
        theirs = network(torch.from_numpy(torchvision_input(images))).numpy()
    return parity(our_logits(model, images), theirs)


def write_torchvision(model: trained.TrainedModel, out: str) -> Parity:
    torch = _require("torch", "--to=torchvision")
    state_dict = torchvision_state_dict(model)
    result = check_torchvision(state_dict, model, probe_images(model))
    _refuse_mismatch(result, "torchvision's AlexNet")
    _write_atomically(out, lambda path: torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, path))
    return result


def _refuse_paper(variant: str | None) -> None:
    if variant == "paper":
        raise UserError(
            "the paper variant has no torchvision counterpart: torchvision's AlexNet has no local response "
            "normalisation, no two-tower (grouped) conv2/conv4/conv5 and other layer widths; export it with --to=onnx"
        )


# --- ONNX ------------------------------------------------------------------------


def metadata(model: trained.TrainedModel) -> dict[str, str]:
    """The ONNX file's metadata_props: what a runtime needs to feed it and read its output (all strings)."""
    names = list(model.class_names or [])
    names += [f"class {index}" for index in range(len(names), model.num_classes)]
    props = {
        "alexnet_jax.format": str(METADATA_FORMAT),
        "variant": model.variant,
        "num_classes": str(model.num_classes),
        "class_names": json.dumps(names[: model.num_classes]),
        "input": f"images: uint8 RGB pixels [batch, {model.image_size}, {model.image_size}, 3] (NHWC)",
        "output": f"logits: float32 [batch, {model.num_classes}] (before the softmax)",
        "image_size": str(model.image_size),
        "resize_size": str(model.resize_size),
        "resize_method": model.resize_method,
        "crop": "center",
        "preprocessing": (
            f"resize the shorter side to {model.resize_size} ({model.resize_method}), take the centre "
            f"{model.image_size}x{model.image_size} crop, feed uint8 RGB; the model scales the pixels itself"
        ),
        "input_scale": model.input_scale,
    }
    if model.step is not None:
        props["step"] = str(model.step)
    return props


def onnx_model(model: trained.TrainedModel, *, opset: int = ONNX_OPSET) -> Any:
    """An onnx.ModelProto of model.apply (inference): uint8 [batch, S, S, 3] -> logits [batch, num_classes]."""
    with _quiet_exporter():
        jax2onnx = _require("jax2onnx", "--to=onnx")
    onnx = _require("onnx", "--to=onnx")
    module = model.module()  # the lax implementations: plain convolutions and max-pools
    params = model.params

    def logits(images: jax.Array) -> jax.Array:
        return module.apply({"params": params}, images, train=False)

    images = jax.ShapeDtypeStruct(("batch", model.image_size, model.image_size, 3), jnp.uint8)
    with _quiet_exporter():
        proto = jax2onnx.to_onnx(
            logits,
            [images],
            model_name=f"alexnet_{model.variant}",
            opset=opset,
            input_names=["images"],
            output_names=["logits"],
        )
    proto.producer_name = "alexnet_jax"
    proto.doc_string = f"AlexNet ({model.variant} variant), {model.num_classes} classes: " + metadata(model)["input"]
    onnx.helper.set_model_props(proto, metadata(model))
    return proto


@contextlib.contextmanager
def _quiet_exporter():
    """jax2onnx prints debugging lines to stdout and logs (with tracebacks) every optional plugin it
    cannot import (equinox, dm-pix, ...); none of that concerns an AlexNet export. Its errors still raise."""
    loggers = [logging.getLogger(name) for name in ("jax2onnx", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def check_onnx(serialized: bytes, model: trained.TrainedModel, images: np.ndarray) -> Parity:
    """Run the serialized model in onnxruntime (CPU) and compare its logits with ours."""
    onnxruntime = _require("onnxruntime", "checking the exported ONNX model")
    session = onnxruntime.InferenceSession(serialized, providers=["CPUExecutionProvider"])
    (theirs,) = session.run(["logits"], {"images": images})
    return parity(our_logits(model, images), theirs)


def write_onnx(model: trained.TrainedModel, out: str) -> Parity:
    serialized = onnx_model(model).SerializeToString()
    result = check_onnx(serialized, model, probe_images(model))
    _refuse_mismatch(result, "onnxruntime")

    def write(path: str) -> None:
        with open(path, "wb") as handle:
            handle.write(serialized)

    _write_atomically(out, write)
    return result


# --- The command line ------------------------------------------------------------


def _refuse_mismatch(result: Parity, runtime: str) -> None:
    if not result.ok:  # an exporter bug, not the user's: keep the traceback, write nothing
        raise RuntimeError(f"{runtime} does not reproduce our logits ({result}); nothing was written")


def _write_atomically(out: str, write) -> None:
    temporary = out + ".partial"
    try:
        write(temporary)
        os.replace(temporary, out)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def check_out(out: str, target: str) -> str:
    """The absolute output path, refused before any work if it would overwrite or has the wrong suffix."""
    out = os.path.abspath(os.path.expanduser(out))
    if not out.endswith(SUFFIXES[target]):
        raise UserError(f"--out={out}: name a --to={target} file {' or '.join(SUFFIXES[target])}")
    if os.path.exists(out):
        raise UserError(f"{out} already exists; choose another --out or delete it")
    parent = os.path.dirname(out)
    if not os.path.isdir(parent):
        raise UserError(f"{parent} is not a directory; create it or choose another --out")
    return out


def _refuse_other_widths(path: str) -> None:
    """torchvision's AlexNet has 4096 units in fc6 and fc7; a run trained with other config.hidden_units cannot load."""
    if not checkpoint.is_workdir(path):
        return  # a converted checkpoint came from torchvision's own widths
    recorded = ((runinfo.read_run_info(path) or {}).get("config") or {}).get("hidden_units", model_lib.HIDDEN_UNITS)
    if recorded != model_lib.HIDDEN_UNITS:
        raise UserError(
            f"{path} was trained with config.hidden_units={recorded}; torchvision's AlexNet has "
            f"{model_lib.HIDDEN_UNITS} (fc6, fc7), so its state dict cannot hold these weights; "
            "export it with --to=onnx"
        )


def recorded_variant(path: str) -> str | None:
    """The variant a workdir's config.json or a converted checkpoint's model.json names, without loading params."""
    if checkpoint.is_converted(path):
        with open(os.path.join(path, checkpoint.MODEL_FILE)) as handle:
            return json.load(handle).get("model")
    if checkpoint.is_workdir(path):
        return (runinfo.read_run_info(path) or {}).get("model")
    return None


@cli.command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m alexnet_jax.commands.export", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", help="a run's directory: its newest checkpoint and config.json")
    source.add_argument("--checkpoint", help="a converted checkpoint (python -m alexnet_jax.commands.convert)")
    parser.add_argument("--to", required=True, choices=TARGETS, help="torchvision: a .pth state dict; onnx: a .onnx")
    parser.add_argument("--out", required=True, help="the file to write (never overwritten)")
    parser.add_argument("--image_size", type=int, default=-1, help="ONNX input side; -1 = as the run was trained")
    args = parser.parse_args(argv)
    path = trained.check_path(args.workdir or args.checkpoint, flag="--workdir" if args.workdir else "--checkpoint")
    out = check_out(args.out, args.to)
    if args.to == "torchvision":  # refused before the weights are read
        _refuse_paper(recorded_variant(path))
        _refuse_other_widths(path)
        _require("torch", "--to=torchvision")
        _require("torchvision", "checking the exported state dict")
    else:
        with _quiet_exporter():
            _require("jax2onnx", "--to=onnx")
    model = trained.load(path, image_size=args.image_size)
    writer = write_torchvision if args.to == "torchvision" else write_onnx
    result = writer(model, out)
    what = f"{model.variant} AlexNet, {model.num_classes} classes"
    if args.to == "torchvision":
        print(f"wrote {out}: torchvision.models.alexnet(num_classes={model.num_classes}) state dict ({what})")
        print(
            f"  input: shorter side to {model.resize_size} ({model.resize_method}), centre {model.image_size} crop, "
            "ToTensor + Normalize(ImageNet mean/std)"
        )
    else:
        print(f"wrote {out}: ONNX opset {ONNX_OPSET}, {what}; {metadata(model)['input']}")
    print(f"  checked on {PROBE_IMAGES} probe images: {result}")
    return 0


if __name__ == "__main__":
    cli.run(main)
