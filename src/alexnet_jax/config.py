"""The full set of config keys with their defaults, and the checks run before any compilation.

Config files in configs/ start from `base_config()` and override what they need,
so every key exists in every config and `--config.KEY=VALUE` works for all of them.
"""

from __future__ import annotations

import re

import ml_collections

from alexnet_jax.data.choices import EVAL_CROPS, RESIZE_METHODS
from alexnet_jax.errors import UserError
from alexnet_jax.model import alexnet as model_lib
from alexnet_jax.model import build
from alexnet_jax.parallel import accelerators
from alexnet_jax.step import optim, steps

_PROFILE_STEPS = re.compile(r"(\d+)(?:-(\d+))?")
HEARTBEAT_MARGIN_S = 10  # JAX's heartbeat must leave the watchdog this long to stop the job first


def base_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    for add_keys in (_data_keys, _model_keys, _optimisation_keys, _loop_keys):
        add_keys(config)
    return config


def _data_keys(config: ml_collections.ConfigDict) -> None:
    """What is read and how it is cropped."""
    # A TFDS name, "image_folder", "packed" (made by python -m alexnet_jax.commands.pack) or "demo_digits".
    config.dataset = "imagenet2012"
    config.data_dir = ""  # TFDS data_dir, or the image folder's root; "" = the default
    config.manual_dir = ""  # where the ILSVRC tars lie for imagenet2012; "" = TFDS default
    config.train_split = "train"
    config.eval_split = "validation"
    config.download = False  # let TFDS download a dataset that is not prepared yet
    # A TFDS dataset prepared as TFRecord (before ArrayRecord became the default): True copies it
    # once to ArrayRecord beside it, which resumes in constant time and shuffles whole epochs.
    config.convert_to_array_record = False
    config.num_classes = -1  # -1 = from the dataset
    config.image_size = 224
    config.resize_size = -1  # shorter side before cropping; -1 = image_size * 256 / 224
    config.resize_method = "bilinear"  # crop -> image_size: "bilinear" (fast) or "area" (antialiased)
    config.random_flip = True
    config.pca_noise_std = 0.1  # the paper's colour jitter; 0 turns it off
    config.eval_crops = 1  # 1 = centre crop, 10 = the paper's test (four corners, centre, mirrored)
    config.skip_bad_images = False  # image folders: drop (and log) truncated or non-image files instead of stopping


def _model_keys(config: ml_collections.ConfigDict) -> None:
    """The network and how it is computed."""
    config.model = "paper"  # "paper" or "torchvision"
    config.init = "paper"  # "paper" or "modern"
    config.dropout_rate = 0.5  # paper variant: on fc6/fc7 outputs, x(1 - rate) at test; torchvision: inverted
    # How uint8 pixels become model input: "raw" (the paper's centred 0-255 values),
    # "standardized" (ImageNet mean/std, torchvision's) or "auto": the variant's own
    # (raw for paper, standardized for torchvision), or what a resumed run or
    # init_from weights were trained with.
    config.input_scale = "auto"
    # How convolutions and max-pools are differentiated: "fast" (hand-written, faster on
    # XLA:CPU), "lax" (XLA's autodiff) or "auto" (fast on the CPU backend, lax elsewhere).
    config.backward_impl = "auto"
    config.dtype = "float32"  # compute dtype; parameters stay float32
    # GPU speed levers (bench/gpu.sh times each setting). How the paper variant's two-tower
    # convolutions run: "grouped" (one feature_group_count=2 convolution) or "split" (two
    # convolutions over the channel halves); same parameters and checkpoints either way.
    config.group_conv = "grouped"
    # The LRN band matmul's precision: "highest", "high" or "default" (model.LRN_PRECISION_RTOL).
    config.lrn_precision = "highest"
    # The dropout keys' implementation: "threefry" (JAX's default), "rbg" or "unsafe_rbg";
    # each resumes exactly, but they draw different masks.
    config.prng_impl = "threefry"
    config.init_from = ""  # a converted checkpoint (python -m alexnet_jax.commands.convert) or a run's workdir
    # The paper's ablations (python -m alexnet_jax.commands.study); the defaults are the paper's choices.
    config.activation = "relu"  # every hidden layer's units: "relu" (section 3.1) or "tanh"
    config.pooling = "overlapping"  # "overlapping" (3x3, stride 2; section 3.4) or "non_overlapping" (2x2, stride 2)
    config.lrn = "auto"  # "auto" (the variant's own: paper on, torchvision none), "on" (paper only) or "off"
    # fc6's and fc7's units: 4096 in the paper and torchvision; narrower for small data (a run's
    # checkpoints, exports and init_from follow it; torchvision's own AlexNet has 4096 only).
    config.hidden_units = 4096
    config.random_crop = True  # training crops at random places (section 4.1); False = the centre crop


