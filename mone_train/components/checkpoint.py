"""Checkpoints with megatron-core dist_checkpointing (torch_dist): exact resume, resharding.

Layout under ``<run_dir>/checkpoints/``:

    step_00000100/          one complete checkpoint (megatron-core sharded format)
        COMPLETE.json       completion marker, written last: step and model signature
        rng/rank<r>.pt      each rank's RNG states
    latest                  name of the newest complete checkpoint (updated after the rename)

A save writes into ``.tmp-step_<N>``, makes the files durable (fsync), writes the marker, then
renames the folder into place and updates ``latest``. A folder without the marker is never
loaded: ``resume=auto`` skips it with a warning, an explicit path to it is an error.

The model's sharded state dict is megatron-core's own (MoNE experts keep SequentialMLP's expert
offsets), and AdamW's moments are saved as sharded tensors mirroring their parameters, so a
checkpoint saved at one expert-parallel size loads at another.
"""

from __future__ import annotations

import functools
import json
import multiprocessing.queues
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from mone_train.config import Config
from mone_train.errors import ConfigError, first_line
from mone_train.parallel.process_groups import on_cuda

CHECKPOINTS = "checkpoints"
MARKER = "COMPLETE.json"
LATEST = "latest"


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used; the message names it and why."""


def single_threaded_collectives(fn):
    """Run ``fn`` with torch's intra-op thread count at 1, then restore it.

    Checkpoint saves and loads gather plans and metadata as pickled objects. On CPU the gloo
    backend copies a gathered buffer with a torch op inside one of its own worker threads, and a
    copy of 32 k elements or more opens an OpenMP team there: one more thread that libgomp
    manages. With more managed threads than CPUs libgomp shortens its spin-wait for the rest of
    the process (300,000 → 100 iterations), so every parallel region of the training step
    sleeps and wakes through futexes afterwards: on the 2-core CPU machine the `small` step ran
    1.45x slower after the first save. A thread takes its OpenMP thread count from torch's
    setting at its first torch op, so collectives started while the setting is 1 leave gloo's
    threads single-threaded for good. Nothing changes on GPU (NCCL moves the data there).
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(previous)

    return wrapper


@dataclass
class ResumePoint:
    """What a checkpoint restores besides tensors."""

    path: Path
    step: int
    consumed_samples: int
    wandb_id: str | None


def model_signature(cfg: Config, vocab_size: int) -> dict:
    """The shape-defining values; a checkpoint only loads into a model with the same ones."""
    m = cfg.model
    signature = {
        "num_layers": m.num_layers,
        "hidden_size": m.hidden_size,
        "num_attention_heads": m.num_attention_heads,
        "num_query_groups": m.num_query_groups,
        "ffn_hidden_size": m.ffn_hidden_size,
        "num_experts": m.num_experts,
        "moe_ffn_hidden_size": m.moe_ffn_hidden_size,
        "moe_layer_freq": m.moe_layer_freq,
        "tie_embeddings": m.tie_embeddings,
        "vocab_size": vocab_size,
    }
    # The recipes' tensors, named only when present, so that checkpoints written before the
    # families existed keep their signature.
    recipe = {
        "head_dim": m.head_dim,
        "first_dense_layers": m.first_dense_layers,
        "shared_expert_ffn_hidden_size": m.shared_expert_ffn_hidden_size,
        "shared_expert_gate": m.shared_expert_gate,
        "qk_layernorm": m.qk_layernorm if m.qk_layernorm != "none" else None,
        "qkv_bias": m.qkv_bias,
        "router_expert_bias": m.router_expert_bias,
        "neuron_bias": cfg.moe.neuron_bias_on(),
    }
    signature.update({key: value for key, value in recipe.items() if value})
    return signature


