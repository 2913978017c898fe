"""The network: AlexNet (alexnet), its fast convolution paths (fast_ops), the input contract (preprocess) and
the network built from a config (build). Pure JAX/Flax: no TensorFlow, no data, no training, no mesh.
"""
