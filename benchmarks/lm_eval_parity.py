"""lm-evaluation-harness against ``mone-eval``: the same multiple-choice tasks on the same
trained weights give the same ``acc`` and ``acc_norm`` (docs/evaluation.md, "Standard benchmarks
with lm-evaluation-harness").

For each flavour, a tiny model (``model=tiny trainer=smoke``) trains ``--steps`` steps on the
stdlib corpus in a subprocess and is exported with ``mone-export``: plain MoE (``moe=moe``) as
transformers' own ``MixtralForCausalLM``, MoNE (``moe=mone``, rho 0.5) as our
``MoNEForCausalLM`` (remote code, ``trust_remote_code=True``). Three local task files in
mone-train's JSONL format are written, with the equivalent lm-eval tasks:

- ``held_out``: the built-in task's questions (real vs shuffled next 10 characters of held-out
  files), which a trained model knows; every choice has the same length.
- ``varied``: the same contexts with 3 choices of 2 to 10 characters (the real start of the
  continuation and two other places'), so ``acc_norm`` differs from ``acc``; some contexts
  end in whitespace (moved to the choices by both tools), every other example has its last
  context character moved into the choices, every tenth context is empty (the
  end-of-document token), and the longest rows are longer than the model's sequence
  (both tools keep their last ``seq_length + 1`` tokens).
- ``arc_easy_local``: the varied questions with a context, written as a local copy of an
  ARC-format benchmark that lm-eval reads with its own shipped ``arc/arc_easy.yaml`` (prompt
  ``Question: ...\nAnswer:``, target delimiter a space), and in our format with that space at
  the end of the context: how a standard benchmark is run from local files.

Then ``mone-eval CHECKPOINT --tasks FILES --json`` scores the checkpoint and the ``lm_eval`` CLI
(``--model hf``, fp32, CPU, offline) scores the export. Prints a table and writes
lm_eval_parity_<device>.json (with the machine) to ``--out``.

lm-evaluation-harness is not a dependency of mone-train: install it next to mone-train, e.g.
in a separate environment, ``pip install lm-eval==0.4.13 accelerate``.

    python benchmarks/lm_eval_parity.py                        # 40 steps per model
    python benchmarks/lm_eval_parity.py --steps 5 --examples 40 --out /tmp/parity
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info  # noqa: E402

from mone_train import silence_megatron_notices  # noqa: E402

silence_megatron_notices()

RESULTS = Path(__file__).resolve().parent / "results"
INSTALL = "pip install lm-eval==0.4.13 accelerate"
# flavour -> the override that selects it
FLAVOURS = {"moe": "moe=moe", "mone": "moe=mone"}
METRICS = ("acc", "acc_norm")
VALID_EVERY = 50  # data=stdlib's data.valid_every: the held-out files
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
# the task YAML (docs/evaluation.md shows this text): our JSONL fields, choices carrying their
# own separating whitespace
TASK_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: gold
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
"""
# a standard benchmark's shipped task read from a local copy of its data (docs/evaluation.md)
ARC = "arc_easy_local"
ARC_YAML = """\
include: {shipped}
task: arc_easy_local
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    test: {path}
training_split: null
validation_split: null
"""


def _run(what: str, argv: list[str], cwd: Path | None = None) -> str:
    """``argv`` in a subprocess (offline); its stdout, or exit naming ``what`` and its stderr."""
    done = subprocess.run(argv, capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **OFFLINE})  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"lm_eval_parity: {what} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def _cli(module: str) -> list[str]:
    return [sys.executable, "-m", module]


def train(flavour: str, steps: int, seq_length: int, run_dir: Path) -> None:
    """``model=tiny`` of ``flavour`` trained ``steps`` steps, one checkpoint at the end."""
    overrides = [
        "model=tiny", "trainer=smoke", FLAVOURS[flavour], f"trainer.steps={steps}",
        f"trainer.seq_length={seq_length}", f"trainer.eval_interval={steps}",
        "trainer.eval_iters=2", f"trainer.save_interval={steps}", "trainer.async_save=false",
        "trainer.device=cpu", "evaluation.stdlib_task_examples=0", "logging.wandb_mode=disabled",
        f"trainer.run_dir={run_dir}",
    ]  # fmt: skip
    _run(f"training {flavour}", [*_cli("mone_train.train"), *overrides])