def signature_mismatch(saved: dict, current: dict) -> list[str]:
    """``key: saved vs current`` for every differing shape value."""
    return [
        f"{key} {saved.get(key)!r} (checkpoint) vs {current.get(key)!r} (config)"
        for key in sorted(set(saved) | set(current))
        if saved.get(key) != current.get(key)
    ]


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The run's complete checkpoints (those with a marker), oldest first."""
    folder = run_dir / CHECKPOINTS
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("step_*") if (p / MARKER).is_file())


def newest_checkpoint(run_dir: Path, warn: bool = True) -> Path | None:
    """The newest complete checkpoint of a run directory, or None.

    ``latest`` names it when the last save finished; a folder without the marker (a save that
    was killed) is never chosen, and with ``warn`` each one skipped is reported.
    """
    folder = run_dir / CHECKPOINTS
    latest = folder / LATEST
    if latest.is_file():
        named = folder / latest.read_text().strip()
        newer = [p for p in folder.glob("step_*") if p.name > named.name]
        if (named / MARKER).is_file() and not any((p / MARKER).is_file() for p in newer):
            return named
    for path in sorted(folder.glob("step_*"), reverse=True) if folder.is_dir() else []:
        if (path / MARKER).is_file():
            return path
        if warn:
            warnings.warn(f"skipping incomplete checkpoint {path} (no {MARKER})", stacklevel=2)
    return None


def resolve_checkpoint(path: Path, key: str = "checkpoint") -> Path:
    """``path`` itself when it is a complete checkpoint, else a run directory's newest one.

    Raises CheckpointError (prefixed with ``key``, the option or config key that named
    ``path``) for a missing path, an interrupted save or a run without a complete checkpoint.
    """
    path = Path(path).expanduser()
    if (path / MARKER).is_file():
        return path
    if not path.is_dir():
        raise CheckpointError(f"{key}={str(path)!r}: no such checkpoint directory")
    if path.name.startswith(STAGING_PREFIX):
        raise CheckpointError(f"{key}={str(path)!r} is a save {_SAVE_IN_PROGRESS}")
    if not (path / CHECKPOINTS).is_dir():
        if (path / RUN_CONFIG).is_file():
            raise CheckpointError(f"{key}={str(path)!r}: {_NO_SAVE}")
        raise CheckpointError(
            f"{key}={str(path)!r} is incomplete (no {MARKER}); a save was interrupted "
            "(expected a complete checkpoint or a run directory)"
        )
    newest = newest_checkpoint(path, warn=False)
    if newest is None:
        staging = sorted((path / CHECKPOINTS).glob(f"{STAGING_PREFIX}*"))
        if staging:
            where = f"{CHECKPOINTS}/{staging[-1].name}"
            raise CheckpointError(
                f"{key}={str(path)!r}: its only save, {where}, is {_SAVE_IN_PROGRESS}"
            )
        raise CheckpointError(f"{key}={str(path)!r}: {_NO_SAVE}")
    return newest


STAGING_PREFIX = ".tmp-"  # a save is written here, then renamed to step_<N> (save_checkpoint)
RUN_CONFIG = "config.yaml"  # what every run directory holds from its start (run_dir.py)
_SAVE_IN_PROGRESS = (
    f"still being written (no {MARKER} yet): use it once the save completes and is "
    "renamed to step_<N> (if its run was killed during the save, it never will)"
)
_NO_SAVE = (
    f"a run directory that saved no checkpoint (no {CHECKPOINTS}/step_*/{MARKER}): train with "
    "trainer.save_interval=N > 0 (the last step then always saves), or send SIGUSR1 to a "
    "running job to save at its next step"
)


def find_checkpoint(run_dir: Path, resume: str) -> Path | None:
    """The checkpoint ``trainer.resume`` asks for: ``none``, ``auto`` or an explicit path."""
    if resume == "none":
        return None
    if resume == "auto":
        return newest_checkpoint(run_dir)
    return resolve_checkpoint(Path(resume), key="trainer.resume")


def read_marker(path: Path) -> dict:
    """The completion marker of checkpoint ``path`` (step, signature, resolved config)."""
    try:
        return json.loads((path / MARKER).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path}: unreadable {MARKER} ({err})") from None


