"""Downstream tasks from local JSONL files, and their scores, as lm-evaluation-harness (0.4.x)
defines them.

One JSON object per line; the task's name is the file's stem. The keys of the lines decide the
task's kind (one kind per file):

- **multiple choice** ``{"context": str, "choices": [str, ...], "gold": int}``: each choice is
  scored by the log-likelihood of its tokens after the context's (``context + choice`` is the
  text, as written: add any separating space to the choices). ``acc``: the choice of highest
  log-likelihood is the gold one; ``acc_norm``: the same after dividing each log-likelihood by
  the choice's length in characters; ties go to the first choice (``numpy.argmax``). The
  harness's ``MultipleChoiceTask``.
- **continuation** ``{"context": str, "continuation": str}``: the log-likelihood of the
  continuation's tokens after the context's. ``loglikelihood``: its mean over examples (nats);
  ``perplexity``: ``exp(-loglikelihood)``; ``acc``: the share of continuations that greedy
  decoding reproduces (every token the argmax of its logits). The harness's ``loglikelihood``
  output type (``perplexity`` and ``acc`` of LAMBADA).
- **text** ``{"text": str}``: the log-likelihood of the whole text, read in disjoint windows of
  the model's sequence length (each window after the previous window's last token; the first
  after the end-of-document token). ``word_perplexity``: ``exp(-sum ll / sum words)``;
  ``byte_perplexity``: ``exp(-sum ll / sum UTF-8 bytes)``; ``bits_per_byte``:
  ``-sum ll / sum bytes / ln 2``; words are the pieces of ``re.split(r"\\s+", text)``. The
  harness's ``loglikelihood_rolling`` output type (as WikiText).

Tokenization follows the harness too: the context is tokenized alone, the scored tokens are
those of ``context + target`` after the context's, whitespace at the end of the context moves
to the start of the target, an empty context is the end-of-document token, and a row longer
than the model's sequence keeps its last tokens.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from mone_train.evaluation.errors import EvaluationError

CHOICE, CONTINUATION, TEXT = "multiple-choice", "continuation", "text"
# each kind's keys; the first one not shared with another kind tells the kind
KEYS = {
    CHOICE: ("context", "choices", "gold"),
    CONTINUATION: ("context", "continuation"),
    TEXT: ("text",),
}
MARKERS = {"choices": CHOICE, "continuation": CONTINUATION, "text": TEXT}


@dataclass(frozen=True)
class Example:
    """One multiple-choice question: the context, its choices and the index of the right one."""

    context: str
    choices: tuple[str, ...]
    gold: int


@dataclass(frozen=True)
class Continuation:
    """A context and the continuation whose likelihood is scored."""

    context: str
    continuation: str


@dataclass(frozen=True)
class Text:
    """A document whose likelihood is scored whole (perplexity)."""

    text: str


KIND_OF = {Example: CHOICE, Continuation: CONTINUATION, Text: TEXT}


@dataclass(frozen=True)
class Task:
    """A named list of examples of one kind (the name: the file's stem)."""

    name: str
    examples: tuple[Example, ...] | tuple[Continuation, ...] | tuple[Text, ...]

    @property
    def kind(self) -> str:
        """``multiple-choice``, ``continuation`` or ``text``."""
        return KIND_OF[type(self.examples[0])] if self.examples else CHOICE

    @property
    def needs_greedy(self) -> bool:
        """Whether scoring needs to know if each row's tokens are the greedy ones."""
        return self.kind == CONTINUATION


class Row(NamedTuple):
    """One forward row: tokens (context + scored tokens, at most the model's sequence + 1) and
    how many at its end are scored."""

    tokens: np.ndarray
    num_scored: int


# -- loading ---------------------------------------------------------------------------------


def line_kind(obj, where: str) -> str:
    """The kind a line's keys say; one line naming ``where`` when they say none or two."""
    if not isinstance(obj, dict):
        raise EvaluationError(f"{where}: expected a JSON object with {_kinds_keys()}")
    kinds = sorted({kind for key, kind in MARKERS.items() if key in obj})
    if len(kinds) != 1:
        found = "none of" if not kinds else "keys of several kinds among"
        raise EvaluationError(f"{where}: {found} the task keys: expected {_kinds_keys()}")
    return kinds[0]


def _kinds_keys() -> str:
    return " or ".join(f"{list(keys)} ({kind})" for kind, keys in KEYS.items())


def _example(obj: dict, kind: str, where: str):
    """One line's object of ``kind`` checked: the keys, their types, the gold index in range."""
    missing = [key for key in KEYS[kind] if key not in obj]
    if missing:
        raise EvaluationError(f"{where}: missing {missing} (each {kind} line needs "
                              f"{list(KEYS[kind])})")  # fmt: skip
    if kind == TEXT:
        if not (isinstance(obj["text"], str) and obj["text"]):
            raise EvaluationError(f"{where}: text must be a non-empty string")
        return Text(obj["text"])
    context = obj["context"]
    if not isinstance(context, str):
        raise EvaluationError(f"{where}: context must be a string, not {type(context).__name__}")
    if kind == CONTINUATION:
        if not (isinstance(obj["continuation"], str) and obj["continuation"]):
            raise EvaluationError(f"{where}: continuation must be a non-empty string")
        return Continuation(context, obj["continuation"])
    choices, gold = obj["choices"], obj["gold"]
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
    first: tuple[str, int] | None = None  # the file's kind and the line that set it
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                obj = json.loads(line)
            except ValueError as err:
                raise EvaluationError(f"{where}: not valid JSON ({err})") from None
            kind = line_kind(obj, where)
            if first is None:
                first = (kind, number)
            elif kind != first[0]:
                raise EvaluationError(
                    f"{where}: a {kind} line in a {first[0]} task (line {first[1]}): one kind "
                    "per file"
                )
            examples.append(_example(obj, kind, where))
    if not examples:
        raise EvaluationError(
            f"task file {path} is empty: expected one JSON object per line with {_kinds_keys()}"
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


# -- rows ------------------------------------------------------------------------------------


def encode_rows(task: Task, tokenizer, max_tokens: int) -> list[Row]:
    """The rows to score, in order: example by example (choice by choice, window by window).
    At most ``max_tokens`` tokens per row (the model's sequence + 1: the end is kept)."""
    rows = []
    for example in task.examples:
        if isinstance(example, Text):
            windows = rolling_windows(
                _encode(tokenizer, example.text), tokenizer.eod, max_tokens - 1
            )
            rows += [Row(tokens, n) for tokens, n in windows]
            continue
        targets = example.choices if isinstance(example, Example) else (example.continuation,)
        context, moved = _split_trailing_space(example.context)
        context_ids = _encode(tokenizer, context) if context else np.array([tokenizer.eod])
        for target in targets:
            target = moved + target
            if context:
                whole = _encode(tokenizer, context + target)
                target_ids = whole[len(context_ids) :]
            else:
                target_ids = _encode(tokenizer, target)
            tokens = np.concatenate([context_ids, target_ids]).astype(np.int64)
            num_scored = min(len(target_ids), max_tokens - 1)
            rows.append(Row(tokens[-max_tokens:], max(num_scored, 1)))
    return rows


def rolling_windows(ids: np.ndarray, eod: int, length: int) -> list[tuple[np.ndarray, int]]:
    """(tokens, number scored at the end) per window scoring every token of ``ids`` once with
    a model of sequence ``length``: lm-evaluation-harness's ``get_rolling_token_windows`` with
    ``context_len=1`` and ``make_disjoint_window``. The first window follows ``eod``; each
    next one scores the following ``length`` tokens after the previous window's last token
    (the last window: after as many earlier tokens as fit)."""
    ids = np.asarray(ids, dtype=np.int64)
    windows = []
    for start in range(0, len(ids), length):
        end = min(start + length, len(ids))
        if start == 0:
            tokens = np.concatenate([[eod], ids[:end]]).astype(np.int64)
        else:
            tokens = ids[end - length - 1 : end]
        windows.append((tokens, end - start))
    return windows


def _split_trailing_space(context: str) -> tuple[str, str]:
    """The context without its trailing whitespace, and that whitespace (the harness moves it to
    the start of each target: ``"Q: a "`` + ``"b"`` is scored as ``"Q: a"`` + ``" b"``)."""
    stripped = context.rstrip()
    return stripped, context[len(stripped) :]


def _encode(tokenizer, text: str) -> np.ndarray:
    return np.asarray(tokenizer.tokenize(text), dtype=np.int64)


# -- scores ----------------------------------------------------------------------------------


def score(task: Task, loglikelihoods, greedy=None) -> dict[str, float]:
    """The task's metrics (see the module docstring) and ``count`` (examples) from one
    log-likelihood per row of :func:`encode_rows` and, for continuation tasks, whether each
    row's scored tokens are all greedy. A text's windows add up to its log-likelihood, and the
    text metrics divide the sum over all texts: the sum over all rows."""
    lls = np.asarray(loglikelihoods, dtype=np.float64)
    count = len(task.examples)
    if task.kind == CHOICE:
        return {**_choice_scores(task, lls), "count": count}
    if task.kind == CONTINUATION:
        mean = float(lls.mean())
        return {"loglikelihood": mean, "perplexity": math.exp(-mean),
                "acc": float(np.mean(greedy)), "count": count}  # fmt: skip
    total = float(lls.sum())
    words = sum(len(re.split(r"\s+", e.text)) for e in task.examples)
    num_bytes = sum(len(e.text.encode("utf-8")) for e in task.examples)
    return {
        "word_perplexity": math.exp(-total / words),
        "byte_perplexity": math.exp(-total / num_bytes),
        "bits_per_byte": -total / num_bytes / math.log(2),
        "count": count,
    }


def _choice_scores(task: Task, lls: np.ndarray) -> dict[str, float]:
    acc = acc_norm = 0
    start = 0
    for example in task.examples:
        ll = lls[start : start + len(example.choices)]
        start += len(example.choices)
        lengths = np.array([float(len(c)) for c in example.choices])
        acc += int(np.argmax(ll) == example.gold)
        acc_norm += int(np.argmax(ll / lengths) == example.gold)
    count = len(task.examples)
    return {"acc": acc / count, "acc_norm": acc_norm / count}
