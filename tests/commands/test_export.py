"""python -m alexnet_jax.commands.export: real torchvision and real onnxruntime give our logits on real photographs.

The checkpoints are real (the project's Checkpointer with config.json, or a converted
checkpoint), He-initialised with random biases so that every layer and bias matters; the
photographs are scikit-image's, put through each run's own evaluation preprocessing.
"""

import importlib.util
import io
import json
import os
import subprocess
import sys

import numpy as np
import optax
import pytest
from conftest import PHOTOS, child_env

from alexnet_jax.checkpointing import checkpoint, runinfo, trained
from alexnet_jax.commands import convert, export, predict
from alexnet_jax.config import base_config
from alexnet_jax.step import steps

NEEDS_EXPORT_EXTRA = f"needs the export extra: {export.INSTALL}"


def _params(variant, num_classes, seed, hidden_units=4096):
    """He-normal weights (fan-in) and biases from U(-0.1, 0.1), as host arrays: every layer and bias matters.

    Drawn with numpy from the layer shapes (no compiled init: XLA took minutes over it on a busy 2-core host).
    """
    rng = np.random.default_rng(seed)
    shapes = convert.expected_shapes(variant, num_classes, hidden_units=hidden_units)
    params = {}
    for layer, shape in shapes.items():
        kernel = rng.standard_normal(shape["kernel"], dtype=np.float32)
        kernel *= np.float32(np.sqrt(2.0 / np.prod(shape["kernel"][:-1])))
        params[layer] = {"kernel": kernel, "bias": rng.uniform(-0.1, 0.1, shape["bias"]).astype(np.float32)}
    return params


def _workdir(root, *, variant, num_classes, image_size, resize_size, input_scale, resize_method, hidden_units=4096):
    config = base_config()
    config.hidden_units = hidden_units
    config.dataset, config.data_dir = "image_folder", "/nonexistent/photos"
    config.model, config.image_size, config.input_scale = variant, image_size, input_scale
    config.resize_size, config.resize_method = resize_size, resize_method
    params = _params(variant, num_classes, seed=image_size, hidden_units=hidden_units)
    state = steps.TrainState(step=np.zeros((), np.int32), params=params, opt_state=optax.sgd(0.01).init(params))
    saver = checkpoint.Checkpointer(str(root))
    saver.save(7, state, {"model": variant, "num_classes": num_classes, "optimizer": "sgd"})
    saver.close()
    names = PHOTOS[:num_classes]
    runinfo.write_run_info(
        str(root), config, names, num_classes=num_classes, resize_size=resize_size, input_scale=input_scale
    )
    return str(root)


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory):
    """A paper-variant run on the raw pixel scale, 3 classes at 99 pixels."""
    return _workdir(
        tmp_path_factory.mktemp("paper_run"),
        variant="paper",
        num_classes=3,
        image_size=99,
        resize_size=113,
        input_scale="raw",
        resize_method="area",
    )


