"""torchvision AlexNet weights -> Flax params, written as a converted checkpoint (and back: to_torchvision).

    python -m alexnet_jax.commands.convert --pth=alexnet-owt-7be5be79.pth --out=weights/torchvision_alexnet

The converted-checkpoint layout is checkpoint.py's (DIR/params/ and DIR/model.json);
trained.load reads it back for predict, neighbors, evaluate and init_from. torch is
imported only to read a .pth file (with weights_only=True, so a downloaded file
cannot run code); training never needs it.
"""

from __future__ import annotations

import argparse
import hashlib
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from alexnet_jax import cli, paths
from alexnet_jax.checkpointing import checkpoint, runinfo
from alexnet_jax.errors import UserError
from alexnet_jax.model import alexnet as model_lib

# torchvision's preprocessing: Resize(256), CenterCrop(224), ImageNet mean/std.
TORCHVISION_IMAGE_SIZE = 224
TORCHVISION_RESIZE_SIZE = 256
TORCHVISION_INPUT_SCALE = "standardized"


def _numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, converted without importing torch here
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=np.float32)


def expected_shapes(
    variant: str, num_classes: int, image_size: int = 224, hidden_units: int = model_lib.HIDDEN_UNITS
) -> dict[str, dict[str, tuple]]:
    """{layer: {"kernel": shape, "bias": shape}} of AlexNet(variant, num_classes), without allocating it."""
    module = model_lib.AlexNet(variant=variant, num_classes=num_classes, hidden_units=hidden_units)
    images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), images, train=False))
    return jax.tree_util.tree_map(lambda leaf: tuple(leaf.shape), abstract["params"])


def from_torchvision(state_dict: Mapping[str, Any]) -> dict[str, dict[str, np.ndarray]]:
    """torchvision AlexNet state dict -> params of AlexNet(variant="torchvision", num_classes=N).

    Conv weights go [out, in, kh, kw] -> [kh, kw, in, out]; linear [out, in] -> [in, out].
    Both models flatten the 256x6x6 features in C,H,W order, so fc6 needs no permutation.
    N is read from classifier.6. Missing, extra or misshapen tensors are errors.
    """
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
        state_dict = state_dict["state_dict"]
    wanted = {f"{prefix}.{kind}" for prefix in model_lib.TORCHVISION_NAMES.values() for kind in ("weight", "bias")}
    missing = sorted(wanted - set(state_dict))
    extra = sorted(set(state_dict) - wanted)
    if missing or extra:
        raise UserError(
            "not a torchvision AlexNet state dict: "
            + (f"missing {missing} " if missing else "")
            + (f"unexpected {extra[:8]}" if extra else "")
        )
    num_classes = int(np.shape(state_dict["classifier.6.weight"])[0])
    shapes = expected_shapes("torchvision", num_classes)
    params: dict[str, dict[str, np.ndarray]] = {}
    for layer, prefix in model_lib.TORCHVISION_NAMES.items():
        weight = _numpy(state_dict[f"{prefix}.weight"])
        bias = _numpy(state_dict[f"{prefix}.bias"])
        kernel = weight.transpose(2, 3, 1, 0) if weight.ndim == 4 else weight.T
        kernel = np.ascontiguousarray(kernel)
        for name, array in (("kernel", kernel), ("bias", bias)):
            if array.shape != shapes[layer][name]:
                raise UserError(
                    f"{prefix}: {name} converts to shape {array.shape}, but torchvision AlexNet "
                    f"with {num_classes} classes needs {shapes[layer][name]}"
                )
        params[layer] = {"kernel": kernel, "bias": bias}
    return params


def to_torchvision(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Params of AlexNet(variant="torchvision") -> torchvision's state dict (as numpy): from_torchvision inverted.

    Conv kernels go [kh, kw, in, out] -> [out, in, kh, kw]; dense [in, out] -> [out, in];
    the names are the same TORCHVISION_NAMES table, read the other way.
    """
    state_dict: dict[str, np.ndarray] = {}
    for layer, prefix in model_lib.TORCHVISION_NAMES.items():
        kernel = _numpy(params[layer]["kernel"])
        weight = kernel.transpose(3, 2, 0, 1) if kernel.ndim == 4 else kernel.T
        state_dict[f"{prefix}.weight"] = np.ascontiguousarray(weight)
        state_dict[f"{prefix}.bias"] = _numpy(params[layer]["bias"])
    return state_dict


def read_pth(path: str) -> Mapping[str, Any]:
    """A torch state dict from a .pth file, refusing pickled code (weights_only=True)."""
    try:
        import torch
    except ImportError:
        raise UserError("reading a .pth file needs PyTorch: pip install torch (only to convert)") from None
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist; pass the torchvision .pth file with --pth=FILE")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, ... for a bad file
        raise UserError(f"{path} is not a plain PyTorch state dict ({type(error).__name__}: {error})") from None


@cli.command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m alexnet_jax.commands.convert", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--pth", required=True, help="torchvision AlexNet state dict (.pth)")
    parser.add_argument("--out", required=True, help="directory for the converted checkpoint")
    parser.add_argument(
        "--class_names",
        default="imagenet2012",
        help="'imagenet2012' (TFDS's synsets, for 1000 classes), a text file with one name a line, or 'none'",
    )
    args = parser.parse_args(argv)
    paths.readable_file(args.pth, flag="--pth")
    paths.writable_directory(args.out, flag="--out")
    if os.path.exists(os.path.join(args.out, checkpoint.PARAMS_DIR)):
        raise UserError(
            f"{os.path.join(args.out, checkpoint.PARAMS_DIR)} already exists; choose another --out or delete it"
        )
    params = from_torchvision(read_pth(args.pth))
    num_classes = int(params["fc8"]["bias"].shape[0])
    class_names = _class_names(args.class_names, num_classes)
    with open(args.pth, "rb") as handle:
        digest = hashlib.sha256(handle.read()).hexdigest()
    record = {
        "model": "torchvision",
        "num_classes": num_classes,
        "image_size": TORCHVISION_IMAGE_SIZE,
        "resize_size": TORCHVISION_RESIZE_SIZE,
        "input_scale": TORCHVISION_INPUT_SCALE,
        "class_names": class_names,
        "source": {"file": os.path.basename(args.pth), "sha256": digest},
    }
    out = checkpoint.save_converted(args.out, params, record)
    print(f"wrote {out}: torchvision AlexNet, {num_classes} classes, {model_lib.count_params(params):,} parameters")
    return 0


def _class_names(spec: str, num_classes: int) -> list[str] | None:
    if spec == "none":
        return None
    if spec == "imagenet2012":
        return list(runinfo.imagenet_synsets()) if num_classes == 1000 else None
    with open(spec) as handle:
        names = [line.strip() for line in handle if line.strip()]
    if len(names) != num_classes:
        raise UserError(f"{spec} has {len(names)} names, but the weights have {num_classes} classes")
    return names


if __name__ == "__main__":
    cli.run(main)
