"""The training run as components: build them (stages), then a short loop that calls them.

    validate config -> process groups -> run directory -> data -> model + optimizer
    -> checkpointer (resume) -> metrics + evaluator -> Trainer.train()

Each stage is a function or component of its own module (``run_dir``, ``data.run_data``,
``model.builder``, ``checkpointer``, ``metrics``, ``evaluator``, ``train_step``); this module
only wires them together. :func:`run` is what the ``mone-train`` command and the tests call.
"""

from __future__ import annotations

import json

import torch.distributed as dist
from megatron.core import parallel_state
from omegaconf import OmegaConf
from tqdm import tqdm

from mone_kernels.cpu_kernel import cpu_kernel_error
from mone_train.components.checkpoint import load_initial_weights, model_signature
from mone_train.components.checkpointer import Checkpointer, PreemptionFlag, TrainState
from mone_train.components.evaluator import (
    Evaluator,
    build_validation_sets,
    check_evaluation,
    evaluation_echo,
    load_run_tasks,
    validation_samples,
)
from mone_train.components.metrics import TrainMetrics
from mone_train.components.optimizer import (
    OptimizerSharding,
    build_optimizer,
    lr_at,
    optimizer_state_bytes,
)
from mone_train.components.run_dir import RunFinished, mark_finished, prepare_run_dir
from mone_train.components.tracking import MetricsLogger
from mone_train.components.train_step import NonFiniteGuard, TrainStep
from mone_train.components.watchdog import HangWatchdog
from mone_train.config import Config, model_vocab_size
from mone_train.data.dataset import micro_batches
from mone_train.data.run_data import RunData, build_run_data
from mone_train.errors import EXIT_PREEMPTED
from mone_train.model.builder import build_model
from mone_train.model.lm import causal_mask
from mone_train.model.params import count_parameters
from mone_train.parallel.pipeline import Pipeline
from mone_train.parallel.process_groups import (
    DistInfo,
    init_distributed,
    launch_environment,
    shutdown_distributed,
)
from mone_train.runtime import check_kernel_impl, configure_torch


