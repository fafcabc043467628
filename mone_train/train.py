"""Entry point of ``mone-train`` (also ``python -m mone_train.train``).

The run reads as stages, each callable on its own (tests do):

    compose + validate config -> init distributed -> prepare data -> build model
    -> build datasets -> step loop (train, log, evaluate) -> final evaluation

Hydra composes ``configs/config.yaml`` with the command-line overrides; the resolved config is
written to ``<run_dir>/config.yaml`` beside ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from mone_train import silence_megatron_notices
from mone_train.config import Config, ConfigError, register_configs, validate
from mone_train.preflight import CONFIG_DIR, check_overrides

register_configs()


@dataclass
class TrainState:
    """What the loop advances: optimizer steps done and samples consumed (the data position)."""

    step: int = 0
    consumed_samples: int = 0


@dataclass
class IntervalStats:
    """Sums over the steps since the last log line."""

    loss: float = 0.0
    steps: int = 0
    a2a_bytes: int = 0
    start: float = field(default_factory=time.perf_counter)


class PreemptionFlag:
    """Set by SIGTERM or SIGUSR1 (what SLURM sends before the end of a job's time)."""

    def __init__(self) -> None:
        self._set = False
        self._previous = {
            sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGUSR1)
        }

    def restore(self) -> None:
        """Put back the handlers that were installed before."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        self._set = True

    def requested(self, info) -> bool:
        """Whether any rank was signalled (all ranks must agree to save together)."""
        if info.world_size == 1:
            return self._set
        flag = torch.tensor([int(self._set)], device=info.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def configure_torch(cfg: Config) -> None:
    """Threads and megatron's jit_fuser (torch.compile), before any model code runs."""
    if cfg.trainer.num_threads is not None:
        torch.set_num_threads(cfg.trainer.num_threads)
    import torch._dynamo as dynamo

    compile_enabled = cfg.trainer.compile
    if compile_enabled is None:
        # On CPU torch.compile buys nothing measurable here and costs 10-20 s on the first step.
        compile_enabled = torch.cuda.is_available()
    dynamo.config.disable = not compile_enabled


def prepare_run_dir(cfg: Config, is_main: bool) -> tuple[Path, Path | None]:
    """Create the run directory and find the checkpoint to resume from, if any.

    A directory that already holds a run is only accepted when resuming it, and only with the
    same model shape unless ``trainer.force_resume``; nothing existing is overwritten.
    """
    from mone_train.checkpoint import find_checkpoint, model_signature, signature_mismatch
    from mone_train.tracking import METRICS_FILE

    run_dir = Path(cfg.trainer.run_dir).expanduser().resolve()
    checkpoint = find_checkpoint(run_dir, cfg.trainer.resume)
    previous = run_dir / "config.yaml"
    if (run_dir / METRICS_FILE).exists() and checkpoint is None:
        raise ConfigError(
            f"trainer.run_dir={str(run_dir)!r} is invalid: expected a directory without a previous "
            f"run ({METRICS_FILE} exists there and no checkpoint to resume from)"
        )
    if checkpoint is not None and previous.is_file() and not cfg.trainer.force_resume:
        saved = OmegaConf.to_object(
            OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(previous))
        )
        mismatched = signature_mismatch(model_signature(saved, None), model_signature(cfg, None))
        if mismatched:
            raise ConfigError(
                f"trainer.run_dir={str(run_dir)!r} holds a run of another model shape "
                f"({'; '.join(m.replace('(checkpoint)', '(run_dir)') for m in mismatched)}); "
                "set trainer.force_resume=true to resume it anyway"
            )
    dist.barrier()  # every rank has looked before the main rank writes anything
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        name = (
            "config.yaml"
            if not previous.exists()
            else f"config-resumed-{time.strftime('%Y%m%d-%H%M%S')}.yaml"
        )
        (run_dir / name).write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    return run_dir, checkpoint


