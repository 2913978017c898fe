"""Allowed values of the input options and the colour noise's constants, defined once.

No TensorFlow and no JAX: config.py and the on-device augmentation import them.
"""

RESIZE_METHODS = ("bilinear", "area")  # augment.resize: crop window -> image_size
EVAL_CROPS = (1, 10)  # 1 = the centre crop; 10 = the paper's test (four corners and centre, mirrored)

# The PCA of ImageNet's RGB covariance for pixels in [0, 1] (eigenvalues, eigenvectors) that the paper's
# colour noise uses, as torchvision and fb.resnet.torch publish them.
PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
PCA_EIGVEC = (  # columns are the eigenvectors
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)