def config_from_marker(path: Path, marker: dict) -> Config:
    """The run's Config as saved in the marker, for code that rebuilds the model.

    Only the sections that define the model and its evaluation are taken (model, moe, trainer,
    data.tokenizer), so a checkpoint stays readable when other parts of the schema change.
    """
    from omegaconf import OmegaConf

    try:
        saved = marker["config"]
        wanted = {key: saved[key] for key in ("model", "moe", "trainer") if key in saved}
        tokenizer = (saved.get("data") or {}).get("tokenizer")
        if tokenizer is not None:
            wanted["data"] = {"tokenizer": tokenizer}
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), wanted))
    except Exception as err:
        raise CheckpointError(
            f"checkpoint {path}: the config in {MARKER} does not fit this version's schema "
            f"({first_line(err)})"
        ) from None


# Buffers a model may have that its source did not (a run started from an import with the
# neuron bias on, or with loss-free balancing): they keep their initial zeros.
OPTIONAL_BUFFERS = ("neuron_bias", "router.expert_bias")


@single_threaded_collectives
def load_model_weights(
    path: Path, model: torch.nn.Module, key: str = "checkpoint", optional: tuple[str, ...] = ()
) -> None:
    """Read only the model's weights from checkpoint ``path`` (any expert-parallel size).

    ``model`` is the bare GPTModel (not DDP-wrapped); the optimizer moments stay on disk.
    Tensors whose names end with one of ``optional`` may be absent from the checkpoint.
    Errors name ``key`` (the option that named the checkpoint) and ``path``.
    """
    from megatron.core import dist_checkpointing

    try:
        wanted = model_sharded_state_dict(model)
        if optional:
            available = dist_checkpointing.load_tensors_metadata(str(path))
            wanted = {k: v for k, v in wanted.items()
                      if not k.endswith(optional) or getattr(v, "key", k) in available}  # fmt: skip
        loaded = dist_checkpointing.load({"model": wanted}, str(path))
        missing, _ = model.load_state_dict(loaded["model"], strict=False)
        if optional:
            missing = [k for k in missing if not k.endswith(optional)]
    except (Exception, CheckpointException) as err:  # truncated files fail in many ways
        raise CheckpointError(
            f"{key} {path}: the weights cannot be loaded ({first_line(err)})"
        ) from None
    missing = [key for key in missing if not key.endswith("_extra_state")]
    if missing:
        raise CheckpointError(
            f"{key} {path}: the checkpoint lacks weights of this model ({missing[0]} and "
            f"{len(missing) - 1} more)"
        )


def load_initial_weights(source: str, model: torch.nn.Module, signature: dict) -> Path:
    """``trainer.init_from``: the weights of a run, checkpoint or import of the same shape
    into ``model`` (the bare GPTModel). Recipe buffers the source lacks keep their zeros."""
    path = resolve_checkpoint(Path(source), key="trainer.init_from")
    saved = read_marker(path).get("signature", {})
    optional_keys = ("neuron_bias", "router_expert_bias")
    mismatched = signature_mismatch(
        {k: v for k, v in saved.items() if k not in optional_keys},
        {k: v for k, v in signature.items() if k not in optional_keys},
    )
    if mismatched:
        raise CheckpointError(
            f"trainer.init_from={source!r} holds a model of another shape "
            f"({'; '.join(mismatched)}); its model settings are in its config "
            "(mone-import writes them to arch/imported.yaml)"
        )
    load_model_weights(path, model, key="trainer.init_from", optional=OPTIONAL_BUFFERS)
    return path