def _optimisation_keys(config: ml_collections.ConfigDict) -> None:
    """The optimizer, its schedule and how the step is placed."""
    config.optimizer = "sgd"  # "sgd" (the paper's) or "lars" (large batches)
    config.lars_trust_coefficient = 0.001
    # The devices: "auto" (what JAX finds; refused when that is the CPU of a machine with an NVIDIA GPU
    # or a TPU), "cpu" (on purpose, even there), "gpu" or "tpu" (refused when JAX cannot start them).
    config.platform = "auto"
    # Parallelism (docs/distributed.md): how the step is placed on the devices. "pmap" or
    # "shard_map" (the whole network on every local device), "data" (jit on a global mesh,
    # multi-host), "towers" (the paper's two GPUs) or "weird_trick" (data-parallel convs,
    # model-parallel FC layers).
    config.parallelism = "pmap"
    config.model_axis = 2  # towers / weird_trick: devices on the mesh's model axis; the data axis takes the rest
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


def _loop_keys(config: ml_collections.ConfigDict) -> None:
    """Seeds, intervals, checkpoints and the loop's extras."""
    config.seed = 0
    config.log_every_steps = 100
    config.eval_every_steps = -1  # -1 = once an epoch
    config.checkpoint_every_steps = -1  # -1 = once an epoch
    config.keep_checkpoints = 3
    config.prefetch_to_device = 2
    # Gradient accumulation (issue 22): one update from this many micro-batches of
    # batch_size / N each, run in turn inside the step: the same update, a fraction of the
    # activation memory. Learning rate, schedule and every interval count updates.
    config.grad_accum_steps = 1
    # Profiling (issue 22): "FIRST-LAST" (e.g. "10-15") traces those updates with jax.profiler
    # into WORKDIR/plugins/profile/ (TensorBoard's Profile tab), on process 0; "" = off.
    config.profile_steps = ""
    _fault_keys(config)


def _fault_keys(config: ml_collections.ConfigDict) -> None:
    """Multi-process runs: how long to wait for a lost or hung process, and for data preparation (seconds)."""
    # No pulse from a peer process for this long (killed, stopped, host lost): every process stops in one line.
    config.peer_timeout_s = 60
    # No training step for this long (a living process hangs, a collective is stuck): the same. The first step
    # (compiling), evaluation and checkpoint writes are not timed by it.
    config.step_timeout_s = 120
    # jax.distributed's heartbeat: JAX aborts the job with a C++ dump after this long; kept above peer_timeout_s.
    config.heartbeat_timeout_s = 100
    # Processes other than 0 wait this long for process 0 to prepare a TFDS dataset (ImageNet takes hours).
    config.prepare_timeout_s = 8 * 3600


def _choices() -> dict[str, tuple]:
    """The keys that take one of a few values, with those values (each defined once, where it is used)."""
    return {
        "model": model_lib.VARIANTS,
        "init": model_lib.INITS,
        "dtype": tuple(build.DTYPES),
        "input_scale": build.INPUT_SCALE_CHOICES,
        "backward_impl": build.BACKWARD_IMPL_CHOICES,
        "group_conv": model_lib.GROUP_CONVS,
        "lrn_precision": model_lib.LRN_PRECISIONS,
        "prng_impl": tuple(steps.PRNG_IMPLS),
        "schedule": optim.SCHEDULES,
        "optimizer": optim.OPTIMIZERS,
        "parallelism": steps.PARALLELISMS,
        "platform": accelerators.PLATFORMS,
        "lr_scaling": optim.LR_SCALINGS,
        "resize_method": RESIZE_METHODS,
        "eval_crops": EVAL_CROPS,
        "activation": model_lib.ACTIVATIONS,
        "pooling": model_lib.POOLINGS,
        "lrn": tuple(build.LRN_CHOICES),
    }


