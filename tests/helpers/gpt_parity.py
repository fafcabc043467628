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


def kernel_run_losses(run_dir, impl: str) -> list[float]:
    """Losses of a 5-step `tiny` training run (and its final validation) with
    ``moe.kernel_impl=impl``, in logged order."""
    from mone_train.compose import compose_config
    from mone_train.trainer import run
    from tests.helpers.distributed import losses

    run(
        compose_config(
            [
                "model=tiny",
                "trainer=smoke",
                "trainer.steps=5",
                "trainer.log_interval=1",
                "trainer.eval_interval=5",
                "trainer.eval_iters=1",
                "trainer.micro_batch_size=4",
                "trainer.global_batch_size=4",
                "trainer.seq_length=32",
                f"moe.kernel_impl={impl}",
                f"trainer.run_dir={run_dir}",
                "logging.wandb_mode=disabled",
            ]
        )
    )
    return losses(run_dir)
