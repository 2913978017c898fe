"""Allowed values of the input options, defined once (no TensorFlow: config.py imports them)."""

RESIZE_METHODS = ("bilinear", "area")  # augment.resize: crop window -> image_size
EVAL_CROPS = (1, 10)  # 1 = the centre crop; 10 = the paper's test (four corners and centre, mirrored)