def validate(config: ml_collections.ConfigDict, *, device_count: int, process_count: int = 1) -> None:
    """Reject impossible settings with a message that says what to do.

    Runs before any data is read or anything is compiled.
    """
    for key, allowed in _choices().items():
        if config[key] not in allowed:
            what = "is not an AlexNet variant" if key == "model" else "is unknown"
            listed = " or ".join(repr(value) for value in allowed)
            raise UserError(f"config.{key}={config[key]!r} {what}; use {listed}")
    if config.parallelism == "shard_map" and process_count > 1:
        raise UserError(
            "config.parallelism='shard_map' runs in a single process; use 'data' (or 'pmap') for multi-process runs"
        )
    parse_profile_steps(config.profile_steps)  # a UserError naming the format
    _validate_timeouts(config)
    _validate_mesh(config, device_count, process_count)
    _validate_sizes(config)
    _validate_counts(config, device_count)
    if config.lrn == "on" and config.model != "paper":
        raise UserError(f"config.lrn='on': the {config.model} variant has no LRN; use 'auto' or 'off'")
    if config.hidden_units < 1:
        raise UserError(
            f"config.hidden_units={config.hidden_units} must be a positive number of units (the paper's: 4096)"
        )
    if not 0.0 <= config.dropout_rate < 1.0:
        raise UserError(f"config.dropout_rate={config.dropout_rate} must lie in [0, 1)")
    if config.dataset == "image_folder" and not config.data_dir:
        raise UserError(
            "config.dataset='image_folder' needs config.data_dir=ROOT holding train/<class>/* and validation/<class>/*"
        )
    if config.dataset == "packed" and not config.data_dir:
        raise UserError(
            "config.dataset='packed' needs config.data_dir=DIR, made by python -m alexnet_jax.commands.pack"
        )


