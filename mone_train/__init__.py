"""mone-train: pretraining Mixture-of-Neuron-Experts GPT models on megatron-core."""

__version__ = "0.1.0"


def silence_megatron_notices() -> None:
    """Hide megatron-core's notices that say nothing to act on: its CPU fallbacks (no TE /
    Apex) and, with tensor parallelism, the points below."""
    import warnings

    import torch

    warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex) (is|are) not installed")
    warnings.filterwarnings("ignore", message=r"full scope is deprecated")
    # The experts' layers are built at expert tensor parallel 1 on purpose (each says it turns
    # sequence parallelism off); megatron's collectives use torch's older names; a CUDA tuning
    # hint (kept on GPUs).
    warnings.filterwarnings(
        "ignore", message=r"`sequence_parallel` is set to `True`, but tensor model parallel size"
    )
    warnings.filterwarnings("ignore", message=r"`torch.distributed.\w+` is deprecated")
    if not torch.cuda.is_available():
        warnings.filterwarnings("ignore", message=r"When using sequence parallelism it is recomm")