def prepare_data(cfg: Config, info, num_samples: tuple[int, int, int]):
    """Tokenizer and (train, valid, test) datasets; test is None when there is no test split.

    The main rank builds what has to be built (the default corpus, megatron's sample indices)
    before the other ranks read it.
    """
    from mone_train.data.corpus import prepare_stdlib_corpus
    from mone_train.data.dataset import build_blended_datasets, build_gpt_datasets
    from mone_train.data.tokenizer import tokenizer_from_config

    d, t = cfg.data, cfg.trainer
    tokenizer = tokenizer_from_config(d.tokenizer)
    if d.name == "stdlib":
        if info.is_main:
            corpus = prepare_stdlib_corpus(d.cache_dir, d.valid_every, tokenizer)
        dist.barrier()
        if not info.is_main:
            corpus = prepare_stdlib_corpus(d.cache_dir, d.valid_every, tokenizer)
        train, valid = build_gpt_datasets(
            corpus.train_prefix,
            corpus.valid_prefix,
            tokenizer,
            t.seq_length,
            t.seed,
            num_train_samples=num_samples[0],
            num_valid_samples=num_samples[1],
            cache_dir=Path(
                d.index_cache_dir or Path(corpus.train_prefix).parent / "index-cache"
            ).expanduser(),
        )
        return tokenizer, train, valid, None
    cache = Path(d.index_cache_dir or Path(d.cache_dir) / "index-cache").expanduser()
    train, valid, test = build_blended_datasets(
        list(d.paths),
        None if d.weights is None else list(d.weights),
        d.split,
        tokenizer,
        t.seq_length,
        t.seed,
        num_samples,
        cache,
    )
    return tokenizer, train, valid, test


def build_model(cfg: Config, vocab_size: int, ep_rank: int = 0, ep_size: int = 1):
    """Seeded GPT model wrapped in megatron-core DDP; returns (ddp_model, param list)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from mone_train.model.builder import build_gpt_model
    from mone_train.model.init import init_parameters_by_name

    # Same seed on every rank (dropout streams and megatron's own draws), then weights keyed by
    # global parameter name, so they do not depend on the expert-parallel layout.
    torch.manual_seed(cfg.trainer.seed)
    model_parallel_cuda_manual_seed(cfg.trainer.seed)
    model = build_gpt_model(cfg, vocab_size)
    init_parameters_by_name(
        model,
        cfg.trainer.seed,
        cfg.model.init_method_std,
        cfg.model.num_layers,
        ep_rank,
        cfg.model.num_experts // ep_size,
    )
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    ddp = DistributedDataParallel(
        config=model.config,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True),
        module=model,
    )
    return ddp, [p for p in ddp.parameters() if p.requires_grad]


def causal_mask(seq_length: int, device: torch.device) -> torch.Tensor:
    """[1, 1, s, s] boolean mask, True above the diagonal (positions a token may not see)."""
    return torch.triu(torch.ones(seq_length, seq_length, dtype=torch.bool, device=device), 1)[
        None, None
    ]


def lm_loss(
    model, batch: dict, mask: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of per-token LM loss over unmasked tokens, their count) for one micro batch."""
    tokens = batch["tokens"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    loss_mask = batch["loss_mask"].to(device, non_blocking=True).float()
    position_ids = batch["position_ids"].to(device, non_blocking=True)
    per_token = model(tokens, position_ids, mask, labels=labels)
    return (per_token.float() * loss_mask).sum(), loss_mask.sum()


def train_step(
    model,
    optimizer,
    params,
    batches,
    mask,
    info,
    *,
    accum: int,
    clip_grad: float,
    dp_group,
    ep_group,
) -> tuple[float, float]:
    """One optimizer step over ``accum`` micro batches; returns (global-batch LM loss, grad norm).

    Gradients accumulate in megatron-core's DDP buffers and are all-reduced there; the norm
    covers every expert of every rank; clipping and AdamW then act on the buffers.
    """
    from mone_train.optim import (
        attach_main_grads,
        clip_grads_,
        detach_main_grads,
        global_grad_norm,
    )

    model.zero_grad_buffer()
    step_loss = torch.zeros(2, dtype=torch.float64, device=info.device)
    for _ in range(accum):
        loss_sum, count = lm_loss(model, next(batches), mask, info.device)
        (loss_sum / count / accum).backward()
        step_loss += torch.stack([loss_sum.detach().double(), count.double()])
    model.finish_grad_sync()
    if info.dp_size > 1:
        dist.all_reduce(step_loss, group=dp_group)  # the loss of the global batch
    grad_norm = global_grad_norm(params, ep_group)
    clip_grads_(params, clip_grad, grad_norm)
    attach_main_grads(params)
    optimizer.step()
    detach_main_grads(params)
    return float(step_loss[0] / step_loss[1]), float(grad_norm)


@torch.no_grad()
def evaluate(model, dataset, cfg: Config, info, mask: torch.Tensor) -> float:
    """Mean LM loss (nats per token) on the first eval_iters batches of held-out data."""
    from mone_train.data.dataset import micro_batches

    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=info.device)
    batches = micro_batches(dataset, 0, cfg.trainer.micro_batch_size, info.dp_rank, info.dp_size)
    for _ in range(cfg.trainer.eval_iters):
        loss_sum, count = lm_loss(model, next(batches), mask, info.device)
        total += torch.stack([loss_sum.double(), count.double()])
    dist.all_reduce(total)
    model.train()
    return float(total[0] / total[1])


