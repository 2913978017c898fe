"""torchvision's AlexNet recipe (the "one weird trick" variant) on ImageNet.

    python launch.py --config=configs/torchvision.py --workdir=runs/torchvision \
        --config.manual_dir=/data/imagenet_tars

Hardware: one or more GPUs or a TPU host. torchvision trained it with a global
batch of 256 for 90 epochs. Model: widths 64-192-384-256-256, no LRN, no
groups. Recipe: SGD momentum 0.9, weight decay 1e-4, lr 0.01 x0.1 every 30
epochs. (torchvision used RandomResizedCrop; we keep the paper's crop, flip and
colour noise.)
Expected result: about 56.5% top-1 / 79.1% top-5 accuracy, single centre crop
(torchvision's IMAGENET1K_V1 weights). Input: ImageNet mean/std standardised, as
torchvision trains and as its published weights expect.
"""

from alexnet_jax.config import base_config


def get_config():
    config = base_config()
    config.dataset = "imagenet2012"
    config.model = "torchvision"
    config.init = "modern"
    config.input_scale = "standardized"  # torchvision's (and its weights')
    config.image_size = 224
    config.batch_size = 256
    config.learning_rate = 0.01
    config.momentum = 0.9
    config.weight_decay = 1e-4
    config.schedule = "step"
    config.lr_drop_epochs = (30, 60)
    config.num_epochs = 90.0
    config.eval_crops = 1
    return config
