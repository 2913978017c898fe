"""One step: TrainState, the train and eval steps (steps), the optimizer (optim) and what a step measures
(metrics). Pure JAX/optax, no TensorFlow (the GPU benchmark runs without it); placed on devices by parallel/.
"""
