"""Multiple-choice tasks from local JSONL files, and their scores.

One JSON object per line: ``{"context": str, "choices": [str, ...], "gold": int}``; the task's
name is the file's stem. Each choice is scored by the log-likelihood of its tokens after the
context's (``context + choice`` is the text, as written: add any separating space to the
choices). The scores are lm-evaluation-harness's (0.4.x ``MultipleChoiceTask``):

- ``acc``: the choice of highest log-likelihood is the gold one;
- ``acc_norm``: the same after dividing each log-likelihood by the choice's length in
  characters (``len(choice)``);

ties go to the first choice (``numpy.argmax``). Tokenization follows the harness too: the
context is tokenized alone, the choice's tokens are those of ``context + choice`` after the
context's, an empty context is the end-of-document token, and a row longer than the model's
sequence keeps its last tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mone_train.evaluation.errors import EvaluationError

KEYS = ("context", "choices", "gold")


@dataclass(frozen=True)
class Example:
    """One question: the context, its choices and the index of the right one."""

    context: str
    choices: tuple[str, ...]
    gold: int


@dataclass(frozen=True)
class Task:
    """A named list of examples (the name: the file's stem)."""

    name: str
    examples: tuple[Example, ...]

    @property
    def num_rows(self) -> int:
        """Rows to score: one per (example, choice)."""
        return sum(len(e.choices) for e in self.examples)


def _example(obj, where: str) -> Example:
    """One line's object checked: the keys, their types, the gold index in range."""
    if not isinstance(obj, dict):
        raise EvaluationError(f"{where}: expected a JSON object with {list(KEYS)}")
    missing = [key for key in KEYS if key not in obj]
    if missing:
        raise EvaluationError(f"{where}: missing {missing} (each line needs {list(KEYS)})")
    context, choices, gold = obj["context"], obj["choices"], obj["gold"]
    if not isinstance(context, str):
        raise EvaluationError(f"{where}: context must be a string, not {type(context).__name__}")
    if not (isinstance(choices, list) and len(choices) >= 2
            and all(isinstance(c, str) and c for c in choices)):  # fmt: skip
        raise EvaluationError(f"{where}: choices must be a list of at least 2 non-empty strings")
    if not isinstance(gold, int) or isinstance(gold, bool):
        raise EvaluationError(f"{where}: gold must be an integer index into choices, not {gold!r}")
    if not 0 <= gold < len(choices):
        raise EvaluationError(
            f"{where}: gold={gold} is out of range for {len(choices)} choices "
            f"(expected 0..{len(choices) - 1})"
        )
    return Example(context, tuple(choices), gold)


def load_task(path: str | Path) -> Task:
    """The task in JSONL file ``path``; one line naming file:line and the problem otherwise."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise EvaluationError(f"task file {path} does not exist (expected a .jsonl file)")
    examples = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                obj = json.loads(line)
            except ValueError as err:
                raise EvaluationError(f"{where}: not valid JSON ({err})") from None
            examples.append(_example(obj, where))
    if not examples:
        raise EvaluationError(
            f"task file {path} is empty: expected one JSON object per line with {list(KEYS)}"
        )
    return Task(path.stem, tuple(examples))


def load_tasks(paths: list[str]) -> list[Task]:
    """Every file's task; two files with one stem would log under one name: refused."""
    tasks = [load_task(p) for p in paths]
    names = [t.name for t in tasks]
    for name in names:
        if names.count(name) > 1:
            raise EvaluationError(
                f"evaluation.tasks: two files are named {name!r} (a task's name is its file's "
                "stem): rename one"
            )
    return tasks


def encode_rows(task: Task, tokenizer, max_tokens: int) -> list[tuple[np.ndarray, int]]:
    """(tokens of context + choice, number of choice tokens at its end) per row, in order:
    example by example, choice by choice. At most ``max_tokens`` tokens per row (the end)."""
    rows = []
    for example in task.examples:
        context, moved = _split_trailing_space(example.context)
        context_ids = _encode(tokenizer, context) if context else np.array([tokenizer.eod])
        for choice in example.choices:
            choice = moved + choice
            if context:
                whole = _encode(tokenizer, context + choice)
                choice_ids = whole[len(context_ids) :]
            else:
                choice_ids = _encode(tokenizer, choice)
            tokens = np.concatenate([context_ids, choice_ids]).astype(np.int64)
            num_scored = min(len(choice_ids), max_tokens - 1)
            rows.append((tokens[-max_tokens:], max(num_scored, 1)))
    return rows


def _split_trailing_space(context: str) -> tuple[str, str]:
    """The context without its trailing whitespace, and that whitespace (the harness moves it to
    the start of each choice: ``"Q: a "`` + ``"b"`` is scored as ``"Q: a"`` + ``" b"``)."""
    stripped = context.rstrip()
    return stripped, context[len(stripped) :]


def _encode(tokenizer, text: str) -> np.ndarray:
    return np.asarray(tokenizer.tokenize(text), dtype=np.int64)


def score(task: Task, loglikelihoods: list[float]) -> dict[str, float]:
    """``acc``, ``acc_norm`` (lm-evaluation-harness's definitions) and ``count`` of ``task`` from
    one log-likelihood per row (the order of :func:`encode_rows`)."""
    lls = np.asarray(loglikelihoods, dtype=np.float64)
    acc = acc_norm = 0
    start = 0
    for example in task.examples:
        ll = lls[start : start + len(example.choices)]
        start += len(example.choices)
        lengths = np.array([float(len(c)) for c in example.choices])
        acc += int(np.argmax(ll) == example.gold)
        acc_norm += int(np.argmax(ll / lengths) == example.gold)
    count = len(task.examples)
    return {"acc": acc / count, "acc_norm": acc_norm / count, "count": count}
