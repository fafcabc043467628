"""mone-train: pretraining Mixture-of-Neuron-Experts GPT models on megatron-core."""

__version__ = "0.1.0"
