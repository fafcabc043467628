"""The trainer's evaluation component: validation sets, downstream tasks, keep ratios.

Every evaluation reads the same sequences: the first ``trainer.eval_iters x
trainer.global_batch_size`` of each validation set, split over the data-parallel ranks, so the
numbers do not depend on the layout (DP, TP, PP, EP sizes) nor change across a resume on another
layout. Tasks are scored on the same rows every time. Between evaluations nothing runs.

One evaluation gives one record (docs/evaluation.md has the names):

    val_loss                      the data's validation split (nats per token)
    eval/<set>/loss               each set: nats per token, bits per token, bits per byte
    eval/<set>/bits_per_token     (bits per byte with the byte tokenizer only)
    task/<task>/acc, acc_norm, count            multiple-choice tasks
    task/<task>/loglikelihood, perplexity, acc, count       continuation tasks
    task/<task>/word_perplexity, byte_perplexity, bits_per_byte, count   text tasks
    rho<r>/eval/..., rho<r>/task/...   the same at each ``evaluation.keep_ratios`` entry
"""

from __future__ import annotations

import math
from pathlib import Path

from mone_train.config import Config
from mone_train.evaluation.forward import Forward
from mone_train.evaluation.keep_ratio import check_keep_ratios, keep_ratio, ratio_label
from mone_train.evaluation.sets import build_validation_set, check_sets
from mone_train.evaluation.stdlib_task import stdlib_continuation_task
from mone_train.evaluation.tasks import Task, encode_rows, load_tasks, score
from mone_train.parallel.pipeline import Pipeline
from mone_train.parallel.process_groups import DistInfo

VALID = "valid"  # the name of the data's own validation split among the sets


def validation_samples(cfg: Config) -> int:
    """Sequences per validation set and evaluation: ``eval_iters`` global batches."""
    return cfg.trainer.eval_iters * cfg.trainer.global_batch_size


def load_run_tasks(cfg: Config) -> list[Task]:
    """The tasks of ``evaluation.tasks``, and the built-in stdlib task when the run reads the
    stdlib corpus."""
    tasks = load_tasks(list(cfg.evaluation.tasks))
    e, d = cfg.evaluation, cfg.data
    if e.stdlib_task_examples and d.name == "stdlib":
        tasks.append(stdlib_continuation_task(
            d.valid_every, e.stdlib_task_examples, cfg.trainer.seq_length))  # fmt: skip
    return tasks


def check_evaluation(cfg: Config) -> None:
    """Bad input before any work: sets that do not exist, task files, keep ratios."""
    check_sets(cfg.evaluation.sets)
    load_tasks(list(cfg.evaluation.tasks))
    check_keep_ratios(list(cfg.evaluation.keep_ratios), cfg.moe.flavour)


def build_validation_sets(cfg: Config, tokenizer, valid) -> dict:
    """name -> dataset: ``valid`` (the data's split, when given) and ``evaluation.sets``."""
    d = cfg.data
    cache_dir = Path(d.index_cache_dir or Path(d.cache_dir) / "index-cache").expanduser()
    seed = cfg.data.eval_seed if cfg.data.eval_seed is not None else cfg.trainer.seed
    sets = {} if valid is None else {VALID: valid}
    for name, prefixes in check_sets(cfg.evaluation.sets).items():
        sets[name] = build_validation_set(
            name, prefixes, tokenizer, cfg.trainer.seq_length, seed, validation_samples(cfg),
            cache_dir,
        )  # fmt: skip
    return sets