def export(run_dir: Path, out: Path) -> str:
    """``mone-export`` of the run's checkpoint into ``out``; the transformers class written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    _run("mone-export", [*_cli("mone_train.export.cli"), str(run_dir), "--out", str(out),
                         "--overwrite"])  # fmt: skip
    return json.loads((out / "mone_export.json").read_text())["architecture"]


def write_tasks(folder: Path, num_examples: int, seq_length: int, seed: int) -> dict[str, Path]:
    """The task files (module docstring) and one lm-eval YAML per task in ``folder``."""
    from mone_train.evaluation.stdlib_task import stdlib_continuation_task, write_jsonl

    held_out = stdlib_continuation_task(VALID_EVERY, num_examples, seq_length, seed=seed)
    rng = np.random.default_rng(seed)
    reals = [e.choices[e.gold] for e in held_out.examples]
    varied = []
    for i, example in enumerate(held_out.examples):
        others = rng.choice([j for j in range(len(reals)) if j != i], size=2, replace=False)
        pieces = [reals[j][: int(rng.integers(2, 11))] for j in (i, *others)]
        context = example.context
        if i % 10 == 9:
            context = ""
        elif i % 2:  # the choices start with the context's last character (a space or not)
            pieces, context = [context[-1] + p for p in pieces], context[:-1]
        order = rng.permutation(3)
        varied.append({"context": context, "choices": [pieces[k] for k in order],
                       "gold": int(np.flatnonzero(order == 0)[0])})  # fmt: skip
    files = {"held_out": write_jsonl(held_out, folder / "held_out.jsonl")}
    files["varied"] = folder / "varied.jsonl"
    files["varied"].write_text("".join(json.dumps(v) + "\n" for v in varied), encoding="utf-8")
    for name, path in files.items():
        (folder / f"{name}.yaml").write_text(TASK_YAML.format(name=name, path=path.resolve()))
    files[ARC] = _arc_copy(folder, varied)
    return files


def _arc_copy(folder: Path, varied: list[dict]) -> Path:
    """The varied task's questions with a context as a local copy of an ARC-format benchmark
    (``question``, ``choices: {text, label}``, ``answerKey``), lm-eval's own ``arc_easy.yaml``
    pointed at it, and the same questions in our format: the prompt ``Question: ...\nAnswer: ``
    with lm-eval's target delimiter (a space) at its end and the choices as they are."""
    import lm_eval

    rows = [v for v in varied if v["context"]]
    arc, ours = folder / "arc_data" / "test.jsonl", folder / f"{ARC}.jsonl"
    arc.parent.mkdir(exist_ok=True)
    labels = "ABCDE"
    with open(arc, "w", encoding="utf-8") as f:
        for i, v in enumerate(rows):
            choices = {"text": v["choices"], "label": list(labels[: len(v["choices"])])}
            f.write(json.dumps({"id": str(i), "question": v["context"], "choices": choices,
                                "answerKey": labels[v["gold"]]}) + "\n")  # fmt: skip
    with open(ours, "w", encoding="utf-8") as f:
        for v in rows:
            context = f"Question: {v['context']}\nAnswer: "
            f.write(json.dumps({**v, "context": context}) + "\n")
    shipped = Path(lm_eval.__file__).parent / "tasks" / "arc" / "arc_easy.yaml"
    (folder / f"{ARC}.yaml").write_text(ARC_YAML.format(shipped=shipped, path=arc.resolve()))
    return ours


def coverage(files: dict[str, Path], seq_length: int) -> dict[str, dict[str, int]]:
    """Per task: examples, contexts ending in whitespace, empty contexts, and rows (context +
    choice) longer than the model's sequence + 1 (byte tokenizer: one token per byte)."""
    out = {}
    for name, path in files.items():
        lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        out[name] = {
            "examples": len(lines),
            "contexts_ending_in_whitespace": sum(x["context"][-1:].isspace() for x in lines),
            "empty_contexts": sum(x["context"] == "" for x in lines),
            "rows_longer_than_sequence": sum(
                len((x["context"] + c).encode()) > seq_length + 1
                for x in lines
                for c in x["choices"]
            ),
        }
    return out


def mone_eval(run_dir: Path, files: dict[str, Path]) -> dict:
    """``mone-eval RUN --tasks FILES --json``: each task's acc, acc_norm and count."""
    out = _run("mone-eval", [*_cli("mone_train.evaluation.cli"), str(run_dir), "--tasks",
                             *map(str, files.values()), "--json"])  # fmt: skip
    return json.loads(out.strip().splitlines()[-1])["tasks"]


def lm_eval_args(export_dir: Path, seq_length: int, remote_code: bool) -> str:
    """``--model_args`` of lm-eval's hf model for an export (docs/evaluation.md)."""
    args = (
        f"pretrained={export_dir},dtype=float32,max_length={seq_length},add_bos_token=False,"
        "logits_cache=False"
    )
    return args + (",trust_remote_code=True" if remote_code else "")