def _init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create AdamW's (zero) moments so that the state has a shape to load into."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _with_masters(model_sd: dict, module: torch.nn.Module) -> dict:
    """The model's sharded state dict with each bf16 weight's fp32 master in its place (a
    checkpoint always holds fp32 weights, whatever the precision it was trained in) and, with
    a sharded optimizer, each weight written by the rank that owns its optimizer state."""
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    params = {id(p): p for p in module.parameters()}
    for value in nested_values(model_sd):
        # fc1 of gated experts is a factory (gate and up saved apart) over the weight
        if not isinstance(value, (ShardedTensor, ShardedTensorFactory)):
            continue
        param = params.get(id(value.data))
        if param is None:
            continue
        if hasattr(param, "optimizer_owned"):
            # ZeRO-1: the weight's owner writes it (and its optimizer state, which inherits
            # this), from its fp32 master in bf16 runs; other ranks' copies are replicas.
            value.replica_id = _replica(value.replica_id, main=param.optimizer_owned)
        if hasattr(param, "main_param"):
            value.data = param.main_param
        elif param.dtype != torch.float32:
            # a bf16 weight whose master another rank owns (ZeRO-1): this copy is a replica,
            # not written, but every copy of a tensor must have the checkpoint's dtype; on
            # load it receives the fp32 weight and _load_weights casts it into the parameter
            value.data = param.detach().float()
    return model_sd


def _replica(replica_id, main: bool):
    """The replica id with its data-parallel part (megatron's last entry) set to 0 on the
    weight's owner and 1 elsewhere. The other entries stay: a weight duplicated over tensor
    parallel ranks (a norm's) is owned by one data-parallel rank in every tensor-parallel
    position, and only tensor-parallel rank 0 of those is the main copy."""
    if isinstance(replica_id, int):
        return 0 if main else 1
    return (*replica_id[:-1], 0 if main else 1)


def _load_weights(module: torch.nn.Module, loaded: dict) -> None:
    """Loaded (fp32) weights into the model and, for bf16 weights, into their masters too."""
    module.load_state_dict(loaded, strict=False)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if hasattr(param, "main_param") and name in loaded:
                param.main_param.copy_(loaded[name])


def model_sharded_state_dict(model) -> dict:
    """megatron's sharded state dict of a bare GPTModel. Its metadata is passed, not left to
    megatron's default: on a later pipeline stage with multi-token prediction (which holds a
    copy of the word embedding) megatron-core 0.16.1's GPTModel reads
    ``metadata['dp_cp_group']`` itself, and None fails there."""
    from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

    return model.sharded_state_dict(metadata=ensure_metadata_has_dp_cp_group(None))


def _sharded_state_dict(model, optimizer) -> dict:
    from megatron.core.dist_checkpointing.optimizer import (
        get_param_id_to_sharded_param_map,
        optim_state_to_sharding_state,
    )

    model_sd = _with_masters(model_sharded_state_dict(model.module), model.module)
    _init_optimizer_state(optimizer)
    optim_sd = optimizer.state_dict()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    id_map = get_param_id_to_sharded_param_map(model_sd, params)
    # AdamW's per-parameter step counts equal the global step: saved once, in "common".
    optim_state_to_sharding_state(optim_sd, id_map, exclude_keys=("step",))
    return {"model": model_sd, "optimizer": optim_sd}


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_bytes_share(model) -> int:
    """Bytes of a checkpoint that this rank holds the first copy of: parameters and AdamW's two
    moments in fp32 (metadata is small beside them). Summed over the ranks (one all-reduce),
    the checkpoint's size at any layout: a dense weight is counted by data-parallel rank 0 (a
    weight every tensor-parallel rank holds whole, by TP rank 0 only), an expert weight by
    expert-data-parallel rank 0; pipeline stages and slices each count their own."""
    from megatron.core import parallel_state

    from mone_train.model.init import is_tensor_split

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    first_dense = parallel_state.get_data_parallel_rank() == 0
    first_expert = parallel_state.get_expert_data_parallel_rank() == 0
    total = 0
    for p in model.parameters():  # (the optimizer's fp32 masters lack megatron's attributes)
        if not p.requires_grad:
            continue
        if not getattr(p, "allreduce", True):
            mine = first_expert
        else:
            mine = first_dense and (tp_rank == 0 or is_tensor_split(p, tp_size))
        total += p.numel() * 4 * 3 if mine else 0  # fp32 weight (or master), exp_avg, exp_avg_sq
    return total


