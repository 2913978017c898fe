"""One loader for a trained model: a run's workdir or a converted checkpoint -> `TrainedModel`.

Everything that uses trained weights (evaluate, predict, neighbors, init_from) loads
them here, so every consumer feeds the model exactly as it was trained: the same
crop and resize sizes, resize filter and input scale. The on-disk layouts are
checkpoint.py's; what a run was trained on is runinfo.py's. No TensorFlow.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from alexnet_jax import paths
from alexnet_jax.checkpointing import checkpoint, runinfo
from alexnet_jax.errors import UserError
from alexnet_jax.model import alexnet as model_lib
from alexnet_jax.model import build

log = logging.getLogger(__name__)

# Where a record does not say (converted weights without sizes): torchvision's 224/256.
DEFAULT_IMAGE_SIZE = 224


@dataclasses.dataclass(frozen=True)
class TrainedModel:
    """Params plus everything needed to feed them as they were trained."""

    path: str
    params: Any  # host numpy arrays
    variant: str
    num_classes: int
    class_names: list[str] | None  # label i -> name, where known
    image_size: int
    resize_size: int
    resize_method: str  # runinfo.resize_method
    input_scale: str  # runinfo.input_scale
    eval_crops: int  # the run's config.eval_crops (1 where unknown)
    step: int | None  # the checkpoint's step (None for converted weights)
    run_info: dict[str, Any] | None  # WORKDIR/config.json; None for converted weights
    # build.architecture of the recorded config: activation, pooling, LRN, dropout and fc width as trained.
    architecture: dict[str, Any] = dataclasses.field(default_factory=lambda: build.architecture({}))

    def module(self, backward_impl: str = "lax") -> model_lib.AlexNet:
        """The network as it was trained (training/loop.py builds it with build.create_model from the same keys)."""
        return model_lib.AlexNet(
            variant=self.variant,
            num_classes=self.num_classes,
            input_scale=self.input_scale,
            backward_impl=backward_impl,
            **self.architecture,
        )

    @property
    def names(self) -> list[str]:
        """One printable name per output unit."""
        return runinfo.display_names(self.class_names, self.num_classes)

    @property
    def sizes(self) -> dict[str, Any]:
        """The preprocessing it was trained with: keyword arguments of augment.eval_images."""
        return dict(image_size=self.image_size, resize_size=self.resize_size, resize_method=self.resize_method)


def load(path: str, *, image_size: int = -1, resize_size: int = -1, flag: str = "--workdir") -> TrainedModel:
    """A run's workdir (its newest checkpoint's params) or a converted checkpoint.

    image_size / resize_size: -1 = as trained; a record without them gets 224 and
    the paper's 256/224 ratio, with a warning. flag: how the user named `path`
    (--workdir, --checkpoint, config.init_from), for the one-line errors.
    """
    path = check_path(path, flag=flag)
    if checkpoint.is_converted(path):
        params, record = checkpoint.load_converted(path)
        info, step = None, None
    else:  # a run's workdir: check_path refused anything else
        params, record, step = checkpoint.load_run_params(path)
        info = runinfo.read_run_info(path)
        record = {**record, **runinfo.model_record(info)}
    image_size, resize_size = _sizes(path, record, image_size, resize_size)
    num_classes = int(record.get("num_classes") or params["fc8"]["bias"].shape[0])
    if not record.get("class_names"):
        log.warning("%s records no class names (no config.json): classes are shown by index", path)
    return TrainedModel(
        path=path,
        params=params,
        variant=record["model"],
        num_classes=num_classes,
        class_names=record.get("class_names"),
        image_size=image_size,
        resize_size=resize_size,
        resize_method=runinfo.resize_method(info if info is not None else record),
        input_scale=runinfo.input_scale(info if info is not None else record),
        eval_crops=int(((info or {}).get("config") or {}).get("eval_crops", 1)),
        step=step,
        run_info=info,
        architecture=build.architecture((info or {}).get("config") or {}),
    )


def check_path(path: str, *, flag: str = "--workdir") -> str:
    """Cheap checks of a weights path, before anything is loaded: a readable directory holding a
    converted checkpoint or a run, whose record file (model.json / config.json) is sound JSON.

    Returns the absolute path; the problems are UserErrors naming `flag`.
    """
    path = paths.readable_directory(path, flag=flag)
    if checkpoint.is_converted(path):
        checkpoint.read_converted_record(path)
    elif checkpoint.is_workdir(path):
        runinfo.read_run_info(path)
    else:
        raise UserError(
            f"{flag}={path} is neither a converted checkpoint (with {checkpoint.MODEL_FILE}) nor a run's workdir "
            "(with checkpoints/); make one with python -m alexnet_jax.commands.convert --pth=FILE --out=DIR"
        )
    return path


def _sizes(path: str, record: dict[str, Any], image_size: int, resize_size: int) -> tuple[int, int]:
    if image_size <= 0:
        image_size = int(record.get("image_size") or 0)
        if not image_size:
            log.warning(
                "%s records no input size (no config.json): using %d; pass --image_size to match training",
                path,
                DEFAULT_IMAGE_SIZE,
            )
            image_size = DEFAULT_IMAGE_SIZE
    if resize_size <= 0:
        resize_size = int(record.get("resize_size") or round(image_size * 256 / 224))
    if image_size < model_lib.min_image_size() or resize_size < image_size:
        raise UserError(
            f"image_size={image_size}, resize_size={resize_size}: need image_size >= "
            f"{model_lib.min_image_size()} and resize_size >= image_size"
        )
    return image_size, resize_size
