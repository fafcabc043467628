"""Optimizer, learning-rate schedule and gradient clipping over megatron-core DDP buffers.

megatron-core's DistributedDataParallel accumulates gradients into ``param.main_grad`` (a view
of its contiguous buffer) and all-reduces them in ``finish_grad_sync``. A ``torch.optim`` AdamW
then steps on those buffers: before each step the gradient of the weight it updates is pointed
at ``main_grad``.

Mixed precision (``trainer.precision=bf16``, megatron's scheme): model weights are bf16 and each
keeps its fp32 master in ``param.main_param``; the DDP buffers are fp32 (``grad_reduce_in_fp32``).
AdamW holds and updates the fp32 masters with the fp32 gradients, then the masters are rounded
into the bf16 weights (:func:`copy_masters_to_params`). In fp32 the weight is its own master.
Megatron's own mixed-precision optimizers hard-code CUDA tensors, so this is ours, the same code
on CPU and GPU.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from mone_train.config import OptimConfig


def master_of(param: torch.nn.Parameter) -> torch.Tensor:
    """The fp32 tensor the optimizer updates for ``param`` (itself when it is fp32)."""
    return getattr(param, "main_param", param)


def build_optimizer(cfg: OptimConfig, params: list[torch.nn.Parameter]) -> torch.optim.AdamW:
    """AdamW over the parameters' fp32 masters, in ``params`` order (with sharding: the ones
    this rank owns); weight decay on matrices only (norm scales and biases are not decayed)."""
    if cfg.fused:
        # torch's fused CPU kernel silently computes wrong updates on strided tensors.
        for p in params:
            for tensor in (master_of(p), getattr(p, "main_grad", None)):
                if tensor is not None and not tensor.is_contiguous():
                    raise ValueError(
                        f"optim.fused=true needs contiguous weights and gradients; a "
                        f"{tuple(tensor.shape)} tensor is strided (set optim.fused=false)"
                    )
    decay = [master_of(p) for p in params if p.requires_grad and p.dim() >= 2]
    no_decay = [master_of(p) for p in params if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=cfg.fused,
    )


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then decay."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    min_lr = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return cfg.lr
    decay_steps = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    if cfg.schedule == "linear":
        return cfg.lr - (cfg.lr - min_lr) * progress
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * progress))


def attach_main_grads(params: list[torch.nn.Parameter]) -> None:
    """Point each master's ``.grad`` at the DDP buffer so that a torch optimizer steps on it.

    Call :func:`detach_main_grads` after the step: while ``param.grad`` is the buffer, autograd
    would accumulate the next backward into it *and* DDP's hook would add it again (doubling).
    """
    for p in params:
        master_of(p).grad = p.main_grad


def detach_main_grads(params: list[torch.nn.Parameter]) -> None:
    """Undo :func:`attach_main_grads` (the buffer keeps its values until zeroed)."""
    for p in params:
        master_of(p).grad = None


def copy_masters_to_params(params: list[torch.nn.Parameter]) -> None:
    """Round the updated fp32 masters into the (bf16) model weights; nothing to do in fp32."""
    pairs = [(p.data, p.main_param) for p in params if hasattr(p, "main_param")]
    if pairs:
        weights, masters = zip(*pairs)
        torch._foreach_copy_(list(weights), list(masters))


def global_grad_norm(
    params: list[torch.nn.Parameter],
    dense_group=None,
    expert_group=None,
    tp_rank: int = 0,
    tp_size: int = 1,
) -> torch.Tensor:
    """L2 norm of all gradients of the model, each weight counted once.

    After the gradient all-reduces, a dense weight's gradient is the same on every data-parallel
    rank; tensor-parallel slices are parts of one weight, and the weights that every
    tensor-parallel rank holds whole (norms, routers) are counted on TP rank 0 only: the dense
    sum is then added up over ``dense_group`` (tensor x pipeline parallel). Expert gradients
    (``param.allreduce is False``) differ across expert-parallel ranks and pipeline stages:
    summed over ``expert_group`` (expert x pipeline parallel). The last pipeline stage's copy
    of the word embedding (multi-token prediction: megatron marks it ``shared``) has the first
    stage's gradient after their all-reduce: counted there only.
    """
    from mone_train.model.init import is_tensor_split

    dense = [p.main_grad for p in params if getattr(p, "allreduce", True)
             and not getattr(p, "shared", False)
             and (tp_rank == 0 or is_tensor_split(p, tp_size))]  # fmt: skip
    experts = [p.main_grad for p in params if not getattr(p, "allreduce", True)]
    device = params[0].main_grad.device
    dense_sq, expert_sq = (
        torch.stack(torch._foreach_norm(grads)).float().pow(2).sum()
        if grads
        else torch.zeros((), device=device)
        for grads in (dense, experts)
    )
    for group, value in ((dense_group, dense_sq), (expert_group, expert_sq)):
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(value, group=group)
    return (dense_sq + expert_sq).sqrt()


def clip_grads_(
    params: list[torch.nn.Parameter], max_norm: float, total_norm: torch.Tensor
) -> None:
    """Scale gradients in place so that their global norm is at most ``max_norm``."""
    if max_norm <= 0:
        return
    scale = max_norm / (float(total_norm) + 1e-6)
    if scale < 1.0:
        torch._foreach_mul_([p.main_grad for p in params], scale)


class OptimizerSharding:
    """ZeRO-1 by parameter: each weight's optimizer state (AdamW moments, and its fp32 master in
    bf16 runs) lives on one rank of the group that reduces its gradient, the *owner*; dense
    weights are spread over the data-parallel group, expert weights over the expert
    data-parallel group, greedily by size. Every rank still holds all (reduced) gradients and
    all weights: owners step their weights, then broadcast them to the group.

    Why our own and not megatron's DistributedOptimizer: that one allocates on CUDA and checks
    CUDA tensor types (it cannot run on the CPU our tests run on); torch's
    ZeroRedundancyOptimizer knows one process group, while expert weights need another, and
    neither saves through dist_checkpointing. Sharding whole weights instead of flat buffer
    ranges keeps each state tensor a parameter-shaped ShardedTensor, so checkpoints reshard to
    any layout like unsharded ones.
    """

    def __init__(self, params: list[torch.nn.Parameter], dense_group, expert_group) -> None:
        self.groups = {True: dense_group, False: expert_group}  # keyed by param.allreduce
        self.owner: dict[int, int] = {}  # id(param) -> global rank of its owner
        for dense, group in self.groups.items():
            members = [p for p in params if getattr(p, "allreduce", True) == dense]
            size = dist.get_world_size(group)
            load = [0] * size
            for p in sorted(members, key=lambda p: -p.numel()):  # largest first, stable
                local = min(range(size), key=lambda r: load[r])
                load[local] += p.numel()
                self.owner[id(p)] = dist.get_global_rank(group, local)
        rank = dist.get_rank()
        self.owned = [p for p in params if self.owner[id(p)] == rank]
        for p in params:
            p.optimizer_owned = self.owner[id(p)] == rank  # read by checkpointing
            if not p.optimizer_owned and hasattr(p, "main_param"):
                del p.main_param  # the master lives on the owner only
        # What each step broadcasts: (group, owner, the owner's weights), groups of size > 1.
        self.broadcasts = []
        for dense, group in self.groups.items():
            size = dist.get_world_size(group)
            for local in range(size if size > 1 else 0):  # a group of one has nobody to tell
                src = dist.get_global_rank(group, local)
                weights = [p for p in params if self.owner[id(p)] == src
                           and getattr(p, "allreduce", True) == dense]  # fmt: skip
                if weights:
                    self.broadcasts.append((group, src, weights))

    def broadcast_weights(self) -> None:
        """Send every updated weight from its owner to the rest of its group (one flat
        broadcast per owner and group)."""
        rank = dist.get_rank()
        for group, src, weights in self.broadcasts:
            tensors = [p.data for p in weights]
            flat = torch.cat([t.reshape(-1) for t in tensors])
            dist.broadcast(flat, src=src, group=group)
            if src != rank:
                pieces = flat.split([t.numel() for t in tensors])
                torch._foreach_copy_(tensors, [v.view_as(t) for v, t in zip(pieces, tensors)])


def optimizer_state_bytes(optimizer: torch.optim.Optimizer, params) -> int:
    """Bytes of optimizer state on this rank: AdamW's moments and the fp32 masters that are not
    the weights themselves (bf16 runs); counted from the tensors, after they exist."""
    total = sum(
        v.numel() * v.element_size()
        for state in optimizer.state.values()
        for k, v in state.items()
        if k != "step" and torch.is_tensor(v)
    )
    return total + sum(p.main_param.numel() * 4 for p in params if hasattr(p, "main_param"))