def free_bytes(folder: Path) -> int:
    """Free bytes on the file system that holds ``folder`` (or its nearest existing parent)."""
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


def require_free_space(folder: Path, need: int, key: str) -> None:
    """CheckpointError naming ``key`` when the disk of ``folder`` has less than ``need`` bytes
    free (checked before anything is written)."""
    free = free_bytes(folder)
    if need > free:
        raise CheckpointError(
            f"{key} {folder}: writing it needs {_size(need)} but its disk has {_size(free)} "
            "free (choose a folder on a disk with more space)"
        )


def _size(num_bytes: int) -> str:
    return f"{num_bytes / 1e9:,.2f} GB" if num_bytes >= 10**8 else f"{num_bytes / 1e6:,.1f} MB"


@single_threaded_collectives
def save_checkpoint(
    run_dir: Path,
    model,
    optimizer,
    *,
    step: int,
    consumed_samples: int,
    signature: dict,
    resolved_config: dict,
    wandb_id: str | None,
    keep_last: int,
    protect: Path | None = None,
    async_queue=None,
) -> Path:
    """Save atomically (all ranks call this); return the checkpoint folder it will become.

    With ``async_queue`` (megatron's ``AsyncCallsQueue``) only the plan and the RNG files are
    written now: the tensors are written by a forked writer while training goes on, and the
    marker, the rename and ``latest`` follow when the queue finalizes the request on every
    rank. ``protect`` is never deleted by the ``keep_last`` rotation.
    """
    from megatron.core import dist_checkpointing

    use_forked_results_queue()
    rank = dist.get_rank()
    folder = run_dir / CHECKPOINTS
    final = folder / f"step_{step:08d}"
    staging = folder / f"{STAGING_PREFIX}{final.name}"
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)  # left by a save that was killed
        staging.mkdir()
    dist.barrier()
    state = _sharded_state_dict(model, optimizer)
    state["common"] = {"step": step, "consumed_samples": consumed_samples, "wandb_id": wandb_id}
    marker = {
        "step": step,
        "signature": signature,
        "world_size": dist.get_world_size(),
        "config": resolved_config,
    }
    commit = _Commit(staging, final, marker, keep_last, protect) if rank == 0 else None
    if async_queue is None:
        dist_checkpointing.save(state, str(staging))
        _save_rng_states(staging, rank)
        if commit is not None:
            commit()
        dist.barrier()
        return final
    request = dist_checkpointing.save(state, str(staging), async_sharded_save=True)
    _save_rng_states(staging, rank)
    if commit is not None:
        request.add_finalize_fn(commit)
    # Finalizing gathers every rank's write results: the same guard as the save itself.
    request = request._replace(
        finalize_fns=[single_threaded_collectives(fn) for fn in request.finalize_fns]
    )
    async_queue.schedule_async_request(request)
    return final


def use_forked_results_queue() -> None:
    """Give megatron-core's file writer a fork-context results queue instead of the
    ``multiprocessing.Manager`` it spawns on first use (a second interpreter that re-imports
    the training script). Our writers are forked (megatron's temporal async caller, and its
    per-bucket workers), so a queue created here reaches them."""
    import multiprocessing

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        context = multiprocessing.get_context("fork")
        filesystem_async._results_queue = _ResultsQueue(ctx=context)


RESULTS_WAIT_S = 120.0  # the results are in flight when megatron reads them: never longer


class _ResultsQueue(multiprocessing.queues.Queue):
    """A queue whose ``get_nowait`` waits for an item already put.

    megatron reads the write results with ``get_nowait()``. In a synchronous save the results
    were put by this very process a moment before, and a ``multiprocessing`` queue hands them
    to the pipe from a feeder thread: read at once, the queue can still look empty (the save
    then failed now and then with *results_queue should not be empty*). The Manager queue
    megatron would create is synchronous; this one waits instead.
    """

    def get_nowait(self):
        return self.get(timeout=RESULTS_WAIT_S)


