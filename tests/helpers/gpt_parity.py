"""Whole-model parity helpers: a seeded `tiny` GPTModel, and its loss and gradients on a batch.

Tests that swap one part of the model (core attention, norms, RoPE) build the two variants
here, load one's weights into the other and compare what ``loss_and_grads`` returns.
"""

from __future__ import annotations

import torch

VOCAB = 258


def tiny_gpt(*overrides: str):
    """``build_gpt_model`` of ``model=tiny`` + ``overrides``, seeded (needs megatron's groups)."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from mone_train.compose import compose_config
    from mone_train.model.builder import build_gpt_model

    cfg = compose_config(["model=tiny", *overrides])
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    return build_gpt_model(cfg, VOCAB)


def meta_parameter_count(cfg, vocab_size: int) -> int:
    """Parameters of ``cfg``'s GPTModel, built on the meta device (no memory; needs megatron's
    groups): what the planner's counts are checked against."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from mone_train.model.builder import build_gpt_model

    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    return sum(p.numel() for p in build_gpt_model(cfg, vocab_size, meta=True).parameters())


def loss_and_grads(model, seq: int = 32, batch: int = 2, seed: int = 5):
    """Per-token LM loss of a fixed random batch and every parameter's gradient after
    ``loss.mean().backward()`` (gradients accumulate: call once per fresh model)."""
    from mone_train.model.lm import causal_mask

    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (batch, seq), generator=gen)
    positions = torch.arange(seq)[None].expand(batch, seq)
    loss = model(tokens, positions, causal_mask(seq, torch.device("cpu")), labels=tokens)
    loss.mean().backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


def kernel_run_losses(run_dir, impl: str, device: str = "cpu") -> list[float]:
    """Losses of a 5-step `tiny` training run (and its final validation) with
    ``moe.kernel_impl=impl`` on ``device``, in logged order."""
    from tests.helpers.distributed import losses, train

    train(
        run_dir, 1, "trainer.steps=5", "trainer.eval_interval=5", "trainer.eval_iters=1",
        "trainer.micro_batch_size=4", "trainer.global_batch_size=4", f"moe.kernel_impl={impl}",
        device=device,
    )  # fmt: skip
    return losses(run_dir)
