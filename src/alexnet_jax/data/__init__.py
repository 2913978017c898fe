"""Input: sources (TFDS, image folders, the demo set, packs), augmentation on the host (augment, tf.data) and on
the device (device_augment, pure JAX), the tf.data pipeline, and writing packs and resized copies (pack, resize).

This package never imports the model or the training code (pyproject.toml's import-linter contracts).
"""
