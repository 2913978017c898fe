"""config.validate: every bad value is refused in-process with one line naming the key and the fix."""

import importlib.util
import os

import pytest
from conftest import REPO

from alexnet_jax import config as config_lib
from alexnet_jax.errors import UserError


@pytest.mark.parametrize("name", ["demo", "default", "torchvision", "large_batch"])
def test_the_shipped_recipes_validate(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config_lib.validate(config, device_count=8)
    assert config.resize_method == "bilinear" and config_lib.resize_size(config) >= config.image_size
    assert config.input_scale in ("auto", "raw", "standardized")


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("resize_method", "lanczos", "use 'bilinear' or 'area'"),
        ("eval_crops", 5, "use 1 or 10"),
        ("dropout_rate", 1.0, "must lie in [0, 1)"),
        ("resize_size", 100, "smaller than image_size=224"),
        ("parallelism", "dp", "use 'pmap' or 'shard_map'"),
        ("input_scale", "centred", "use 'auto' or 'raw' or 'standardized'"),
        ("backward_impl", "cudnn", "use 'auto' or 'fast' or 'lax'"),
        ("step_timeout_s", 0, "must be positive (seconds)"),
        # JAX's heartbeat abort (a C++ dump) must not beat the watchdog's one line
        ("heartbeat_timeout_s", 65, "must exceed config.peer_timeout_s=60 by at least 10 s"),
        ("hidden_units", 0, "must be a positive number of units"),
    ],
)
def test_bad_values_name_the_key_and_what_to_use(key, value, expected):
    config = config_lib.base_config()
    config[key] = value
    with pytest.raises(UserError, match=f"config.{key}=") as error:
        config_lib.validate(config, device_count=8)
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_runs_are_evaluated_with_the_resize_they_were_trained_with():
    from alexnet_jax.checkpointing import runinfo

    assert runinfo.resize_method({"config": {"resize_method": "bilinear"}}) == "bilinear"
    assert runinfo.resize_method({"config": {"resize_method": "area"}}) == "area"
    # recorded before the key existed (they shrank with the area filter), or converted weights
    assert runinfo.resize_method({"config": {"image_size": 224}}) == "area"
    assert runinfo.resize_method({"config": None}) == runinfo.resize_method(None) == "area"


def test_input_scale_auto_follows_a_resumed_run_then_init_from_weights_then_the_variant():
    from alexnet_jax.checkpointing import trained
    from alexnet_jax.training import loop

    def pretrained(scale):
        return trained.TrainedModel(
            path="weights",
            params={},
            variant="paper",
            num_classes=3,
            class_names=None,
            image_size=224,
            resize_size=256,
            resize_method="area",
            input_scale=scale,
            eval_crops=1,
            step=None,
            run_info=None,
        )

    config = config_lib.base_config()  # paper variant, input_scale "auto"
    assert loop._input_scale(config, None, None) == "raw"
    assert loop._input_scale(config, {"config": {}}, None) == "standardized"  # recorded before the key existed
    assert loop._input_scale(config, {"input_scale": "raw"}, None) == "raw"
    assert loop._input_scale(config, None, pretrained("standardized")) == "standardized"  # converted weights
    config.input_scale = "raw"
    with pytest.raises(
        UserError, match="was trained with 'standardized' inputs; use --config.input_scale=standardized"
    ):
        loop._input_scale(config, None, pretrained("standardized"))
    config.model, config.input_scale = "torchvision", "auto"
    assert loop._input_scale(config, None, None) == "standardized"


@pytest.mark.parametrize(
    "settings, devices, processes, expected",
    [
        ({"parallelism": "towers", "model": "torchvision"}, 8, 1, "use --config.model=paper"),
        ({"parallelism": "towers", "model_axis": 4}, 8, 1, "use --config.model_axis=2"),
        ({"parallelism": "weird_trick", "model_axis": 3}, 8, 1, "does not divide the 8 devices"),
        ({"parallelism": "towers"}, 4, 4, "a tower pair must share a host"),
        ({"parallelism": "weird_trick", "model_axis": 8, "num_classes": 100}, 8, 1, "fc8 is split by classes"),
        ({"parallelism": "data", "batch_size": 12}, 8, 1, "config.batch_size=12 is not divisible by the 8"),
        ({"parallelism": "shard_map"}, 8, 2, "use 'data' (or 'pmap')"),
        ({"parallelism": "towers", "hidden_units": 255}, 8, 1, "the towers split fc6/fc7's units in two"),
        ({"parallelism": "weird_trick", "model_axis": 8, "hidden_units": 260}, 8, 1, "fc6/fc7's 260 units"),
    ],
)
def test_mesh_settings_are_refused_before_anything_compiles(settings, devices, processes, expected):
    config = config_lib.base_config()
    config.update(settings)
    with pytest.raises(UserError, match="config.") as error:
        config_lib.validate(config, device_count=devices, process_count=processes)
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_the_class_count_from_the_dataset_must_split_like_fc8():
    config = config_lib.base_config()
    config.update({"parallelism": "weird_trick", "model_axis": 4})
    config_lib.validate_num_classes(config, 1000, "imagenet2012")
    with pytest.raises(UserError, match="demo_digits has 10 classes, which config.model_axis=4 does not divide"):
        config_lib.validate_num_classes(config, 10, "demo_digits")
