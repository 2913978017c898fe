"""The paper's Figure 3: the first layer's filters drawn as images.

The paper shows its 96 conv1 kernels (11x11x3) as two blocks of 48, one per GPU:
the first tower's are largely colour-agnostic, the second's colour-specific.
Our paper variant keeps the two towers as the first and last 48 output channels
of conv1, so the grid draws them side by side in that order.

numpy and PIL only; TensorFlow is imported just to write the TensorBoard image.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

FILTERS_FILE = "conv1_filters.png"
_BACKGROUND = 255  # white between filters and towers


def _filter_tiles(kernel: np.ndarray, scale: int) -> np.ndarray:
    """[kh, kw, 3, C] -> [C, kh*scale, kw*scale, 3] uint8, each filter stretched to the full range.

    Per-filter scaling shows every filter's pattern, as in the paper's figure,
    even where the filters' magnitudes differ a lot.
    """
    tiles = np.transpose(kernel, (3, 0, 1, 2)).astype(np.float64)  # [C, kh, kw, 3]
    low = tiles.min(axis=(1, 2, 3), keepdims=True)
    high = tiles.max(axis=(1, 2, 3), keepdims=True)
    tiles = (tiles - low) / np.maximum(high - low, 1e-12)
    tiles = np.round(tiles * 255).astype(np.uint8)
    return tiles.repeat(scale, axis=1).repeat(scale, axis=2)


def _grid(tiles: np.ndarray, columns: int, gap: int) -> np.ndarray:
    count, height, width, _ = tiles.shape
    rows = -(-count // columns)
    grid = np.full((rows * (height + gap) - gap, columns * (width + gap) - gap, 3), _BACKGROUND, np.uint8)
    for index, tile in enumerate(tiles):
        row, column = divmod(index, columns)
        top, left = row * (height + gap), column * (width + gap)
        grid[top : top + height, left : left + width] = tile
    return grid


def conv1_filter_grid(params: Any, variant: str, *, scale: int = 4, gap: int = 2) -> np.ndarray:
    """conv1's filters as one uint8 [H, W, 3] image.

    paper: two 6x8 blocks side by side, filters 0-47 (tower 1) left and 48-95
    (tower 2) right, as in the paper's Figure 3. torchvision: one 8x8 block.
    """
    kernel = np.asarray(params["conv1"]["kernel"])  # [11, 11, 3, C]
    tiles = _filter_tiles(kernel, scale)
    if variant != "paper":
        return _grid(tiles, columns=int(np.ceil(np.sqrt(len(tiles)))), gap=gap)
    half = len(tiles) // 2
    towers = [_grid(tiles[:half], columns=8, gap=gap), _grid(tiles[half:], columns=8, gap=gap)]
    separator = np.full((towers[0].shape[0], 6 * gap, 3), _BACKGROUND, np.uint8)
    return np.concatenate([towers[0], separator, towers[1]], axis=1)


def write_conv1_filters(workdir: str, params: Any, variant: str, step: int, *, summary_writer: Any = None) -> str:
    """Draw conv1 into WORKDIR/conv1_filters.png (overwritten) and a TensorBoard image at `step`.

    summary_writer: a tf.summary writer to reuse (e.g. the run's scalar writer);
    without one, a writer is opened on WORKDIR for this image and closed again.
    Call from process 0 only, like the other writers. Returns the PNG's path.
    """
    from PIL import Image

    grid = conv1_filter_grid(params, variant)
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, FILTERS_FILE)
    temporary = path + ".tmp.png"
    Image.fromarray(grid).save(temporary)
    os.replace(temporary, path)
    try:
        import tensorflow as tf
    except ImportError:
        log.warning("TensorFlow is not installed: conv1 filters written to %s only", path)
        return path
    writer = summary_writer or tf.summary.create_file_writer(workdir)
    with writer.as_default(step=int(step)):
        tf.summary.image("conv1_filters", grid[None], step=int(step), description="conv1 filters (Figure 3)")
    writer.flush()
    if summary_writer is None:
        writer.close()
    return path
