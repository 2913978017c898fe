"""torchvision AlexNet weights -> Flax params, and the converted-checkpoint format.

    python -m alexnet_jax.convert --pth=alexnet-owt-7be5be79.pth --out=weights/torchvision_alexnet

A converted checkpoint is a directory:

    DIR/params/      Orbax StandardSave of {"params": <Flax params of AlexNet(variant, num_classes)>}
    DIR/model.json   {"format": 1, "model": "torchvision", "num_classes": 1000,
                      "image_size": 224, "resize_size": 256,
                      "class_names": ["n01440764", ...],   # label i -> name; null if unknown
                      "source": {"file": "...", "sha256": "..."}}

`load_params(path)` reads one back, or the params of a run's newest checkpoint
when `path` is a workdir. torch is imported only to read a .pth file (with
weights_only=True, so a downloaded file cannot run code); training never needs it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from alexnet_jax import model as model_lib
from alexnet_jax import runinfo
from alexnet_jax.errors import UserError

log = logging.getLogger(__name__)

MODEL_FILE = "model.json"
PARAMS_DIR = "params"
FORMAT = 1
# torchvision's preprocessing: Resize(256), CenterCrop(224), ImageNet mean/std (as data/augment.py).
TORCHVISION_IMAGE_SIZE = 224
TORCHVISION_RESIZE_SIZE = 256


def _numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, converted without importing torch here
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=np.float32)


def expected_shapes(variant: str, num_classes: int, image_size: int = 224) -> dict[str, dict[str, tuple]]:
    """{layer: {"kernel": shape, "bias": shape}} of AlexNet(variant, num_classes), without allocating it."""
    module = model_lib.AlexNet(variant=variant, num_classes=num_classes)
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


def save_params(directory: str, params: Any, meta: dict[str, Any]) -> str:
    """Write a converted checkpoint (see the module docstring). Returns its absolute path."""
    directory = os.path.abspath(directory)
    params_dir = os.path.join(directory, PARAMS_DIR)
    if os.path.exists(params_dir):
        raise UserError(f"{params_dir} already exists; choose another --out or delete it")
    os.makedirs(directory, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(params_dir, {"params": jax.tree_util.tree_map(np.asarray, params)})
    checkpointer.wait_until_finished()
    checkpointer.close()
    record = {"format": FORMAT, **meta}
    with open(os.path.join(directory, MODEL_FILE), "w") as handle:
        json.dump(record, handle, indent=1)
    return directory


def _abstract(metadata_tree: Any) -> Any:
    # ShapeDtypeStructs without a sharding restore as host numpy arrays, on any device count.
    return jax.tree_util.tree_map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype), metadata_tree)


def _load_converted(directory: str) -> tuple[Any, dict[str, Any]]:
    with open(os.path.join(directory, MODEL_FILE)) as handle:
        meta = json.load(handle)
    if meta.get("format") != FORMAT:
        raise UserError(f"{directory}/{MODEL_FILE} has format {meta.get('format')!r}; this version reads {FORMAT}")
    checkpointer = ocp.StandardCheckpointer()
    params_dir = os.path.join(directory, PARAMS_DIR)
    target = _abstract(checkpointer.metadata(params_dir).item_metadata.tree)
    restored = checkpointer.restore(params_dir, target)
    checkpointer.close()
    return restored["params"], meta


def _load_run(workdir: str) -> tuple[Any, dict[str, Any]]:
    """Params of the newest checkpoint in WORKDIR/checkpoints (not the optimizer state)."""
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    if not os.path.isdir(directory):
        raise UserError(f"{workdir} has no checkpoints/ directory: train there first, or pass --checkpoint")
    manager = ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(read_only=True),
        item_handlers={"state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
    )
    try:
        step = manager.latest_step()
        if step is None:
            raise UserError(f"{directory} holds no finished checkpoint yet")
        state_tree = manager.item_metadata(step)["state"]
        state_tree = getattr(state_tree, "tree", state_tree)
        target = {"params": _abstract(state_tree["params"])}
        restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True),
                meta=ocp.args.JsonRestore(),
            ),
        )
    finally:
        manager.close()
    meta = dict(restored["meta"])
    info = runinfo.read_run_info(workdir) or {}
    params = restored["state"]["params"]
    meta.update(
        step=int(step),
        num_classes=int(meta.get("num_classes") or params["fc8"]["bias"].shape[0]),
        class_names=info.get("class_names"),
        image_size=info.get("image_size"),
        resize_size=info.get("resize_size"),
        run_info=info or None,
    )
    return params, meta


def load_params(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Flax params (host numpy arrays) and what they are, from a converted checkpoint or a run's workdir.

    meta always has "model" (the variant), "num_classes", "class_names" (list or None),
    "image_size" and "resize_size" (None where unknown); a workdir adds "step" and "run_info".
    """
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isfile(os.path.join(path, MODEL_FILE)):
        return _load_converted(path)
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return _load_run(path)
    raise UserError(
        f"{path} is neither a converted checkpoint (with {MODEL_FILE}) nor a run's workdir (with checkpoints/); "
        "make one with python -m alexnet_jax.convert --pth=FILE --out=DIR"
    )


def init_params_from(path: str, params: Any, variant: str) -> Any:
    """Start a run from pretrained weights: `params` (a fresh init) with every layer of `path` copied in.

    fc8 is kept from `params` when the class counts differ (fine-tuning on another
    dataset); any other mismatch is an error. Returns numpy/jax arrays shaped as `params`.
    """
    loaded, meta = load_params(path)
    if meta.get("model") != variant:
        raise UserError(
            f"{path} holds a {meta.get('model')!r} AlexNet, but config.model={variant!r}; set --config.model="
            f"{meta.get('model')}"
        )
    merged = {}
    for layer, leaves in params.items():
        source = loaded.get(layer)
        shapes_match = source is not None and all(np.shape(source[name]) == np.shape(leaves[name]) for name in leaves)
        if shapes_match:
            merged[layer] = {name: jnp.asarray(source[name], leaves[name].dtype) for name in leaves}
        elif layer == "fc8":
            log.info("init_from %s: fc8 has other classes, so it keeps its fresh initialisation", path)
            merged[layer] = leaves
        else:
            raise UserError(f"{path}: layer {layer} does not fit this model ({variant}); use a matching config")
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m alexnet_jax.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pth", required=True, help="torchvision AlexNet state dict (.pth)")
    parser.add_argument("--out", required=True, help="directory for the converted checkpoint")
    parser.add_argument(
        "--class_names",
        default="imagenet2012",
        help="'imagenet2012' (TFDS's synsets, for 1000 classes), a text file with one name a line, or 'none'",
    )
    args = parser.parse_args(argv)
    try:
        if os.path.exists(os.path.join(args.out, PARAMS_DIR)):
            raise UserError(f"{os.path.join(args.out, PARAMS_DIR)} already exists; choose another --out or delete it")
        params = from_torchvision(read_pth(args.pth))
        num_classes = int(params["fc8"]["bias"].shape[0])
        class_names = _class_names(args.class_names, num_classes)
        with open(args.pth, "rb") as handle:
            digest = hashlib.sha256(handle.read()).hexdigest()
        meta = {
            "model": "torchvision",
            "num_classes": num_classes,
            "image_size": TORCHVISION_IMAGE_SIZE,
            "resize_size": TORCHVISION_RESIZE_SIZE,
            "class_names": class_names,
            "source": {"file": os.path.basename(args.pth), "sha256": digest},
        }
        out = save_params(args.out, params, meta)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
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
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s", force=True)
    logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax's notes on read-only directories
    sys.exit(main())