def run(cfg: Config) -> dict:
    """Train as configured; return the summary (final validation loss, counts, run dir)."""
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.moe_utils import (
        MoEAuxLossAutoScaler,
        clear_aux_losses_tracker,
        get_moe_layer_wise_logging_tracker,
    )
    from tqdm import tqdm

    from mone_train import comm_stats
    from mone_train.checkpoint import (
        EXIT_PREEMPTED,
        load_checkpoint,
        model_signature,
        save_checkpoint,
    )
    from mone_train.data.dataset import micro_batches
    from mone_train.distributed import init_distributed, shutdown_distributed
    from mone_train.health import HealthMonitor, model_flops_per_token, peak_tflops
    from mone_train.model.builder import num_moe_layers
    from mone_train.model.params import count_parameters
    from mone_train.optim import build_optimizer, lr_at
    from mone_train.tracking import MetricsLogger

    validate(cfg)
    configure_torch(cfg)
    t, m, lg = cfg.trainer, cfg.model, cfg.logging
    info = init_distributed(t.expert_parallel_size, t.backend, t.init_timeout_s)
    preemption = PreemptionFlag()  # before anything is written: a signal then always saves
    logger = None
    try:
        validate(cfg, world_size=info.world_size)
        run_dir, resume_from = prepare_run_dir(cfg, info.is_main)
        say = print if info.is_main else (lambda *a, **k: None)
        say(f"run directory: {run_dir}")
        say(
            f"world size {info.world_size}: expert parallel {info.ep_size}, data parallel "
            f"{info.dp_size}, device {info.device.type}"
        )
        eval_samples = t.eval_iters * t.micro_batch_size * info.dp_size
        num_samples = (t.steps * t.global_batch_size, eval_samples, eval_samples)
        tokenizer, train_ds, valid_ds, test_ds = prepare_data(cfg, info, num_samples)
        vocab_size = m.vocab_size or tokenizer.vocab_size
        if vocab_size < tokenizer.vocab_size:
            raise ConfigError(
                f"model.vocab_size={vocab_size} is smaller than the tokenizer's vocabulary "
                f"({tokenizer.vocab_size}); use null to take the tokenizer's"
            )

        model, params = build_model(cfg, vocab_size, info.ep_rank, info.ep_size)
        counts = count_parameters(model, m.router_topk, info.ep_size)
        say(f"model {m.name} ({cfg.moe.flavour}): {counts.summary()}")
        say(
            f"tokenizer {tokenizer.kind}: vocabulary {tokenizer.vocab_size:,} (model {vocab_size:,})"
        )

        accum = t.global_batch_size // (t.micro_batch_size * info.dp_size)
        optimizer = build_optimizer(cfg.optim, params)
        signature = model_signature(cfg, vocab_size)
        state = TrainState()
        wandb_id = None
        if resume_from is not None:
            point = load_checkpoint(resume_from, model, optimizer, signature)
            state = TrainState(point.step, point.consumed_samples)
            wandb_id = point.wandb_id
            say(f"resumed from {resume_from} at step {state.step}")
        resolved = OmegaConf.to_container(OmegaConf.structured(cfg))
        logger = MetricsLogger(run_dir, cfg.logging, resolved, info.is_main, wandb_id=wandb_id)

        def save() -> Path:
            return save_checkpoint(
                run_dir,
                model,
                optimizer,
                step=state.step,
                consumed_samples=state.consumed_samples,
                signature=signature,
                resolved_config=resolved,
                wandb_id=logger.wandb_id if info.is_main else None,
                keep_last=t.keep_last,
            )

        if info.is_main:
            (run_dir / "params.json").write_text(json.dumps(counts.as_dict(), indent=2))

        mask = causal_mask(t.seq_length, info.device)
        batches = micro_batches(
            train_ds, state.consumed_samples, t.micro_batch_size, info.dp_rank, info.dp_size
        )
        step_options = {
            "accum": accum,
            "clip_grad": cfg.optim.clip_grad,
            "dp_group": parallel_state.get_data_parallel_group(),
            "ep_group": parallel_state.get_expert_model_parallel_group(),
        }
        comm_stats.install()
        comm_stats.take()
        MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0 / accum, device=info.device))
        get_moe_layer_wise_logging_tracker().clear()  # a global: start from nothing tracked
        num_moe = num_moe_layers(cfg)
        tokens_per_step = t.global_batch_size * t.seq_length

        monitor = HealthMonitor(model, info.ep_rank, info.device) if lg.health_metrics else None
        gpu_flops = None
        if info.device.type == "cuda":
            peak = lg.peak_tflops or peak_tflops(torch.cuda.get_device_name(), t.precision)
            per_token = model_flops_per_token(
                counts.activated_moe, m.num_layers, m.hidden_size, t.seq_length
            )
            gpu_flops = (peak, per_token)
            torch.cuda.reset_peak_memory_stats()

        interval = IntervalStats()
        progress = tqdm(
            total=t.steps,
            initial=state.step,
            desc="training",
            unit="step",
            disable=not info.is_main,
        )
        val_loss = None
        model.train()
        while state.step < t.steps:
            lr = lr_at(state.step, cfg.optim, t.steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss, grad_norm = train_step(
                model, optimizer, params, batches, mask, info, **step_options
            )
            state.step += 1
            state.consumed_samples += t.global_batch_size
            interval.loss += loss
            interval.steps += 1
            interval.a2a_bytes += comm_stats.take()[0]
            progress.update(1)

            if state.step % t.log_interval == 0 or state.step == t.steps:
                elapsed = time.perf_counter() - interval.start
                aux = _read_aux_losses(
                    get_moe_layer_wise_logging_tracker(), num_moe, interval.steps * accum
                )
                clear_aux_losses_tracker()
                record = {
                    "step": state.step,
                    "loss": interval.loss / interval.steps,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens_per_s": interval.steps * tokens_per_step / elapsed,
                    "aux_loss": aux.get("load_balancing_loss"),
                    "ng_lbl": aux.get("ng_lbl"),
                    "consumed_samples": state.consumed_samples,
                    # Expert-parallel token exchange of the whole job per step (0 at EP = 1).
                    "a2a_bytes": _job_total(interval.a2a_bytes, info) / interval.steps,
                    # Activated parameters per token, both ways (DESIGN §1): MoE routing
                    # alone, and with the neuron top-k.
                    "params/activated_moe": counts.activated_moe,
                    "params/activated": counts.activated,
                }
                if monitor is not None:
                    record.update(monitor.collect())
                if gpu_flops is not None:
                    peak, per_token = gpu_flops
                    per_gpu = record["tokens_per_s"] * per_token / info.world_size
                    record["mfu"] = per_gpu / (peak * 1e12) if peak else None
                    record["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
                    torch.cuda.reset_peak_memory_stats()
                logger.log(record, echo=_format_train(record))
                progress.set_postfix(loss=f"{record['loss']:.3f}")
                interval = IntervalStats()
            if state.step % t.eval_interval == 0 or state.step == t.steps:
                eval_start = time.perf_counter()
                val_loss = evaluate(model, valid_ds, cfg, info, mask)
                clear_aux_losses_tracker()
                comm_stats.take()  # evaluation's exchanges are not training traffic
                logger.log(
                    {"step": state.step, "val_loss": val_loss},
                    echo=f"step {state.step:>6} | val_loss {val_loss:.4f} nats/token",
                )
                interval.start += time.perf_counter() - eval_start
            save_due = t.save_interval and (
                state.step % t.save_interval == 0 or state.step == t.steps
            )
            preempted = preemption.requested(info)
            if save_due or preempted:
                save_start = time.perf_counter()
                say(f"saved {save()}")
                interval.start += time.perf_counter() - save_start  # not training throughput
            if preempted:
                say(f"preempted at step {state.step}: exiting with code {EXIT_PREEMPTED}")
                progress.close()
                raise SystemExit(EXIT_PREEMPTED)
        progress.close()
        if val_loss is None:  # resumed at the last step: still end with an evaluation
            val_loss = evaluate(model, valid_ds, cfg, info, mask)
            logger.log({"step": state.step, "val_loss": val_loss})
        test_loss = None
        if test_ds is not None:  # the blend's held-out test split, once at the end
            test_loss = evaluate(model, test_ds, cfg, info, mask)
            clear_aux_losses_tracker()
            logger.log(
                {"step": state.step, "test_loss": test_loss},
                echo=f"step {state.step:>6} | test_loss {test_loss:.4f} nats/token",
            )

        summary = {
            "run_dir": str(run_dir),
            "steps": state.step,
            "val_loss": val_loss,
            "test_loss": test_loss,
            "vocab_size": vocab_size,
            "params": counts.as_dict(),
            "wandb_dir": logger.wandb_dir,
        }
        logger.close()  # wandb prints its own closing lines; ours come last
        say(f"final validation loss {val_loss:.4f} nats/token after {state.step} steps")
        say(counts.summary())
        say(f"run directory: {run_dir}")
        return summary
    finally:
        preemption.restore()
        if logger is not None:
            logger.close()
        shutdown_distributed()


def _job_total(value: float, info) -> float:
    """Sum of a per-rank number over all ranks."""
    if info.world_size == 1:
        return float(value)
    total = torch.tensor([float(value)], dtype=torch.float64, device=info.device)
    dist.all_reduce(total)
    return float(total)


def _read_aux_losses(tracker: dict, num_moe: int, num_forwards: int) -> dict[str, float]:
    """Mean over MoE layers and forward passes of each tracked auxiliary loss."""
    out = {}
    for name, entry in tracker.items():
        values = entry["values"].float()
        if dist.get_world_size() > 1:
            values = values.clone()
            dist.all_reduce(values)
            values /= dist.get_world_size()
        out[name] = float(values.sum()) / num_moe / max(1, num_forwards)
    return out


def _format_train(record: dict) -> str:
    parts = [
        f"step {record['step']:>6}",
        f"loss {record['loss']:.4f}",
        f"lr {record['lr']:.2e}",
        f"grad_norm {record['grad_norm']:.3f}",
        f"tok/s {record['tokens_per_s']:,.0f}",
    ]
    if record.get("aux_loss") is not None:
        parts.append(f"aux {record['aux_loss']:.4f}")
    if record.get("ng_lbl") is not None:
        parts.append(f"ng_lbl {record['ng_lbl']:.4f}")
    if record.get("load/imbalance") is not None:
        parts.append(f"load max/mean {record['load/imbalance']:.2f}")
    if record.get("neurons/utilisation") is not None:
        parts.append(f"neuron util {record['neurons/utilisation']:.3f}")
    if record.get("gate_abs/q50") is not None:
        parts.append(f"|g| median {record['gate_abs/q50']:.3g}")
    if record.get("mfu") is not None:
        parts.append(f"MFU {record['mfu']:.1%}")
    if record.get("peak_memory_gib") is not None:
        parts.append(f"mem {record['peak_memory_gib']:.1f} GiB")
    return " | ".join(parts)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def hydra_main(dcfg: DictConfig) -> None:
    """Hydra task: one training run."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    sweep = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        cfg: Config = OmegaConf.to_object(dcfg)
        if sweep:
            # Each job of a sweep trains in its own job folder.
            cfg.trainer.run_dir = HydraConfig.get().runtime.output_dir
        run(cfg)
    except Exception as err:
        if isinstance(err, ConfigError):  # bad config value or launch environment: one line
            message, code = str(err), 2
            print(f"mone-train: error: {message}", file=sys.stderr)
        else:
            traceback.print_exc()
            message, code = f"{type(err).__name__}: {err}", 1
            rank = os.environ.get("RANK", "0")
            print(f"mone-train: rank {rank} failed: {message}", file=sys.stderr)
        if sweep:  # Hydra records the job as failed and goes on with the next one
            raise JobFailed(message) from None
        sys.exit(code)


class JobFailed(RuntimeError):
    """One job of a sweep failed (its message is already printed); the sweep goes on."""


def main() -> None:
    """Console entry point: one-line errors for bad overrides, then Hydra."""
    silence_megatron_notices()
    check_overrides(sys.argv[1:])
    hydra_main()


if __name__ == "__main__":
    main()