@pytest.fixture(scope="module")
def torchvision_run(tmp_path_factory):
    """A torchvision-variant run trained on the paper's raw scale (folded into conv1 on export), 224/256 bilinear."""
    return _workdir(
        tmp_path_factory.mktemp("torchvision_run"),
        variant="torchvision",
        num_classes=6,
        image_size=224,
        resize_size=256,
        input_scale="raw",
        resize_method="bilinear",
    )


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A converted torchvision checkpoint (standardised input, 224/256, no class names), as convert writes one."""
    params = _params("torchvision", 4, seed=3)
    record = {"model": "torchvision", "num_classes": 4, "image_size": 224, "resize_size": 256}
    record |= {"input_scale": "standardized", "class_names": None}
    return checkpoint.save_converted(str(tmp_path_factory.mktemp("converted")), params, record)


def photographs(model: trained.TrainedModel) -> np.ndarray:
    """Four real photographs as the run evaluates them: uint8 [4, S, S, 3]."""
    import skimage.data
    from PIL import Image

    images = []
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        encoded = io.BytesIO()
        Image.fromarray(getattr(skimage.data, name)()).convert("RGB").save(encoded, format="JPEG", quality=95)
        images.append(predict.preprocess(encoded.getvalue(), **model.sizes))
    return np.concatenate(images)


def _report(what, result):
    print(f"{what}: {result}")
    assert result.logit_scale > 0.1  # the comparison means something
    assert result.relative < 1e-4, str(result)
    assert result.same_top1


def test_to_torchvision_inverts_from_torchvision():
    params = _params("torchvision", 7, seed=0)
    state_dict = convert.to_torchvision(params)
    assert state_dict["features.3.weight"].shape == (192, 64, 5, 5)
    assert state_dict["classifier.1.weight"].shape == (4096, 9216)
    assert state_dict["features.3.weight"][7, 5, 1, 2] == params["conv2"]["kernel"][1, 2, 5, 7]
    back = convert.from_torchvision(state_dict)
    for layer in params:
        for name in ("kernel", "bias"):
            np.testing.assert_array_equal(back[layer][name], params[layer][name])


def test_parity_catches_a_small_shift_and_a_changed_answer():
    ours = np.array([[3.0, -1.0, 0.5], [0.0, 2.0, -2.0]], np.float32)
    assert export.parity(ours, ours + 1e-5).ok  # 3e-6 of the scale 3
    shifted = export.parity(ours, ours + np.float32(1e-3))
    assert (shifted.max_abs_diff, shifted.logit_scale) == pytest.approx((1e-3, 3.0), rel=1e-3) and not shifted.ok
    assert not export.parity(ours, ours[:, ::-1]).same_top1


@pytest.mark.parametrize("source", ["torchvision_run", "converted"])
def test_torchvision_export_gives_our_logits_on_photos(source, request, tmp_path, capsys):
    torch = pytest.importorskip("torch", reason=NEEDS_EXPORT_EXTRA)
    torchvision = pytest.importorskip("torchvision", reason=NEEDS_EXPORT_EXTRA)
    path = request.getfixturevalue(source)
    flag = "--workdir" if source.endswith("run") else "--checkpoint"
    out = tmp_path / "alexnet.pth"
    assert export.main([f"{flag}={path}", "--to=torchvision", f"--out={out}"]) == 0
    assert "checked on 2 probe images" in capsys.readouterr().out

    model = trained.load(path)
    network = torchvision.models.alexnet(weights=None, num_classes=model.num_classes)
    network.load_state_dict(torch.load(out, weights_only=True), strict=True)
    network.eval()
    pixels = photographs(model)  # the run's resize and crop
    # torchvision's own input pipeline from here: ToTensor's [0, 1], then Normalize with ImageNet's statistics.
    tensor = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0
    weights = torchvision.models.AlexNet_Weights.IMAGENET1K_V1.transforms()
    tensor = torchvision.transforms.functional.normalize(tensor, weights.mean, weights.std)
    with torch.no_grad():
        theirs = network(tensor).numpy()
    _report(
        f"torchvision, {model.input_scale} run, 4 photos at {model.image_size}",
        export.parity(export.our_logits(model, pixels), theirs),
    )


@pytest.mark.parametrize("source", ["paper_run", "converted"])
def test_onnx_export_gives_our_logits_on_photos(source, request, tmp_path, capsys):
    onnx = pytest.importorskip("onnx", reason=NEEDS_EXPORT_EXTRA)
    onnxruntime = pytest.importorskip("onnxruntime", reason=NEEDS_EXPORT_EXTRA)
    pytest.importorskip("jax2onnx", reason=NEEDS_EXPORT_EXTRA)
    path = request.getfixturevalue(source)
    flag = "--workdir" if source.endswith("run") else "--checkpoint"
    out = tmp_path / "alexnet.onnx"
    assert export.main([f"{flag}={path}", "--to=onnx", f"--out={out}"]) == 0
    printed = capsys.readouterr().out
    assert "checked on 2 probe images" in printed and "DEBUG" not in printed  # jax2onnx's own prints are hidden

    model = trained.load(path)
    size = model.image_size
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (images,), (logits,) = session.get_inputs(), session.get_outputs()
    assert (images.name, images.type, images.shape[1:]) == ("images", "tensor(uint8)", [size, size, 3])
    assert isinstance(images.shape[0], str)  # any batch size
    assert (logits.name, logits.shape[1]) == ("logits", model.num_classes)

    pixels = photographs(model)
    ours = export.our_logits(model, pixels)
    _report(
        f"onnx, {model.variant} variant, 4 photos at {size}",
        export.parity(ours, session.run(None, {"images": pixels})[0]),
    )
    (single,) = session.run(None, {"images": pixels[2:3]})
    assert export.parity(ours[2:3], single).relative < 1e-4

    props = {prop.key: prop.value for prop in onnx.load(str(out), load_external_data=False).metadata_props}
    names = list(model.class_names or []) or [f"class {i}" for i in range(model.num_classes)]
    assert json.loads(props["class_names"]) == names
    assert (props["variant"], props["input_scale"], props["crop"]) == (model.variant, model.input_scale, "center")
    assert (int(props["image_size"]), int(props["resize_size"])) == (size, model.resize_size)
    assert props["resize_method"] == model.resize_method
    if source == "paper_run":
        assert (props["input_scale"], props["step"], names[0]) == ("raw", "7", "astronaut")


def test_refusals_are_one_line(paper_run, converted, tmp_path, capsys, monkeypatch):
    def refused(*args):
        assert export.main(list(args)) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        return err

    pth = tmp_path / "paper.pth"
    assert "no local response normalisation" in refused(f"--workdir={paper_run}", "--to=torchvision", f"--out={pth}")
    assert not pth.exists()
    assert "does not exist" in refused(
        f"--checkpoint={tmp_path / 'missing'}", "--to=onnx", f"--out={tmp_path / 'a.onnx'}"
    )
    (tmp_path / "not_weights").mkdir()
    assert "neither a converted checkpoint" in refused(
        f"--checkpoint={tmp_path / 'not_weights'}", "--to=onnx", f"--out={tmp_path / 'a.onnx'}"
    )
    assert "name a --to=onnx file .onnx" in refused(f"--checkpoint={converted}", "--to=onnx", f"--out={pth}")
    assert "is not a directory" in refused(
        f"--checkpoint={converted}", "--to=onnx", f"--out={tmp_path / 'no' / 'a.onnx'}"
    )
    existing = tmp_path / "kept.onnx"
    existing.write_bytes(b"a user's file")
    assert "already exists" in refused(f"--checkpoint={converted}", "--to=onnx", f"--out={existing}")
    assert existing.read_bytes() == b"a user's file"
    missing = (("jax2onnx", "onnx", "onnx"), ("torch", "torchvision", "pth"), ("torchvision", "torchvision", "pth"))
    for module, target, suffix in missing:
        with monkeypatch.context() as patch:
            patch.setitem(sys.modules, module, None)  # as if not installed: importing it raises ImportError
            err = refused(f"--checkpoint={converted}", f"--to={target}", f"--out={tmp_path / f'b.{suffix}'}")
        # torchvision is imported after torch: where torch itself is absent (no extras), torch is what it needs
        named = module if module != "torchvision" or importlib.util.find_spec("torch") else "torch"
        assert f"needs {named}" in err and export.INSTALL in err


def test_a_narrower_run_loads_at_its_width_and_torchvision_is_refused(tmp_path, capsys):
    path = _workdir(
        tmp_path / "narrow",
        variant="torchvision",
        num_classes=3,
        image_size=99,
        resize_size=113,
        input_scale="raw",
        resize_method="area",
        hidden_units=64,
    )
    model = trained.load(path)
    assert model.architecture["hidden_units"] == 64 and model.params["fc7"]["kernel"].shape == (64, 64)
    logits = model.module().apply({"params": model.params}, photographs(model), train=False)
    assert logits.shape == (4, 3) and np.all(np.isfinite(logits))
    pth = tmp_path / "narrow.pth"
    assert export.main([f"--workdir={path}", "--to=torchvision", f"--out={pth}"]) == 2
    err = capsys.readouterr().err
    assert "config.hidden_units=64" in err and "--to=onnx" in err and err.count("\n") == 1 and not pth.exists()


def test_the_command_line_refuses_in_one_line(paper_run, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "alexnet_jax.commands.export",
            f"--workdir={paper_run}",
            "--to=torchvision",
            "--out=x.pth",
        ],
        cwd=tmp_path,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: the paper variant has no torchvision counterpart")
    assert result.stderr.count("\n") == 1, result.stderr
    assert not os.path.exists(tmp_path / "x.pth")
