"""Input: sources (TFDS, image folders, the demo set), augmentation and the tf.data pipeline.

This package never imports the model or the training code.
"""
