"""Cost of in-loop evaluation: seconds per 1,000 multiple-choice examples, and the share of a
run's time that its evaluations take at its ``trainer.eval_interval``.

One process builds the run's model (random weights: the cost does not depend on them), data and
evaluator, warms both up (a run's first evaluation also pays for building CPU kernels of new
shapes: seconds, once), times training steps and evaluations in alternation (shared machines
drift), and projects a whole run: ``steps`` training steps plus one evaluation per interval and
at the end.

    python benchmarks/eval_overhead.py                       # the `make train` run
    python benchmarks/eval_overhead.py --overrides model=tiny trainer=smoke --repeats 1

Prints a table and writes eval_overhead_<device>.json (with the machine).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info  # noqa: E402

from mone_train import silence_megatron_notices  # noqa: E402

silence_megatron_notices()
from mone_train.compose import compose_config  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(cfg, repeats: int, train_steps: int) -> dict:
    """Median seconds per training step, per evaluation, and per task pass of the run."""
    from mone_train.components.evaluator import (
        Evaluator,
        build_validation_sets,
        load_run_tasks,
        validation_samples,
    )
    from mone_train.components.optimizer import build_optimizer
    from mone_train.components.train_step import TrainStep
    from mone_train.data.dataset import micro_batches
    from mone_train.data.run_data import build_run_data
    from mone_train.model.builder import build_model
    from mone_train.model.lm import causal_mask
    from mone_train.parallel.process_groups import init_distributed, shutdown_distributed
    from mone_train.runtime import configure_torch

    t = cfg.trainer
    configure_torch(cfg)
    info = init_distributed(1)
    try:
        samples = validation_samples(cfg)
        data = build_run_data(cfg, info, (t.steps * t.global_batch_size, samples, samples))
        model, params = build_model(cfg, data.tokenizer.vocab_size)
        train_step = TrainStep(
            model, build_optimizer(cfg.optim, params), params, causal_mask(t.seq_length, info.device),
            info, accum=t.global_batch_size // t.micro_batch_size, clip_grad=cfg.optim.clip_grad,
        )  # fmt: skip
        batches = micro_batches(data.train, 0, t.micro_batch_size, 0, 1)
        tasks = load_run_tasks(cfg)
        sets = build_validation_sets(cfg, data.tokenizer, data.valid)
        evaluator = Evaluator(model, cfg, info, sets, tasks, data.tokenizer)
        tasks_only = Evaluator(model, cfg, info, {}, tasks, data.tokenizer)
        train_step(batches, cfg.optim.lr)  # warm-up: the first passes build kernels
        evaluator.evaluate()
        steps, evals, task_passes = [], [], []
        for _ in range(repeats):
            steps.append(_timed(lambda: [train_step(batches, cfg.optim.lr)
                                         for _ in range(train_steps)]) / train_steps)  # fmt: skip
            evals.append(_timed(evaluator.evaluate))
            task_passes.append(_timed(tasks_only.evaluate))
    finally:
        shutdown_distributed()
    examples = sum(len(task.examples) for task in tasks)
    return {
        "seconds_per_step": statistics.median(steps),
        "seconds_per_evaluation": statistics.median(evals),
        "seconds_per_task_pass": statistics.median(task_passes),
        "task_examples": examples,
        "validation_sequences_per_set": validation_samples(cfg),
        "num_sets": len(sets),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--overrides", nargs="*", default=[], help="mone-train overrides")
    parser.add_argument("--repeats", type=int, default=3, help="alternations (median taken)")
    parser.add_argument("--train-steps", type=int, default=5, help="steps timed per repeat")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    cfg = compose_config(args.overrides)
    t = cfg.trainer
    timing = measure(cfg, args.repeats, args.train_steps)
    num_evals = t.steps // t.eval_interval + (t.steps % t.eval_interval != 0)
    run_train = t.steps * timing["seconds_per_step"]
    run_eval = num_evals * timing["seconds_per_evaluation"]
    per_1000 = 1000 * timing["seconds_per_task_pass"] / max(timing["task_examples"], 1)
    result = {
        "machine": machine_info(),
        "load_average_1min": os.getloadavg()[0],  # other work on a shared machine slows both
        "args": {**vars(args), "out": str(args.out)},
        **timing,
        "seconds_per_1000_mc_examples": per_1000,
        "run": {"steps": t.steps, "eval_interval": t.eval_interval, "evaluations": num_evals},
        "evaluation_share_of_run": run_eval / (run_train + run_eval),
    }
    print(f"in-loop evaluation, {' '.join(args.overrides) or 'the make train run'}")
    print(f"  training step            {timing['seconds_per_step']:8.3f} s")
    print(f"  one evaluation           {timing['seconds_per_evaluation']:8.3f} s "
          f"({timing['num_sets']} set(s), {timing['task_examples']} task examples)")  # fmt: skip
    print(f"  1,000 MC examples        {per_1000:8.3f} s")
    print(f"  share of the run         {result['evaluation_share_of_run']:8.2%} "
          f"({num_evals} evaluations over {t.steps} steps)")  # fmt: skip
    device = "gpu" if torch.cuda.is_available() else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"eval_overhead_{device}.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
