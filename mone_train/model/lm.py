"""The language-modelling objective around a megatron-core GPTModel.

Legend: B micro batch, S sequence length.
"""

from __future__ import annotations

import torch


def causal_mask(seq_length: int, device: torch.device) -> torch.Tensor:
    """[1, 1, S, S] boolean mask, True above the diagonal (positions a token may not see)."""
    ones_SS = torch.ones(seq_length, seq_length, dtype=torch.bool, device=device)
    return torch.triu(ones_SS, 1)[None, None]


def lm_loss(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    mask: torch.Tensor,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of per-token LM loss over unmasked tokens, their count) for one micro batch.

    ``batch`` holds GPTDataset's ``tokens``, ``labels``, ``loss_mask``, ``position_ids``
    (each [B, S]); the model returns the per-token cross-entropy when given labels.
    """
    tokens_BS = batch["tokens"].to(device, non_blocking=True)
    labels_BS = batch["labels"].to(device, non_blocking=True)
    loss_mask_BS = batch["loss_mask"].to(device, non_blocking=True).float()
    position_ids_BS = batch["position_ids"].to(device, non_blocking=True)
    # the loss mask also weighs the multi-token prediction loss (model.mtp_num_layers)
    per_token_BS = model(tokens_BS, position_ids_BS, mask, labels=labels_BS, loss_mask=loss_mask_BS)
    return (per_token_BS.float() * loss_mask_BS).sum(), loss_mask_BS.sum()
