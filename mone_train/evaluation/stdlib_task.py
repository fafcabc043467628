"""The built-in task of the default corpus: which of two continuations of a held-out file is
the real one, and which the same characters shuffled.

The files are the stdlib corpus's validation documents (every ``valid_every``-th source file,
as :mod:`mone_train.data.corpus` splits them), so no training sequence contains them. Each
continuation is a run of ``CHOICE_CHARS`` characters without whitespace and with at most one
repeated character (a name, a call, an expression): the shuffled choice has the same characters,
and no bigram (such as the spaces of indentation) is shared by most questions, so an untrained
model scores near 0.5 (measured 0.54 and 0.50 at two initial seeds, 200 examples) while a model
that has learnt how code is spelt scores well above it (0.82 after 40 steps of ``model=tiny``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mone_train.data.corpus import stdlib_sources
from mone_train.evaluation.tasks import Example, Task

NAME = "stdlib_continuation"
CHOICE_CHARS = 10
TRIES_PER_EXAMPLE = 50  # random places looked at per example before moving to the next file


def stdlib_continuation_task(
    valid_every: int, num_examples: int, seq_length: int, seed: int = 0
) -> Task:
    """``num_examples`` examples spread over the held-out files (fewer if they run out), each a
    context of 3/4 of ``seq_length`` characters (8 to 96) and two choices."""
    context_chars = max(8, min(96, 3 * seq_length // 4))
    held_out = [p for i, p in enumerate(stdlib_sources()) if i % valid_every == valid_every - 1]
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in held_out]
    texts = [t for t in texts if len(t) > context_chars + CHOICE_CHARS]
    per_file = -(-num_examples // max(len(texts), 1))  # several places in each file
    rng = np.random.default_rng(seed)
    examples = []
    for text in texts:
        for _ in range(per_file):
            if len(examples) < num_examples:
                example = _example(text, context_chars, rng)
                if example is not None:
                    examples.append(example)
    return Task(NAME, tuple(examples))


def _example(text: str, context_chars: int, rng: np.random.Generator) -> Example | None:
    """A question at a random place of ``text`` whose next characters qualify, or None."""
    for _ in range(TRIES_PER_EXAMPLE):
        at = int(rng.integers(context_chars, len(text) - CHOICE_CHARS + 1))
        real = text[at : at + CHOICE_CHARS]
        if any(c.isspace() for c in real) or len(set(real)) < CHOICE_CHARS - 1:
            continue
        shuffled = "".join(real[i] for i in rng.permutation(CHOICE_CHARS))
        if shuffled == real:
            continue
        gold = int(rng.integers(2))
        choices = (real, shuffled) if gold == 0 else (shuffled, real)
        return Example(text[at - context_chars : at], choices, gold)
    return None


def write_jsonl(task: Task, path: str | Path) -> Path:
    """``task`` as a task file (one JSON object per line) at ``path``."""
    path = Path(path)
    lines = [
        json.dumps({"context": e.context, "choices": list(e.choices), "gold": e.gold})
        for e in task.examples
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
