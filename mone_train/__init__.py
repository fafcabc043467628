"""mone-train: pretraining Mixture-of-Neuron-Experts GPT models on megatron-core."""

__version__ = "0.1.0"


def silence_megatron_notices() -> None:
    """Hide megatron-core's import-time notices about its CPU fallbacks (no TE / Apex)."""
    import warnings

    warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex) (is|are) not installed")
    warnings.filterwarnings("ignore", message=r"full scope is deprecated")