def _save_rng_states(staging: Path, rank: int) -> None:
    """Each rank's generator states into ``staging/rng/rank<r>.pt`` (all ranks call this)."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    if rank == 0:
        (staging / "rng").mkdir()
    dist.barrier()
    rng = {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if on_cuda() else None,
        "tracker": get_cuda_rng_tracker().get_states(),
    }
    torch.save(rng, staging / "rng" / f"rank{rank}.pt")
    dist.barrier()


@dataclass
class _Commit:
    """The main rank's last part of a save, once every rank's data is on disk: make it
    durable, write the marker, rename into place, point ``latest`` at it, rotate old ones."""

    staging: Path
    final: Path
    marker: dict
    keep_last: int
    protect: Path | None

    def __call__(self) -> None:
        folder = self.final.parent
        _fsync_tree(self.staging)
        with open(self.staging / MARKER, "w") as f:
            json.dump(self.marker, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        if self.final.exists():  # the same step saved again (preemption right after a save)
            shutil.rmtree(self.final)
        self.staging.rename(self.final)
        _fsync_dir(folder)
        latest_tmp = folder / f".{LATEST}.tmp"
        latest_tmp.write_text(self.final.name + "\n")
        latest_tmp.rename(folder / LATEST)
        _fsync_dir(folder)
        complete = sorted(p for p in folder.glob("step_*") if (p / MARKER).is_file())
        for old in complete[: -self.keep_last] if self.keep_last > 0 else []:
            if old != self.protect:
                shutil.rmtree(old)


@single_threaded_collectives
def load_checkpoint(path: Path, model, optimizer, signature: dict) -> ResumePoint:
    """Restore model, optimizer and this rank's RNG from ``path`` (all ranks call this)."""
    if read_marker(path).get("weights_only"):
        raise CheckpointError(
            f"checkpoint {path} holds weights only (an import): start a run from it with "
            "trainer.init_from, not trainer.resume"
        )
    from megatron.core import dist_checkpointing
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    marker = read_marker(path)
    mismatched = signature_mismatch(marker.get("signature", {}), signature)
    if mismatched:
        raise CheckpointError(
            f"checkpoint {path} was saved for a different model: {'; '.join(mismatched)}"
        )
    try:
        loaded = dist_checkpointing.load(_sharded_state_dict(model, optimizer), str(path))
        _load_weights(model.module, loaded["model"])
        step = torch.tensor(float(loaded["common"]["step"]))
        for param_state in loaded["optimizer"]["state"].values():
            param_state["step"] = step.clone()
        optimizer.load_state_dict(loaded["optimizer"])
        # Fresh, aligned storage like a never-saved run's: loaded tensors may be views into
        # read buffers, and CPU kernels round differently on unaligned vector tails.
        for param_state in optimizer.state.values():
            for key, value in param_state.items():
                if torch.is_tensor(value):
                    param_state[key] = value.clone(memory_format=torch.contiguous_format)
    except CheckpointError:
        raise
    # Truncated or corrupted files surface as many exception types (torch's
    # CheckpointException derives from BaseException, not Exception).
    except (Exception, CheckpointException) as err:
        raise CheckpointError(f"checkpoint {path} cannot be loaded: {first_line(err)}") from None
    common = loaded["common"]
    rng_file = path / "rng" / f"rank{dist.get_rank()}.pt"
    if rng_file.is_file():  # absent when resuming on more ranks than saved
        rng = torch.load(rng_file, weights_only=False)
        torch.set_rng_state(rng["cpu"])
        if rng["cuda"] is not None and on_cuda():
            torch.cuda.set_rng_state(rng["cuda"])
        get_cuda_rng_tracker().set_states(rng["tracker"])
    return ResumePoint(path, common["step"], common["consumed_samples"], common.get("wandb_id"))