class Trainer:
    """One training run of a validated config on an initialised process group."""

    def __init__(self, cfg: Config, info: DistInfo, preemption: PreemptionFlag) -> None:
        self.cfg, self.info, self.preemption = cfg, info, preemption
        self.logger: MetricsLogger | None = None
        self.metrics: TrainMetrics | None = None
        self.checkpointer: Checkpointer | None = None
        self.watchdog: HangWatchdog | None = None
        try:
            self._start()
        except BaseException:  # a failed start leaves no thread, hook or file behind
            self.close()
            raise

    def _start(self) -> None:
        """Build the components in order (the stages of the module docstring)."""
        cfg, info = self.cfg, self.info
        t, m = cfg.trainer, cfg.model
        cfg.validate(world_size=info.world_size)
        self.run_dir, resume_from = prepare_run_dir(cfg, info.is_main)
        self.watchdog = HangWatchdog(self.run_dir, info.rank, t.hang_timeout_s)
        self.say(f"run directory: {self.run_dir}")
        self.say(
            f"world size {info.world_size}: tensor parallel {info.tp_size}, pipeline parallel "
            f"{info.pp_size}, expert parallel {info.ep_size}, data parallel {info.dp_size}, "
            f"device {info.device.type}"
        )
        self.data = self._build_data()
        self.watchdog.enter("startup")  # progress: the data is ready
        if info.device.type == "cpu":  # load (or build) the CPU operators now, not mid-step
            cpu_kernel_error()
        self.vocab_size = self._vocab_size(self.data.tokenizer)
        load_weights = None
        if t.init_from and resume_from is None:  # a fresh run starts from those weights
            signature = model_signature(cfg, self.vocab_size)

            def load_weights(model):
                path = load_initial_weights(t.init_from, model, signature)
                self.say(f"initial weights from {path}")

        self.model, params = build_model(
            cfg, self.vocab_size, info.ep_rank, info.ep_size, load_weights
        )
        self.counts = count_parameters(
            self.model, m.router_topk, info.ep_size, info.tp_size,
            parallel_state.get_pipeline_model_parallel_group(),
        )  # fmt: skip
        self.say(f"model {m.name} ({cfg.moe.flavour}): {self.counts.summary()}")
        tokenizer = self.data.tokenizer
        self.say(
            f"tokenizer {tokenizer.kind}: vocabulary {tokenizer.vocab_size:,} "
            f"(model {self.vocab_size:,})"
        )
        self.sharding = None
        if t.shard_optimizer and info.world_size > 1:
            self.sharding = OptimizerSharding(
                params,
                parallel_state.get_data_parallel_group(),
                parallel_state.get_expert_data_parallel_group(),
            )
        owned = params if self.sharding is None else self.sharding.owned
        self.optimizer = build_optimizer(cfg.optim, owned)
        self.resolved = OmegaConf.to_container(OmegaConf.structured(cfg))
        self.checkpointer = Checkpointer(
            self.run_dir,
            self.model,
            self.optimizer,
            t,
            signature=model_signature(cfg, self.vocab_size),
            resolved_config=self.resolved,
            preemption=self.preemption,
            info=info,
        )
        self.state, wandb_id = self.checkpointer.resume(resume_from)
        if resume_from is not None:
            self.say(f"resumed from {resume_from} at step {self.state.step}")
        self.logger = MetricsLogger(
            self.run_dir, cfg.logging, self.resolved, info.is_main, wandb_id=wandb_id
        )
        self.checkpointer.wandb_id = self.logger.wandb_id
        self._build_loop_components(params)

    def _build_loop_components(self, params) -> None:
        cfg, t, info = self.cfg, self.cfg.trainer, self.info
        if info.is_main:
            (self.run_dir / "params.json").write_text(json.dumps(self.counts.as_dict(), indent=2))
        accum = t.global_batch_size // (t.micro_batch_size * info.dp_size)
        mask = causal_mask(t.seq_length, info.device)
        pipeline = None
        if info.pp_size > 1:
            pipeline = Pipeline(
                self.model, mask, info, t.seq_length, t.micro_batch_size, self._on_phase
            )
        self.train_step = TrainStep(
            self.model,
            self.optimizer,
            params,
            mask,
            info,
            accum=accum,
            clip_grad=cfg.optim.clip_grad,
            sharding=self.sharding,
            on_phase=self._on_phase,
            pipeline=pipeline,
        )
        self.guard = NonFiniteGuard(t.max_nonfinite_steps)
        self.metrics = TrainMetrics(cfg, info, self.model, self.counts, self.logger, accum)
        tokenizer = self.data.tokenizer
        sets = build_validation_sets(cfg, tokenizer, self.data.valid)
        self.evaluator = Evaluator(
            self.model, cfg, info, sets, load_run_tasks(cfg), tokenizer, pipeline
        )

    def _on_phase(self, phase: str) -> None:
        """The step entered ``phase``: progress for the watchdog, timing for the report."""
        self.watchdog.enter(phase)
        self.metrics.stragglers.on_phase(phase)

    def say(self, *args) -> None:
        """Print on the main rank only."""
        if self.info.is_main:
            print(*args)

    def _build_data(self) -> RunData:
        t, info = self.cfg.trainer, self.info
        eval_samples = validation_samples(self.cfg)  # the same sequences on every layout
        return build_run_data(
            self.cfg, info, (t.steps * t.global_batch_size, eval_samples, eval_samples)
        )

    def _vocab_size(self, tokenizer) -> int:
        return model_vocab_size(self.cfg, tokenizer.vocab_size)

    def train(self) -> dict:
        """Run the step loop to ``trainer.steps``; return the run's summary."""
        t, info = self.cfg.trainer, self.info
        with tqdm(total=t.steps, initial=self.state.step, desc="training", unit="step",
                  disable=not info.is_main) as progress:  # fmt: skip
            val_loss = self._loop(progress)
        self.checkpointer.wait()  # the last save is complete before the run counts as done
        if val_loss is None:  # resumed at the last step: still end with an evaluation
            val_loss = self.evaluate()
        test_loss = None
        if self.data.test is not None:  # the blend's held-out test split, once at the end
            test_loss = self.evaluate_test()
        return self.finish(val_loss, test_loss)

    def _loop(self, progress: tqdm) -> float | None:
        """The steps up to ``trainer.steps``. Returns the last validation loss."""
        val_loss = None
        batches = self.batches()
        self.model.train()
        self.preemption.loop_running = True  # from now on a signal saves, then exits
        self.watchdog.step_done(self.state.step)
        while self.state.step < self.cfg.trainer.steps:
            val_loss = self.step(batches, progress) or val_loss
        return val_loss

    def batches(self):
        """This rank's micro batches from the current position of the run."""
        t, info = self.cfg.trainer, self.info
        return micro_batches(
            self.data.train, self.state.consumed_samples, t.micro_batch_size, info.dp_rank,
            info.dp_size,
        )  # fmt: skip

    def step(self, batches, progress: tqdm) -> float | None:
        """One step of the loop: train, count, log, evaluate, checkpoint. Returns the
        validation loss when this step evaluated."""
        t, state = self.cfg.trainer, self.state
        lr = lr_at(state.step, self.cfg.optim, t.steps)
        self.metrics.before_step(state.step + 1)
        result = self.train_step(batches, lr)
        state.step += 1
        state.consumed_samples += t.global_batch_size
        progress.update(1)
        self.guard.count(result)
        record = self.metrics.step_done(state, result, lr, self.guard.total)
        if record is not None and record["loss"] is not None:
            progress.set_postfix(loss=f"{record['loss']:.3f}")
        # After too many skipped updates in a row: stop, naming the last good checkpoint.
        self.guard.check(state.step, result, self.checkpointer.newest)
        val_loss = None
        if self.evaluator.due(state.step):
            val_loss = self.evaluate()
        self.checkpoint(state)
        self.watchdog.step_done(state.step)
        return val_loss

    def evaluate(self) -> float:
        """Evaluate (validation sets, tasks, keep ratios) and log the record, outside the
        throughput clock; return the validation loss."""
        self.watchdog.enter("eval")
        with self.metrics.paused():
            record = self.evaluator.evaluate()
        step = self.state.step
        self.logger.log({"step": step, **record}, echo=evaluation_echo(step, record))
        return record["val_loss"]

    def evaluate_test(self) -> float:
        """The test split's loss, logged as ``test_loss``."""
        self.watchdog.enter("eval")
        with self.metrics.paused():
            loss = self.evaluator.loss(self.data.test)
        step = self.state.step
        self.logger.log(
            {"step": step, "test_loss": loss},
            echo=f"step {step:>6} | test_loss {loss:.4f} nats/token",
        )
        return loss

    def checkpoint(self, state: TrainState) -> None:
        """Save when due; after a save asked for by a signal, exit for requeueing."""
        self.watchdog.enter("save")
        with self.metrics.paused():
            saved, preempted = self.checkpointer.after_step(state, self.guard.streak > 0)
        if saved is not None:
            self.say(f"saved {saved}")
        if preempted:
            self.say(f"preempted at step {state.step}: exiting with code {EXIT_PREEMPTED}")
            raise SystemExit(EXIT_PREEMPTED)

    def finish(self, val_loss: float, test_loss: float | None) -> dict:
        """Close the logger and print the closing lines; return the summary."""
        summary = {
            "run_dir": str(self.run_dir),
            "steps": self.state.step,
            "val_loss": val_loss,
            "test_loss": test_loss,
            "vocab_size": self.vocab_size,
            "params": self.counts.as_dict(),
            "wandb_dir": self.logger.wandb_dir,
            "optimizer_state_bytes": self._optimizer_state_bytes(),
        }
        self.logger.close()  # wandb prints its own closing lines; ours come last
        if self.info.is_main:
            mark_finished(self.run_dir, {k: v for k, v in summary.items() if k != "params"})
        self.say(f"final validation loss {val_loss:.4f} nats/token after {self.state.step} steps")
        self.say(self.counts.summary())
        self.say(f"run directory: {self.run_dir}")
        return summary

    def _optimizer_state_bytes(self) -> list[int]:
        """Optimizer state bytes held by each rank (measured from the tensors; ZeRO-1 divides
        them over the data-parallel ranks), also printed per rank."""
        mine = optimizer_state_bytes(self.optimizer, self.train_step.params)
        every = [0] * self.info.world_size
        dist.all_gather_object(every, mine)
        shard = "sharded" if self.sharding is not None else "not sharded"
        self.say(
            "optimizer state per rank (" + shard + "): "
            + ", ".join(f"{b / 2**20:.2f} MiB" for b in every)
        )  # fmt: skip
        return every

    def close(self) -> None:
        """Release what the run holds (a save in flight, hooks, open files); safe after a
        partial start."""
        if self.watchdog is not None:
            self.watchdog.close()
        if self.checkpointer is not None:
            self.checkpointer.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.logger is not None:
            self.logger.close()


def run(cfg: Config) -> dict:
    """Train as configured; return the summary (final validation loss, counts, run dir)."""
    layout = launch_environment()  # the layout is checked before any process group starts
    cfg.validate(world_size=1 if layout is None else layout[1])
    check_evaluation(cfg)  # task files, validation sets and keep ratios before any work
    configure_torch(cfg)
    check_kernel_impl(cfg)
    t = cfg.trainer
    info = init_distributed(
        t.expert_parallel_size, t.backend, t.init_timeout_s, t.collective_timeout_s,
        t.tensor_parallel_size, t.pipeline_parallel_size, t.device,
    )  # fmt: skip
    preemption = PreemptionFlag()  # before anything is written: a signal then always saves
    trainer = None
    try:
        trainer = Trainer(cfg, info, preemption)
        return trainer.train()
    except RunFinished as done:  # a rerun (requeue, restart, resubmit) of a finished run
        if info.is_main:
            print(f"mone-train: {done}")
        return done.summary
    finally:
        preemption.restore()
        if trainer is not None:
            trainer.close()
        shutdown_distributed()
