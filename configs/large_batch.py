"""Large-batch AlexNet on ImageNet with LARS: global batch 8,192 across a pod slice.

    # on every host of a TPU v4-64 slice (jax.distributed starts from the TPU environment):
    python launch.py --config=configs/large_batch.py --workdir=/mnt/shared/runs/lars8k \
        --config.data_dir=gs://BUCKET/tensorflow_datasets

Hardware: a TPU pod slice or a multi-node GPU cluster (32+ accelerators); the
global batch must divide by the total device count. Runtime: about 1-2 hours on
a v4-64 slice, bound by JPEG decoding unless the data is pre-resized (docs/data.md).
References: You, Gitman & Ginsburg 2017 ("Large Batch Training of Convolutional
Networks", LARS) trained AlexNet (with batch norm) at batch 8K without losing
accuracy; Jia et al. 2018 ("Highly Scalable Deep Learning Training System with
Mixed-Precision") trained AlexNet for 95 epochs to 58.7% top-1 in 4 minutes on
1,024 P40 GPUs. Recipe: LARS (momentum 0.9, weight decay 5e-4, trust
coefficient 0.001; biases excluded from weight decay and the trust ratio), lr
0.25 per 256 images scaled linearly to the global batch (8.0 at 8,192, inside
the 2-10 range You et al. used with warmup), 5 warmup epochs, then cosine decay
to zero over 95 epochs; bf16 compute, float32 parameters.
Parallelism: "data" (jit on a global mesh of every chip of every host, the batch
split over it, parameters replicated). At 8K images a step the weird trick's
activation traffic, which grows with the batch, eats most of what it saves on
gradients (docs/distributed.md: on 32 devices the best mesh, 8x4, still moves about
half of data parallelism's bytes, and its all-gathers sit on the critical path where
the gradient all-reduce overlaps the backward pass); a pod slice's fast links make
the all-reduce cheap; and towers are the paper variant's. LARS's per-layer norms are
taken over whole layers under any scheme.
Expected result: near the single-GPU recipe's accuracy (about 56-58% top-1 with
the torchvision variant, which has no batch norm; You et al. report 58% for
AlexNet-BN at 8K), not measured here.
"""

from alexnet_jax.config import base_config


def get_config():
    config = base_config()
    config.dataset = "imagenet2012"
    config.model = "torchvision"
    config.init = "modern"
    config.input_scale = "standardized"  # He init and the torchvision variant: unit-scale inputs
    config.batch_size = 8192
    config.parallelism = "data"  # see the docstring: gradients, not activations, are the cheaper traffic at 8K
    config.optimizer = "lars"
    config.learning_rate = 0.25  # for batch 256; x32 at 8,192 (linear scaling) = 8.0
    config.lr_scaling = "linear"
    config.lr_base_batch_size = 256
    config.lars_trust_coefficient = 0.001
    config.weight_decay = 5e-4
    config.momentum = 0.9
    config.schedule = "cosine"
    config.warmup_epochs = 5.0
    config.num_epochs = 95.0
    config.eval_batch_size = 8192
    config.log_every_steps = 20
    config.dtype = "bfloat16"
    return config