class Evaluator:
    """Evaluates a model on validation sets and tasks, at its own and other keep ratios.

    Args:
        model: the (DDP-wrapped) model or this rank's pipeline stage.
        cfg: the run's config (trainer batch sizes, evaluation section).
        info: this process's place in the job.
        sets: name -> validation GPTDataset.
        tasks: the tasks (multiple-choice, continuation, text).
        tokenizer: the run's tokenizer (task rows; bits per byte when it is the byte one).
        pipeline: with pipeline stages, megatron's schedule runs the forwards.
        micro_batch_size: sequences per forward (default: ``trainer.micro_batch_size``).
    """

    def __init__(self, model, cfg: Config, info: DistInfo, sets: dict, tasks: list[Task],
                 tokenizer, pipeline: Pipeline | None = None,
                 micro_batch_size: int | None = None) -> None:  # fmt: skip
        self.model = model
        self.cfg = cfg
        self.sets = sets
        self.tasks = tasks
        self.forward = Forward(model, info, pipeline)
        self.count_bytes = tokenizer.kind == "byte"
        self.pad = int(tokenizer.pad)
        self.micro_batch_size = micro_batch_size or cfg.trainer.micro_batch_size
        self.task_micro_batch_size = cfg.evaluation.task_micro_batch_size or self.micro_batch_size
        self.rows = {t.name: encode_rows(t, tokenizer, cfg.trainer.seq_length + 1) for t in tasks}
        check_keep_ratios(list(cfg.evaluation.keep_ratios), cfg.moe.flavour)

    def due(self, step: int) -> bool:
        """Whether the schedule evaluates after optimizer step ``step`` (and after the last)."""
        t = self.cfg.trainer
        return step % t.eval_interval == 0 or step == t.steps

    def evaluate(self) -> dict[str, float]:
        """One evaluation's record (see the module docstring); the model is left in train mode."""
        record = self._measure(prefix="")
        if VALID in self.sets:
            record["val_loss"] = record[f"eval/{VALID}/loss"]
        for ratio in self.cfg.evaluation.keep_ratios:
            with keep_ratio(self.model, ratio):
                record.update(self._measure(prefix=ratio_label(ratio) + "/"))
        return record

    def loss(self, dataset) -> float:
        """Mean loss (nats per token) on the first validation-sized sample of ``dataset``."""
        self.model.eval()
        try:
            total = self.forward.dataset_sums(
                dataset, validation_samples(self.cfg), self.micro_batch_size, False
            )
        finally:
            self.model.train()
        return float(total[0] / total[1])

    def _measure(self, prefix: str) -> dict[str, float]:
        record = {}
        self.model.eval()
        try:
            for name, dataset in self.sets.items():
                record.update(self._set_metrics(f"{prefix}eval/{name}/", dataset))
            for task in self.tasks:
                rows = self.rows[task.name]
                lls, greedy = self.forward.row_scores(
                    rows, self.task_micro_batch_size, self.cfg.trainer.seq_length, self.pad,
                    greedy=task.needs_greedy,
                )  # fmt: skip
                for key, value in score(task, lls, greedy).items():
                    record[f"{prefix}task/{task.name}/{key}"] = value
        finally:
            self.model.train()
        return record

    def _set_metrics(self, key: str, dataset) -> dict[str, float]:
        loss_sum, tokens, num_bytes = self.forward.dataset_sums(
            dataset, validation_samples(self.cfg), self.micro_batch_size, self.count_bytes
        ).tolist()
        bits = loss_sum / math.log(2)
        metrics = {f"{key}loss": loss_sum / tokens, f"{key}bits_per_token": bits / tokens}
        if self.count_bytes and num_bytes:
            metrics[f"{key}bits_per_byte"] = bits / num_bytes
        return metrics


def evaluation_echo(step: int, record: dict) -> str:
    """The terminal line of an evaluation: each set's loss and each task's headline (accuracy,
    or bits per byte for text tasks)."""
    parts = [f"{k[len('eval/'):-len('/loss')]} {v:.4f}" for k, v in record.items()
             if k.startswith("eval/") and k.endswith("/loss")]  # fmt: skip
    for key, value in record.items():
        if key.startswith("task/"):
            task, _, metric = key[len("task/") :].rpartition("/")
            if metric == "acc":
                parts.append(f"{task} acc {value:.3f}")
            elif metric == "bits_per_byte":
                parts.append(f"{task} {value:.3f} bits/byte")
    return f"step {step:>6} | eval: " + ", ".join(parts) + " (loss in nats/token)"
