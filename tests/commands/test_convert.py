"""torchvision weights -> Flax: the same logits as PyTorch, and the converted checkpoint round trip."""

import json
import pickle

import jax
import numpy as np
import pytest
from conftest import optional

from alexnet_jax.checkpointing import runinfo, trained
from alexnet_jax.commands import convert, predict
from alexnet_jax.errors import UserError
from alexnet_jax.model import alexnet as model_lib
from alexnet_jax.model import preprocess
from alexnet_jax.training import loop

torch = optional("torch")
nn = torch.nn


def torchvision_layout_alexnet(num_classes=1000):
    """torchvision's AlexNet layout, written out so the test needs no torchvision."""

    class AlexNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),  # features.0
                nn.ReLU(inplace=True),
                nn.MaxPool2d(kernel_size=3, stride=2),
                nn.Conv2d(64, 192, kernel_size=5, padding=2),  # features.3
                nn.ReLU(inplace=True),
                nn.MaxPool2d(kernel_size=3, stride=2),
                nn.Conv2d(192, 384, kernel_size=3, padding=1),  # features.6
                nn.ReLU(inplace=True),
                nn.Conv2d(384, 256, kernel_size=3, padding=1),  # features.8
                nn.ReLU(inplace=True),
                nn.Conv2d(256, 256, kernel_size=3, padding=1),  # features.10
                nn.ReLU(inplace=True),
                nn.MaxPool2d(kernel_size=3, stride=2),
            )
            self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
            self.classifier = nn.Sequential(
                nn.Dropout(p=0.5),
                nn.Linear(256 * 6 * 6, 4096),  # classifier.1
                nn.ReLU(inplace=True),
                nn.Dropout(p=0.5),
                nn.Linear(4096, 4096),  # classifier.4
                nn.ReLU(inplace=True),
                nn.Linear(4096, num_classes),  # classifier.6
            )

        def forward(self, x):
            x = self.avgpool(self.features(x))
            return self.classifier(torch.flatten(x, 1))

    return AlexNet()


@pytest.fixture(scope="module")
def torch_model():
    torch.manual_seed(0)
    model = torchvision_layout_alexnet().eval()
    with torch.no_grad():  # larger biases than torch's default, so every layer's bias matters
        for module in model.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                module.bias.uniform_(-0.1, 0.1)
    return model


@pytest.fixture(scope="module")
def state_dict(torch_model):
    return {name: tensor.detach().clone() for name, tensor in torch_model.state_dict().items()}


# 224: the pooled map is 6x6 already; 256 and 100: adaptive pooling averages (7x7 -> 6x6)
# and repeats (2x2 -> 6x6) cells, so its bin edges are tested too.
@pytest.mark.parametrize("image_size", [224, 256, 100])
def test_converted_weights_give_torchs_logits(torch_model, state_dict, image_size):
    params = convert.from_torchvision({name: tensor.numpy() for name, tensor in state_dict.items()})
    rng = np.random.default_rng(image_size)
    images = rng.standard_normal((2, image_size, image_size, 3)).astype(np.float32)  # NHWC
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
    flax_model = model_lib.AlexNet(variant="torchvision", num_classes=1000)
    logits = np.asarray(jax.jit(lambda p, x: flax_model.apply({"params": p}, x, train=False))(params, images))
    scale = np.abs(expected).max()
    difference = np.abs(logits - expected).max()
    print(f"image {image_size}: max |logit| {scale:.4g}, max abs difference {difference:.3g}")
    assert logits.shape == (2, 1000)
    assert scale > 0.1  # the comparison means something
    assert difference < 1e-4 * scale
    np.testing.assert_array_equal(logits.argmax(-1), expected.argmax(-1))


def test_layout_and_errors(state_dict):
    params = convert.from_torchvision(state_dict)  # torch tensors are accepted as they are
    assert model_lib.count_params(params) == 61_100_840
    np.testing.assert_array_equal(params["conv2"]["kernel"][1, 2, 5, 7], state_dict["features.3.weight"][7, 5, 1, 2])
    np.testing.assert_array_equal(params["fc6"]["kernel"][100, 9], state_dict["classifier.1.weight"][9, 100])
    broken = dict(state_dict)
    del broken["features.8.bias"]
    with pytest.raises(UserError, match=r"missing \['features.8.bias'\]"):
        convert.from_torchvision(broken)
    broken = dict(state_dict, **{"features.3.weight": state_dict["features.3.weight"][:, :32]})
    with pytest.raises(UserError, match="features.3: kernel"):
        convert.from_torchvision(broken)