def lm_eval(model_args: str, task_dir: Path, names: list[str], out: Path) -> dict:
    """The ``lm_eval`` CLI on the tasks of ``task_dir``: each task's results."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    _run("lm_eval", [*_cli("lm_eval"), "--model", "hf", "--model_args", model_args,
                     "--include_path", str(task_dir), "--tasks", ",".join(names),
                     "--device", "cpu", "--batch_size", "8", "--output_path", str(out)],
         cwd=out.parent)  # fmt: skip
    (path,) = out.glob("**/results_*.json")
    return json.loads(path.read_text())["results"]


def compare(flavour: str, args, work: Path, files: dict[str, Path]) -> dict:
    """Train, export and score one flavour with both tools."""
    run_dir, export_dir = work / "runs" / flavour, work / "exported" / flavour
    start = time.perf_counter()
    print(f"lm_eval_parity: {flavour}: training model=tiny {args.steps} steps", flush=True)
    train(flavour, args.steps, args.seq_length, run_dir)
    architecture = export(run_dir, export_dir)
    print(f"lm_eval_parity: {flavour}: exported as {architecture}; mone-eval, lm_eval", flush=True)
    ours = mone_eval(run_dir, files)
    model_args = lm_eval_args(export_dir, args.seq_length, architecture == "MoNEForCausalLM")
    theirs = lm_eval(model_args, work, list(files), work / "lm_eval_out" / flavour)
    # what each setting of the recipe changes (docs/evaluation.md), on the Mixtral export:
    # without max_length lm-eval reads up to the export's max_position_embeddings (rows longer
    # than the trained sequence keep more context than mone-eval's); with its logits cache it
    # shares one forward between requests whose tokens agree up to the last and reads the
    # shorter continuation of two that split the same tokens differently (held_out's and
    # varied's) from the wrong positions
    variants = {}
    if flavour == "moe":
        for key, setting in (("without_max_length", f",max_length={args.seq_length}"),
                             ("with_logits_cache", ",logits_cache=False")):  # fmt: skip
            variant_dir = work / "lm_eval_out" / key
            variants[key] = lm_eval(model_args.replace(setting, ""), work, list(files), variant_dir)
    tasks = {}
    for name in files:
        ours_m = {m: ours[name][m] for m in METRICS}
        theirs_m = {m: theirs[name][f"{m},none"] for m in METRICS}
        tasks[name] = {"examples": ours[name]["count"], "mone_eval": ours_m, "lm_eval": theirs_m,
                       "equal": ours_m == theirs_m}  # fmt: skip
        for key, results in variants.items():
            tasks[name][f"lm_eval_{key}"] = {m: results[name][f"{m},none"] for m in METRICS}
    return {"architecture": architecture, "lm_eval_model_args": model_args.replace(str(work), "WORK"),
            "tasks": tasks, "wall_s": round(time.perf_counter() - start, 1)}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  python benchmarks/lm_eval_parity.py\n"
        "  python benchmarks/lm_eval_parity.py --steps 5 --examples 40 --out /tmp/parity",
    )  # fmt: skip
    parser.add_argument("--steps", type=int, default=40, help="training steps per model")
    parser.add_argument("--examples", type=int, default=100, help="examples per task (at most)")
    parser.add_argument("--seq-length", type=int, default=32, help="trainer.seq_length")
    parser.add_argument("--seed", type=int, default=7, help="seed of the task questions")
    parser.add_argument("--work", type=Path, help="keep runs, exports and tasks here")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the results JSON")
    args = parser.parse_args()
    missing = [m for m in ("lm_eval", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"lm_eval_parity: {' and '.join(missing)} not installed (lm-evaluation-harness and "
              f"its hf model are not dependencies of mone-train): {INSTALL}", file=sys.stderr)  # fmt: skip
        return 2
    from importlib.metadata import version

    with tempfile.TemporaryDirectory() as tmp:
        work = (args.work or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        files = write_tasks(work, args.examples, args.seq_length, args.seed)
        flavours = {f: compare(f, args, work, files) for f in FLAVOURS}
        tasks_coverage = coverage(files, args.seq_length)
    print("\n| model | export | task | examples | mone-eval acc / acc_norm | "
          "lm-eval acc / acc_norm | equal |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for flavour, result in flavours.items():
        for name, t in result["tasks"].items():
            ours, theirs = t["mone_eval"], t["lm_eval"]
            print(f"| {flavour} | {result['architecture']} | {name} | {t['examples']} | "
                  f"{ours['acc']:.4f} / {ours['acc_norm']:.4f} | "
                  f"{theirs['acc']:.4f} / {theirs['acc_norm']:.4f} | "
                  f"{'yes' if t['equal'] else 'NO'} |")  # fmt: skip
    all_equal = all(t["equal"] for r in flavours.values() for t in r["tasks"].values())
    print(f"\nall equal: {all_equal}")
    machine = machine_info()
    machine.update({name: version(name) for name in ("lm-eval", "transformers", "datasets")})
    device = "gpu" if machine["gpu"] else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"lm_eval_parity_{device}.json"
    record = {
        "machine": machine,
        "steps": args.steps,
        "seq_length": args.seq_length,
        "seed": args.seed,
        "task_yaml": TASK_YAML,
        "task_coverage": tasks_coverage,
        "models": flavours,
        "all_equal": all_equal,
    }
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")
    return 0 if all_equal else 1


if __name__ == "__main__":
    raise SystemExit(main())