def _validate_mesh(config: ml_collections.ConfigDict, device_count: int, process_count: int) -> None:
    """The model-parallel schemes: the variant, the mesh against the devices, the split layers' widths."""
    scheme, size = config.parallelism, config.model_axis
    if scheme not in ("towers", "weird_trick"):
        return
    if scheme == "towers" and config.model != "paper":
        raise UserError("config.parallelism='towers' splits the paper's two towers; use --config.model=paper")
    if scheme == "towers" and size != 2:
        raise UserError(f"config.model_axis={size}: the paper has two towers; use --config.model_axis=2 for towers")
    if size < 1 or device_count % size:
        raise UserError(
            f"config.model_axis={size} does not divide the {device_count} devices of this run; use a divisor of "
            f"{device_count}"
        )
    if scheme == "towers" and (device_count // process_count) % size:
        raise UserError(
            f"config.model_axis={size} is more than one process's {device_count // process_count} devices: a "
            "tower pair must share a host; use parallelism='weird_trick' or more devices per process"
        )
    if scheme == "towers" and config.hidden_units % size:
        raise UserError(
            f"config.hidden_units={config.hidden_units}: the towers split fc6/fc7's units in two; use an even number"
        )
    classes_split = config.num_classes > 0 and config.num_classes % size
    if scheme == "weird_trick" and (config.hidden_units % size or classes_split):
        raise UserError(
            f"config.model_axis={size} must divide fc6/fc7's {config.hidden_units} units and the {config.num_classes} "
            "classes "
            "(fc8 is split by classes); use a power of two that divides both"
        )


def validate_num_classes(config: ml_collections.ConfigDict, num_classes: int, dataset: str) -> None:
    """The class count taken from the dataset (num_classes=-1) must split as the scheme splits fc8."""
    if config.parallelism == "weird_trick" and num_classes % config.model_axis:
        raise UserError(
            f"{dataset} has {num_classes} classes, which config.model_axis={config.model_axis} does not divide "
            "(weird_trick splits fc8 by classes); set config.num_classes to a multiple, or another model_axis"
        )


def _validate_sizes(config: ml_collections.ConfigDict) -> None:
    minimum = model_lib.min_image_size()
    if config.image_size < minimum:
        raise UserError(
            f"config.image_size={config.image_size} is too small for AlexNet's three 3x3/2 "
            f"poolings; use at least {minimum}"
        )
    if config.resize_size != -1 and config.resize_size < config.image_size:
        raise UserError(
            f"config.resize_size={config.resize_size} is smaller than image_size={config.image_size}; "
            "use -1 (the paper's 256/224 ratio) or a size >= image_size"
        )


def _validate_counts(config: ml_collections.ConfigDict, device_count: int) -> None:
    for key in ("batch_size", "learning_rate", "log_every_steps"):
        if config[key] <= 0:
            raise UserError(f"config.{key}={config[key]} must be positive")
    if config.num_train_steps <= 0 and config.num_epochs <= 0:
        raise UserError("set config.num_epochs > 0 or config.num_train_steps > 0: there is nothing to train")
    for key in ("eval_every_steps", "checkpoint_every_steps", "eval_batch_size", "num_classes"):
        if config[key] == 0 or config[key] < -1:
            raise UserError(f"config.{key}={config[key]} must be positive, or -1 for the default")
    for key in ("batch_size", "eval_batch_size"):
        if config[key] > 0 and config[key] % device_count:
            raise UserError(
                f"config.{key}={config[key]} is not divisible by the {device_count} devices of this run; "
                f"use a multiple of {device_count}"
            )
    _validate_grad_accum(config, device_count)


def _validate_grad_accum(config: ml_collections.ConfigDict, device_count: int) -> None:
    accum, per_device = config.grad_accum_steps, config.batch_size // device_count
    if accum < 1:
        raise UserError(f"config.grad_accum_steps={accum} must be at least 1 (1 = no accumulation)")
    if per_device % accum:
        raise UserError(
            f"config.grad_accum_steps={accum} does not divide the {per_device} examples per device "
            f"(batch_size {config.batch_size} / {device_count} devices); use a divisor of {per_device}"
        )


def _validate_timeouts(config: ml_collections.ConfigDict) -> None:
    for key in ("peer_timeout_s", "step_timeout_s", "heartbeat_timeout_s", "prepare_timeout_s"):
        if config[key] <= 0:
            raise UserError(f"config.{key}={config[key]} must be positive (seconds)")
    if config.heartbeat_timeout_s < config.peer_timeout_s + HEARTBEAT_MARGIN_S:
        raise UserError(
            f"config.heartbeat_timeout_s={config.heartbeat_timeout_s} must exceed config.peer_timeout_s="
            f"{config.peer_timeout_s} by at least {HEARTBEAT_MARGIN_S} s, so that a lost process ends the job with "
            "the watchdog's line rather than JAX's abort; raise it or lower peer_timeout_s"
        )


def resize_size(config: ml_collections.ConfigDict) -> int:
    if config.resize_size > 0:
        return config.resize_size
    return int(round(config.image_size * 256 / 224))


def parse_profile_steps(spec: str) -> tuple[int, int] | None:
    """config.profile_steps -> (first, last) updates, counted from 1 as the log counts them; None when "" (off)."""
    if spec == "":
        return None
    match = _PROFILE_STEPS.fullmatch(spec)
    first, last = (int(match.group(1)), int(match.group(2) or match.group(1))) if match else (0, 0)
    if first < 1 or last < first:
        raise UserError(
            f"config.profile_steps={spec!r} is not a step range; use 'FIRST-LAST' (e.g. '10-15', steps counted "
            "from 1), one step ('12'), or '' for no profile"
        )
    return first, last
