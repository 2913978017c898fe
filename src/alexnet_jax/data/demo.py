"""The bundled demo set: scikit-learn's 1,797 handwritten digits as an image folder.

scikit-learn ships the 8x8 digits inside its wheel, so the demo needs no
download. They are written once as 32x32 RGB JPEGs in the image-folder layout
(a fixed, stratified 80/20 split), then read like any other image folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

DIGITS_SIDE = 32
_VERSION = "v1"


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "alexnet_jax" / f"digits_{_VERSION}"


def write_digits(root: str | None = None) -> Path:
    """Write the digits under root (default: the user cache) unless already there."""
    target = Path(root).expanduser() if root else default_cache_dir()
    if (target / "COMPLETE").is_file():
        return target
    if target.exists() and any(target.iterdir()):
        from alexnet_jax.errors import UserError

        raise UserError(
            f"{target} exists but holds no finished digits set; point config.data_dir at an "
            "empty or new directory (nothing there is deleted)"
        )
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0 * 255.0).round().astype(np.uint8)  # [1797, 8, 8]
    labels = digits.target
    order = np.random.default_rng(0).permutation(len(labels))
    is_eval = np.zeros(len(labels), bool)
    for digit in range(10):  # every fifth example of each class goes to validation
        members = order[labels[order] == digit]
        is_eval[members[::5]] = True
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write into a temporary sibling and rename: a crash never leaves a half set behind.
    staging = Path(tempfile.mkdtemp(prefix=".digits-", dir=target.parent))
    for index, (image, label) in enumerate(zip(images, labels)):
        split = "validation" if is_eval[index] else "train"
        class_dir = staging / split / str(label)
        class_dir.mkdir(parents=True, exist_ok=True)
        picture = Image.fromarray(image).resize((DIGITS_SIDE, DIGITS_SIDE), Image.BILINEAR)
        picture.convert("RGB").save(class_dir / f"{index:04d}.jpg", quality=95)
    (staging / "COMPLETE").write_text("sklearn digits\n")
    try:
        if target.exists():
            target.rmdir()  # empty, checked above
        staging.rename(target)
    except OSError:
        if not (target / "COMPLETE").is_file():
            raise
        shutil.rmtree(staging)  # another process finished first
    return target
