"""Eight fake CPU devices for every test, and small real image folders on disk."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# One persistent compilation cache for the whole session, shared with the launch.py
# subprocesses: the same AlexNet step is compiled once, not once per run.
_CACHE = tempfile.mkdtemp(prefix="alexnet_jax_test_cache_")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_image_folder(root, *, classes=3, train_per_class=6, eval_per_class=(3, 2, 2), seed=0):
    """A real image-folder dataset: JPEGs of assorted sizes, one PNG, under train/ and validation/.

    Each class has its own dominant colour so a model can learn something.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    colours = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40)]
    for split, counts in (("train", [train_per_class] * classes), ("validation", list(eval_per_class))):
        for label in range(classes):
            class_dir = root / split / f"class_{label}"
            class_dir.mkdir(parents=True, exist_ok=True)
            for index in range(counts[label]):
                height, width = rng.integers(48, 96, size=2)
                noise = rng.integers(-40, 40, size=(height, width, 3))
                pixels = np.clip(np.array(colours[label]) + noise, 0, 255).astype(np.uint8)
                suffix = "png" if (split, label, index) == ("train", 0, 0) else "jpg"
                Image.fromarray(pixels).save(class_dir / f"img_{index}.{suffix}")
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("images"))
