"""The full set of config keys with their defaults, and the checks run before any compilation.

Config files in configs/ start from `base_config()` and override what they need,
so every key exists in every config and `--config.KEY=VALUE` works for all of them.
"""

from __future__ import annotations

import ml_collections

from alexnet_jax import model as model_lib
from alexnet_jax import optim
from alexnet_jax.errors import UserError

BUILTIN_DATASETS = ("image_folder", "demo_digits")


def base_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # Data.
    config.dataset = "imagenet2012"  # a TFDS name, "image_folder" or "demo_digits"
    config.data_dir = ""  # TFDS data_dir, or the image folder's root; "" = the default
    config.manual_dir = ""  # where the ILSVRC tars lie for imagenet2012; "" = TFDS default
    config.train_split = "train"
    config.eval_split = "validation"
    config.download = False  # let TFDS download a dataset that is not prepared yet
    config.num_classes = -1  # -1 = from the dataset
    config.image_size = 224
    config.resize_size = -1  # shorter side before cropping; -1 = image_size * 256 / 224
    config.resize_method = "bilinear"  # crop -> image_size: "bilinear" (fast) or "area" (antialiased)
    config.random_flip = True
    config.pca_noise_std = 0.1  # the paper's colour jitter; 0 turns it off
    config.eval_crops = 1  # 1 = centre crop
    config.skip_bad_images = False  # image folders: drop (and log) truncated or non-image files instead of stopping
    # Model.
    config.model = "paper"  # "paper" or "torchvision"
    config.init = "paper"  # "paper" or "modern"
    config.dropout_rate = 0.5
    config.dtype = "float32"  # compute dtype; parameters stay float32
    config.init_from = ""  # a converted checkpoint (python -m alexnet_jax.convert) or a run's workdir
    # Optimisation.
    config.optimizer = "sgd"  # "sgd" (the paper's) or "lars" (large batches)
    config.lars_trust_coefficient = 0.001
    config.parallelism = "pmap"  # "pmap" or "shard_map" (jax.jit(jax.shard_map(...)) over a mesh)
    config.batch_size = 128  # global, over all devices and processes
    config.eval_batch_size = -1  # -1 = batch_size
    config.learning_rate = 0.01
    config.lr_scaling = "none"  # "none" or "linear" (lr * batch_size / lr_base_batch_size)
    config.lr_base_batch_size = 256
    config.momentum = 0.9
    config.nesterov = False
    config.weight_decay = 5e-4
    config.schedule = "step"  # "step", "cosine" or "constant"
    config.lr_drop_epochs = (30, 60, 80)
    config.lr_drop_factor = 0.1
    config.warmup_epochs = 0.0
    config.num_epochs = 90.0
    config.num_train_steps = -1  # > 0 overrides num_epochs
    # Loop.
    config.seed = 0
    config.log_every_steps = 100
    config.eval_every_steps = -1  # -1 = once an epoch
    config.checkpoint_every_steps = -1  # -1 = once an epoch
    config.keep_checkpoints = 3
    config.prefetch_to_device = 2
    return config


def validate(config: ml_collections.ConfigDict, *, device_count: int, process_count: int = 1) -> None:
    """Reject impossible settings with a message that says what to do.

    Runs before any data is read or anything is compiled.
    """

    def fail(message: str) -> None:
        raise UserError(message)

    if config.model not in model_lib.VARIANTS:
        fail(f"config.model={config.model!r} is not an AlexNet variant; use one of {model_lib.VARIANTS}")
    if config.init not in model_lib.INITS:
        fail(f"config.init={config.init!r} is unknown; use one of {model_lib.INITS}")
    if config.dtype not in ("float32", "bfloat16", "float16"):
        fail(f"config.dtype={config.dtype!r} is unknown; use float32, bfloat16 or float16")
    if config.schedule not in optim.SCHEDULES:
        fail(f"config.schedule={config.schedule!r} is unknown; use one of {optim.SCHEDULES}")
    if config.optimizer not in optim.OPTIMIZERS:
        fail(f"config.optimizer={config.optimizer!r} is unknown; use one of {optim.OPTIMIZERS}")
    if config.parallelism not in ("pmap", "shard_map"):
        fail(f"config.parallelism={config.parallelism!r} is unknown; use 'pmap' or 'shard_map'")
    if config.parallelism == "shard_map" and process_count > 1:
        fail("config.parallelism='shard_map' runs in a single process so far; use 'pmap' for multi-process runs")
    if config.lr_scaling not in ("none", "linear"):
        fail(f"config.lr_scaling={config.lr_scaling!r} is unknown; use 'none' or 'linear'")
    minimum = model_lib.min_image_size()
    if config.image_size < minimum:
        fail(
            f"config.image_size={config.image_size} is too small for AlexNet's three 3x3/2 "
            f"poolings; use at least {minimum}"
        )
    if config.resize_size != -1 and config.resize_size < config.image_size:
        fail(
            f"config.resize_size={config.resize_size} is smaller than image_size={config.image_size}; "
            "use -1 (the paper's 256/224 ratio) or a size >= image_size"
        )
    for key in ("batch_size", "learning_rate", "log_every_steps"):
        if config[key] <= 0:
            fail(f"config.{key}={config[key]} must be positive")
    if config.num_train_steps <= 0 and config.num_epochs <= 0:
        fail("set config.num_epochs > 0 or config.num_train_steps > 0: there is nothing to train")
    for key in ("eval_every_steps", "checkpoint_every_steps", "eval_batch_size", "num_classes"):
        if config[key] == 0 or config[key] < -1:
            fail(f"config.{key}={config[key]} must be positive, or -1 for the default")
    for key in ("batch_size", "eval_batch_size"):
        if config[key] > 0 and config[key] % device_count:
            fail(
                f"config.{key}={config[key]} is not divisible by the {device_count} devices of this run; "
                f"use a multiple of {device_count}"
            )
    if config.resize_method not in ("bilinear", "area"):
        fail(f"config.resize_method={config.resize_method!r} is unknown; use 'bilinear' or 'area'")
    if config.eval_crops not in (1, 10):
        fail(f"config.eval_crops={config.eval_crops} is unsupported; use 1 (centre) or 10 (the paper's test)")
    if not 0.0 <= config.dropout_rate < 1.0:
        fail(f"config.dropout_rate={config.dropout_rate} must lie in [0, 1)")
    if config.dataset == "image_folder" and not config.data_dir:
        fail(
            "config.dataset='image_folder' needs config.data_dir=ROOT holding train/<class>/* and validation/<class>/*"
        )


def resize_size(config: ml_collections.ConfigDict) -> int:
    if config.resize_size > 0:
        return config.resize_size
    return int(round(config.image_size * 256 / 224))
