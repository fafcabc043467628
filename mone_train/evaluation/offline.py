"""A checkpoint evaluated as the training loop evaluates it (``mone-eval``'s work).

The model is rebuilt from the checkpoint's saved config (one process, or data parallel under
torchrun: checkpoints reshard on load) and evaluated by
:class:`mone_train.components.evaluator.Evaluator`: the run's validation sets on the same
sequences, its tasks (or others instead) and keep ratios (or others).
"""

from __future__ import annotations

import math
from pathlib import Path

from omegaconf import OmegaConf

from mone_train.components.checkpoint import (
    OPTIONAL_BUFFERS,
    config_from_marker,
    load_model_weights,
    read_marker,
    resolve_checkpoint,
)
from mone_train.components.evaluator import (
    Evaluator,
    build_validation_sets,
    check_evaluation,
    load_run_tasks,
    validation_samples,
)
from mone_train.config import Config, model_vocab_size, one_process_layout
from mone_train.data.run_data import build_run_data
from mone_train.evaluation.errors import EvaluationError
from mone_train.evaluation.keep_ratio import ratio_label
from mone_train.model.builder import build_model
from mone_train.parallel.process_groups import init_distributed, shutdown_distributed
from mone_train.runtime import configure_torch

# Sections of a saved config that say what the run evaluated, taken when this schema reads them.
EVALUATION_SECTIONS = ("data", "evaluation")


def run_config(checkpoint: Path, marker: dict) -> Config:
    """The run's config: its model (as checkpoint readers rebuild it), data and evaluation."""
    cfg = config_from_marker(checkpoint, marker)
    saved = marker.get("config") or {}
    base = OmegaConf.structured(cfg)
    for section in EVALUATION_SECTIONS:
        if section in saved:
            try:
                base = OmegaConf.merge(base, {section: saved[section]})
            except Exception:  # an older schema: keep this version's defaults for the section
                pass
    return one_process_layout(OmegaConf.to_object(base))


def micro_batch_size(cfg: Config, dp_size: int) -> int:
    """The run's micro batch when it splits the validation sample evenly over ``dp_size``
    ranks, else the largest that does."""
    samples = validation_samples(cfg)
    if samples % dp_size:
        raise EvaluationError(
            f"{samples} validation sequences (trainer.eval_iters x trainer.global_batch_size) do "
            f"not split over {dp_size} processes: run on a divisor of {samples}"
        )
    per_rank = samples // dp_size
    return math.gcd(cfg.trainer.micro_batch_size, per_rank)


def evaluate_checkpoint(
    target: Path, tasks: list[str] | None = None, keep_ratios: list[float] | None = None
) -> dict:
    """The evaluation of ``target`` (a run directory or checkpoint) with the run's evaluation
    config, ``tasks`` replacing its tasks and ``keep_ratios`` its ratios (None: the run's)."""
    checkpoint = resolve_checkpoint(target, key="RUN_OR_CHECKPOINT")
    marker = read_marker(checkpoint)
    cfg = run_config(checkpoint, marker)
    if tasks is not None:
        cfg.evaluation.tasks, cfg.evaluation.stdlib_task_examples = list(tasks), 0
    if keep_ratios is not None:
        cfg.evaluation.keep_ratios = list(keep_ratios)
    cfg.evaluation.validate()
    check_evaluation(cfg)
    configure_torch(cfg)
    t = cfg.trainer
    info = init_distributed(1, t.backend, t.init_timeout_s, t.collective_timeout_s)
    try:
        samples = validation_samples(cfg)
        data = build_run_data(cfg, info, (t.steps * t.global_batch_size, samples, samples))
        tokenizer = data.tokenizer
        vocab_size = (marker.get("signature") or {}).get("vocab_size") or model_vocab_size(
            cfg, tokenizer.vocab_size
        )

        def load_weights(model):
            load_model_weights(checkpoint, model, key="RUN_OR_CHECKPOINT",
                               optional=OPTIONAL_BUFFERS)  # fmt: skip

        model, _ = build_model(cfg, vocab_size, 0, 1, load_weights)
        sets = build_validation_sets(cfg, tokenizer, data.valid)
        evaluator = Evaluator(model, cfg, info, sets, load_run_tasks(cfg), tokenizer,
                              micro_batch_size=micro_batch_size(cfg, info.dp_size))  # fmt: skip
        record = evaluator.evaluate()
    finally:
        shutdown_distributed()
    return {"checkpoint": str(checkpoint), "step": marker.get("step"),
            **nested(record, cfg.evaluation.keep_ratios), "metrics": record}  # fmt: skip


def nested(record: dict, keep_ratios: list[float]) -> dict:
    """A flat evaluation record as {"sets": {set: {metric: v}}, "tasks": {task: {...}},
    "keep_ratios": {"0.5": {"sets": ..., "tasks": ...}}}."""

    def group(prefix: str) -> dict:
        out = {"sets": {}, "tasks": {}}
        for key, value in record.items():
            if not key.startswith(prefix):
                continue
            kind, _, rest = key[len(prefix) :].partition("/")
            name, _, metric = rest.rpartition("/")
            if kind in ("eval", "task") and name:
                out["sets" if kind == "eval" else "tasks"].setdefault(name, {})[metric] = value
        return out

    result = group("")
    result["keep_ratios"] = {f"{r:g}": group(ratio_label(r) + "/") for r in keep_ratios}
    return result
