"""python -m alexnet_jax.commands.resize: a pre-resized image-folder copy, written atomically."""

import hashlib
import io

import numpy as np
import pytest
from PIL import Image

from alexnet_jax.commands import resize as resize_command
from alexnet_jax.data import resize, sources
from alexnet_jax.errors import UserError


def _save(path, size, mode="RGB", fmt="JPEG", seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).convert(mode).save(path, fmt)


@pytest.fixture
def source_folder(tmp_path):
    root = tmp_path / "src"
    _save(root / "train" / "cat" / "big.JPEG", (300, 200))
    _save(root / "train" / "cat" / "cmyk.JPEG", (160, 240), mode="CMYK")
    _save(root / "train" / "dog" / "png_named.JPEG", (250, 180), fmt="PNG")
    _save(root / "train" / "dog" / "small.jpg", (90, 70))
    _save(root / "validation" / "dog" / "val.jpg", (400, 130))
    return root


def _digest(root):
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def test_resized_copy(source_folder, tmp_path):
    before = _digest(source_folder)
    out = tmp_path / "out"
    assert resize_command.main([f"--data_dir={source_folder}", f"--out={out}", "--size=128", "--workers=2"]) == 0
    assert _digest(source_folder) == before  # the source is only read
    assert not [p for p in tmp_path.iterdir() if "staging" in p.name]
    copy = sources.image_folder(str(out))
    assert copy.class_names == ("cat", "dog") and copy.train.num_examples == 4 and copy.eval.num_examples == 1
    sizes = {}
    for path in [*copy.train.paths, *copy.eval.paths]:
        with Image.open(path) as picture:
            sizes[path.split("/")[-1]] = (picture.size, picture.format, picture.mode)
    assert sizes["big.JPEG"] == ((192, 128), "JPEG", "RGB")
    assert sizes["cmyk.JPEG"] == ((128, 192), "JPEG", "RGB")  # CMYK becomes RGB
    assert sizes["png_named.JPEG"][0] == (178, 128) and sizes["png_named.JPEG"][1] == "JPEG"
    assert sizes["val.jpg"][0] == (394, 128)
    # Already small enough: copied byte for byte, not re-encoded.
    assert (out / "train/dog/small.jpg").read_bytes() == (source_folder / "train/dog/small.jpg").read_bytes()
    assert '"images": 5' in (out / resize.STAMP).read_text()

    with pytest.raises(UserError, match="already exists"):
        resize.write_resized(str(source_folder), str(out), size=128)
    with pytest.raises(UserError, match="outside"):
        resize.write_resized(str(source_folder), str(source_folder / "inside"), size=128)


def test_bad_images_stop_or_are_left_out(source_folder, tmp_path):
    bad = source_folder / "train" / "cat" / "cut.JPEG"
    bad.write_bytes((source_folder / "train" / "cat" / "big.JPEG").read_bytes()[:700])
    with pytest.raises(UserError, match="cut.JPEG"):
        resize.write_resized(str(source_folder), str(tmp_path / "out"), size=128)
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if "staging" in p.name]
    resize.write_resized(str(source_folder), str(tmp_path / "out"), size=128, skip_bad_images=True, workers=1)
    assert not (tmp_path / "out" / "train" / "cat" / "cut.JPEG").exists()


def test_check_finds_files_that_only_a_full_decode_rejects(source_folder, capsys):
    data = bytearray((source_folder / "train" / "cat" / "big.JPEG").read_bytes())
    start = data.index(b"\xff\xc0")
    data[start + 5 : start + 9] = b"\x00\x00\x00\x00"  # the frame header says 0x0 pixels; both ends intact
    (source_folder / "train" / "dog" / "broken.jpg").write_bytes(bytes(data))
    assert resize_command.main([f"--data_dir={source_folder}", "--check"]) == 1
    output = capsys.readouterr().out
    assert "broken.jpg" in output and "1 file(s) fail to decode" in output


def test_resize_bytes_keeps_aspect_and_quality():
    buffer = io.BytesIO()
    Image.fromarray(np.full((375, 500, 3), 120, np.uint8)).save(buffer, "JPEG", quality=90)
    out = resize.resize_bytes(buffer.getvalue(), 256)
    with Image.open(io.BytesIO(out)) as picture:
        assert picture.size == (341, 256)
        assert np.abs(np.asarray(picture, np.int16) - 120).max() <= 2
    assert resize.resize_bytes(buffer.getvalue(), 400) is None
