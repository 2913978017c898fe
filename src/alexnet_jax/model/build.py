"""The network a config describes: every implementation choice resolved in one place.

Training (create_model) and every loader of trained weights (checkpointing.trained) build
the network through here, so a run is rebuilt exactly as it was trained. The choices'
allowed values live here too, where config.py reads them without importing training.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from alexnet_jax.model import alexnet as model_lib
from alexnet_jax.model import preprocess

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# config.backward_impl: "auto" picks the hand-written backward passes on the CPU
# backend, where they are measured faster, and XLA's autodiff elsewhere (cuDNN has
# fast backward convolutions of its own).
BACKWARD_IMPL_CHOICES = ("auto", *model_lib.BACKWARD_IMPLS)
INPUT_SCALE_CHOICES = ("auto", *preprocess.INPUT_SCALES)
# The paper's ablations (issue 24): config keys that shape the network without changing a
# parameter's shape, and fc6/fc7's width (which does), with the values runs recorded before
# the keys existed were trained with.
# config.lrn: "auto" = the variant's own (after conv1 and conv2 for the paper, none for torchvision).
LRN_CHOICES = {"auto": None, "on": True, "off": False}
ARCHITECTURE_DEFAULTS = {
    "activation": "relu",
    "pooling": "overlapping",
    "lrn": "auto",
    "dropout_rate": 0.5,
    "hidden_units": model_lib.HIDDEN_UNITS,
}


def resolve_backward_impl(choice: str, backend: str | None = None) -> str:
    """config.backward_impl -> model.BACKWARD_IMPLS: "auto" is "fast" on the CPU backend, else "lax"."""
    if choice != "auto":
        return choice
    return "fast" if (backend or jax.default_backend()) == "cpu" else "lax"


def resolve_input_scale(choice: str, variant: str) -> str:
    """config.input_scale -> preprocess.INPUT_SCALES: "auto" is the variant's own (raw for the paper)."""
    return preprocess.default_input_scale(variant) if choice == "auto" else choice


def architecture(settings: Any) -> dict[str, Any]:
    """AlexNet's keyword arguments for the ablation switches (and dropout) of a config.

    settings: a ConfigDict, a run's recorded config (config.json's "config" dict) or a
    plain namespace; a key it lacks takes ARCHITECTURE_DEFAULTS' value, so a run recorded
    before the switches existed is rebuilt as it was trained. Training (create_model) and
    every loader of trained weights (trained.load) rebuild the network through here.
    """
    get = settings.get if hasattr(settings, "get") else lambda key, default: getattr(settings, key, default)
    values = {key: get(key, default) for key, default in ARCHITECTURE_DEFAULTS.items()}
    return {
        "activation": str(values["activation"]),
        "pooling": str(values["pooling"]),
        "lrn": LRN_CHOICES[values["lrn"]],
        "dropout_rate": float(values["dropout_rate"]),
        "hidden_units": int(values["hidden_units"]),
    }


def create_model(config: Any, num_classes: int, *, input_scale: str | None = None) -> model_lib.AlexNet:
    """The model a config describes, with every implementation choice resolved here.

    input_scale: the run's resolved input scale (loop.plan_run also looks at a resumed
    run and init_from weights); None resolves config.input_scale by the variant alone.
    """
    return model_lib.AlexNet(
        variant=config.model,
        num_classes=num_classes,
        dtype=DTYPES[config.dtype],
        init_scheme=config.init,
        input_scale=input_scale or resolve_input_scale(config.input_scale, config.model),
        backward_impl=resolve_backward_impl(config.backward_impl),
        group_conv=config.group_conv,
        lrn_precision=config.lrn_precision,
        **architecture(config),
    )
