"""Initialisers matching timm's VOLO init (trunc-normal 0.02 linears and embeddings, zero biases)."""

from flax import nnx

linear_kernel_init = nnx.initializers.truncated_normal(stddev=0.02)
linear_bias_init = nnx.initializers.zeros_init()
embedding_init = nnx.initializers.truncated_normal(stddev=0.02)
# PyTorch's default Conv2d init: kaiming-uniform with a = sqrt(5), i.e. U(±1/sqrt(fan_in)).
conv_kernel_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
