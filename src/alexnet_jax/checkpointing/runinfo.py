"""What a run was trained on, saved next to its checkpoints, and ImageNet's class names.

Checkpoints hold arrays; predicting, finding neighbours or fine-tuning also
needs the class names, the input size and where the validation images are.
training/loop.py writes them once at the start of a run as WORKDIR/config.json:

    {
      "format": 1,
      "dataset": "image_folder",         # config.dataset
      "data_dir": "/data/flowers",       # config.data_dir
      "eval_split": "validation",        # config.eval_split
      "image_size": 224,                 # crop side the model saw
      "resize_size": 256,                # shorter side before cropping (config.resize_size resolved)
      "input_scale": "raw",              # how pixels became model input (config.input_scale resolved)
      "model": "paper",                  # AlexNet variant
      "num_classes": 5,                  # fc8 width (may exceed len(class_names))
      "class_names": ["daisy", ...],     # label i -> name (TFDS ClassLabel or folder names)
      "config": {...}                    # the whole config, for the record
    }

No TensorFlow here: the model-side tools import this module.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
from functools import cache
from pathlib import Path
from typing import Any

from alexnet_jax import paths
from alexnet_jax.errors import UserError

RUN_INFO_FILE = "config.json"
RUN_INFO_FORMAT = 1

# TFDS ships the 1,000 ImageNet synsets (its ClassLabel names, sorted, the same
# order as torchvision's classes) and, for its SI-Score dataset, their readable
# names in the same order. Both are plain files inside the installed package.
_TFDS_SYNSETS = ("datasets", "imagenet2012", "labels.txt")
_TFDS_READABLE = ("datasets", "siscore", "labels.py")


def write_run_info(
    workdir: str,
    config: Any,
    class_names: tuple[str, ...] | list[str],
    *,
    num_classes: int,
    resize_size: int,
    input_scale: str,
    process_count: int = 1,
) -> str:
    """Write WORKDIR/config.json (atomically). Returns its path.

    config: the run's ConfigDict; num_classes, resize_size and input_scale: the values
    the run resolved (config may say -1 or "auto"). The caller decides which process
    writes (the primary one: train.RunPlan.is_primary).
    """
    record = {
        "format": RUN_INFO_FORMAT,
        "dataset": config.dataset,
        "data_dir": config.data_dir,
        "eval_split": config.eval_split,
        "image_size": int(config.image_size),
        "resize_size": int(resize_size),
        "input_scale": input_scale,
        "model": config.model,
        "num_classes": int(num_classes),
        "class_names": [str(name) for name in class_names],
        "process_count": int(process_count),  # the data order depends on it (a resume compares it)
        "config": json.loads(config.to_json_best_effort()),
    }
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, RUN_INFO_FILE)
    temporary = path + ".tmp"
    with open(temporary, "w") as handle:
        json.dump(record, handle, indent=1)
    os.replace(temporary, path)
    return path


def read_run_info(workdir: str) -> dict[str, Any] | None:
    """WORKDIR/config.json as a dict, or None for a run that predates it."""
    path = os.path.join(workdir, RUN_INFO_FILE)
    if not os.path.exists(path):
        return None
    fix = "restore it, or delete it and resume the run with launch.py, which writes it again"
    record = paths.read_json(path, fix=fix)
    if record.get("format") != RUN_INFO_FORMAT:
        raise UserError(f"{path} has format {record.get('format')!r}; this version reads format {RUN_INFO_FORMAT}")
    return record


def _tfds_file(parts: tuple[str, ...]) -> Path:
    # find_spec locates the package without importing it (and TensorFlow with it).
    spec = importlib.util.find_spec("tensorflow_datasets")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("ImageNet class names come from tensorflow-datasets: pip install tensorflow-datasets")
    path = Path(spec.submodule_search_locations[0]).joinpath(*parts)
    if not path.is_file():
        raise UserError(f"this tensorflow-datasets lacks {path}; install tensorflow-datasets>=4.9.10")
    return path


@cache
def imagenet_synsets() -> tuple[str, ...]:
    """The 1,000 ILSVRC-2012 WordNet ids in label order (n01440764 ... n15075141)."""
    lines = _tfds_file(_TFDS_SYNSETS).read_text().split()
    return tuple(line.strip() for line in lines if line.strip())


@cache
def imagenet_readable_names() -> tuple[str, ...]:
    """Readable names in label order ("tench, Tinca tinca", ...), read as data, never executed."""
    tree = ast.parse(_tfds_file(_TFDS_READABLE).read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "IMAGENET_LABELS_LIST" for t in node.targets):
            names = tuple(ast.literal_eval(node.value))
            if len(names) == 1000:
                return names
    raise UserError("tensorflow-datasets' ImageNet label list was not found; install tensorflow-datasets>=4.9.10")


def display_names(class_names: list[str] | tuple[str, ...] | None, num_classes: int) -> list[str]:
    """One printable name per output unit: ImageNet synsets get their readable names."""
    names = list(class_names or [])
    if names:
        try:
            readable = dict(zip(imagenet_synsets(), imagenet_readable_names()))
        except UserError:
            readable = {}
        names = [f"{readable[name]} ({name})" if name in readable else name for name in names]
    return names + [f"class {index}" for index in range(len(names), num_classes)]


def resize_method(record: dict[str, Any] | None) -> str:
    """How a run's crop windows were resized (config.resize_method), for evaluating it alike.

    record: a run's config.json or a converted checkpoint's model.json. Runs recorded
    before the key existed shrank with an area filter, and converted torchvision
    weights expect an antialiased shrink (PIL's): both get "area".
    """
    config = (record or {}).get("config") or {}
    return str(config.get("resize_method", "area"))


def input_scale(record: dict[str, Any] | None) -> str:
    """How a run's (or converted weights') uint8 pixels became model input (preprocess.INPUT_SCALES).

    Recorded since the paper's raw scale exists; every record from before used the
    ImageNet mean/std standardisation, and so keeps it.
    """
    from alexnet_jax.model import preprocess

    return str((record or {}).get("input_scale") or preprocess.LEGACY_INPUT_SCALE)


def model_record(info: dict[str, Any] | None) -> dict[str, Any]:
    """What config.json says about the model's input and outputs (the keys trained.load reads)."""
    info = info or {}
    keys = ("class_names", "image_size", "resize_size", "input_scale", "num_classes")
    return {key: info[key] for key in keys if info.get(key) is not None}