def test_cli_writes_a_checkpoint_that_loads_back(torch_model, state_dict, image_folder, tmp_path, capsys):
    pth = tmp_path / "alexnet.pth"
    torch.save(state_dict, pth)
    out = tmp_path / "converted"
    assert convert.main([f"--pth={pth}", f"--out={out}"]) == 0
    assert "61,100,840 parameters" in capsys.readouterr().out

    loaded = trained.load(str(out))
    params = loaded.params
    assert loaded.variant == "torchvision" and loaded.num_classes == 1000
    assert (loaded.image_size, loaded.resize_size, loaded.input_scale) == (224, 256, "standardized")
    assert loaded.class_names[281] == "n02123045"  # tabby cat, in TFDS's and torchvision's order
    assert json.loads((out / "model.json").read_text())["source"]["file"] == "alexnet.pth"
    expected = convert.from_torchvision(state_dict)
    for layer in expected:
        for name in ("kernel", "bias"):
            assert isinstance(params[layer][name], np.ndarray)
            np.testing.assert_array_equal(params[layer][name], expected[layer][name])
    # Predicting from it prints ImageNet names and torch's own probabilities for the same pixels.
    image = sorted((image_folder / "validation").rglob("*.jpg"))[0]
    assert predict.main([f"--checkpoint={out}", str(image)]) == 0
    shown = capsys.readouterr().out.splitlines()[1:6]
    pixels = predict.preprocess(image.read_bytes(), image_size=224, resize_size=256)  # uint8 [1, 224, 224, 3]
    normalised = np.asarray(preprocess.model_input(pixels))  # torch takes what the model makes of the pixels
    with torch.no_grad():
        logits = torch_model(torch.from_numpy(normalised.transpose(0, 3, 1, 2).copy()))
        probabilities = torch.softmax(logits, dim=-1).numpy()[0]
    for line, index in zip(shown, np.argsort(-probabilities)[:5]):
        assert line.endswith(f"({runinfo.imagenet_synsets()[index]})")
        assert float(line.split()[1].rstrip("%")) == pytest.approx(100 * probabilities[index], abs=0.006)

    # Writing over an existing conversion is refused rather than mixed.
    assert convert.main([f"--pth={pth}", f"--out={out}"]) == 2
    assert "already exists" in capsys.readouterr().err

    # A run starts from it: every layer copied; fc8 stays fresh for another class count.
    fresh = jax.tree_util.tree_map(np.zeros_like, expected)
    fresh["fc8"] = {"kernel": np.ones((4096, 5), np.float32), "bias": np.zeros(5, np.float32)}
    merged = loop.init_params_from(loaded, fresh, "torchvision")
    np.testing.assert_array_equal(merged["conv1"]["kernel"], expected["conv1"]["kernel"])
    np.testing.assert_array_equal(merged["fc8"]["kernel"], fresh["fc8"]["kernel"])
    with pytest.raises(UserError, match="config.model='paper'"):
        loop.init_params_from(loaded, fresh, "paper")


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_pth_with_code_in_it_is_refused(tmp_path, capsys):
    pth = tmp_path / "evil.pth"
    with open(pth, "wb") as handle:
        pickle.dump({"features.0.weight": _Payload()}, handle, protocol=2)
    assert convert.main([f"--pth={pth}", f"--out={tmp_path / 'out'}"]) == 2
    captured = capsys.readouterr()
    assert "not a plain PyTorch state dict" in captured.err
    assert "this must never run" not in captured.out


def test_imagenet_names_ship_with_tfds():
    synsets = runinfo.imagenet_synsets()
    readable = runinfo.imagenet_readable_names()
    assert len(synsets) == len(readable) == 1000 and list(synsets) == sorted(synsets)
    assert (synsets[0], readable[0]) == ("n01440764", "tench, Tinca tinca")
    assert runinfo.display_names(["n02099601", "tulip"], 3) == [
        "golden retriever (n02099601)",
        "tulip",
        "class 2",
    ]
