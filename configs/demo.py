"""The bundled demo: AlexNet (paper variant) on scikit-learn's handwritten digits.

    python launch.py --config=configs/demo.py --workdir=runs/demo

Hardware: 2 CPU cores (no accelerator). Data: 1,433 training / 364 held-out
digits shipped inside scikit-learn, written once as 32x32 JPEGs into
~/.cache/alexnet_jax/. Runtime: about 2 min 40 s on 2 cores, reaching 98.63%
held-out top-1 accuracy (README, Results; 2026-12-07). Input: ImageNet mean/std
standardised pixels, the scale He initialisation ("modern") is designed for; the
paper's raw 0-255 scale belongs with the paper's own init (configs/default.py).
"""

from alexnet_jax.config import base_config


def get_config():
    config = base_config()
    config.dataset = "demo_digits"
    config.model = "paper"
    config.init = "modern"
    config.input_scale = "standardized"  # He init expects unit-scale inputs
    config.image_size = 64  # 63 is the smallest input AlexNet's three poolings accept
    config.random_flip = False  # digits are not mirror-symmetric
    config.batch_size = 32
    config.learning_rate = 0.015
    config.schedule = "cosine"
    config.warmup_epochs = 0.5
    config.num_epochs = 6.0
    config.weight_decay = 5e-4
    config.log_every_steps = 10
    config.eval_every_steps = -1
    config.checkpoint_every_steps = -1
    return config
