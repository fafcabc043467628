"""Every benchmark figure quoted in README.md and docs/ next to the results JSON it came from.

A quoted figure carries a hidden marker right after it, naming the results file (under
benchmarks/results/), the path to the value and how it is printed:

    1.006<!-- from trainer_throughput_cpu-avx512.json: paired_effects > MoNE / MoE step time > ratio | .3f -->

Path segments are separated by ``>``: a dict key, a list index, or ``field=value`` to pick the
list element whose ``field`` equals ``value``. The spec is a Python format spec, optionally
preceded by ``*K`` or ``/K`` (scale the value first): ``/60 .1f`` prints seconds as minutes. A
string value (a machine name, a date) is compared as it is.

    python benchmarks/docs_figures.py          # every marker, its figure and value; exit 1 if any differs

``tests/test_docs_results.py`` runs the same check in CI, so a figure that no longer matches its
JSON (or a marker whose file or path is gone) fails the suite.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
# The figure: the non-space text right before the marker (a number, a date, a name without
# spaces); the marker: from FILE: PATH | SPEC
MARKER = re.compile(r"(?P<figure>[^\s>|(–/#]+)<!-- from (?P<file>[^:]+): (?P<path>[^|]+?) \| "
                    r"(?P<spec>.*?) ?-->")  # fmt: skip


@dataclass
class Quote:
    doc: str
    line: int
    figure: str
    file: str
    path: str
    spec: str
    value: object = None
    expected: str | None = None
    problem: str | None = None


def documents() -> list[Path]:
    """The pages whose figures are checked: README.md and every docs/*.md."""
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def lookup(data, path: str):
    """The value at ``path`` (segments separated by ``>``) in a loaded JSON document.

    ``*`` (all elements of a list) or ``field=value*`` (all elements whose ``field`` is
    ``value``) make the following segments apply to each element, until ``min``, ``max`` or
    ``count`` reduces them to one value."""
    many = False
    for segment in (s.strip() for s in path.split(">")):
        if segment in REDUCERS:
            data, many = REDUCERS[segment](data), False
        elif segment == "*":
            many = True
        elif segment.endswith("*") and "=" in segment:
            field, _, wanted = segment[:-1].partition("=")
            data = [x for x in data if isinstance(x, dict) and str(x.get(field)) == wanted]
            many = True
        elif many:
            data = [_step(x, segment) for x in data]
        else:
            data = _step(data, segment)
    return data


REDUCERS = {"min": min, "max": max, "count": len}


def _step(data, segment: str):
    """One segment: a dict key, a list index, or the one list element with ``field=value``."""
    if not isinstance(data, list):
        return data[segment]
    if "=" not in segment:
        return data[int(segment)]
    field, _, wanted = segment.partition("=")
    matches = [x for x in data if isinstance(x, dict) and str(x.get(field)) == wanted]
    if len(matches) != 1:
        raise KeyError(f"{len(matches)} elements with {segment}")
    return matches[0]


def render(value, spec: str) -> str:
    """``value`` as the docs print it under ``spec`` (``[*K|/K] format``)."""
    if isinstance(value, str) or not spec:
        return str(value)
    scale = re.match(r"^([*/])([\d.e+-]+)\s*", spec)
    if scale:
        factor = float(scale.group(2))
        value = value * factor if scale.group(1) == "*" else value / factor
        spec = spec[scale.end() :]
    return format(value, spec)


def quotes() -> list[Quote]:
    """Every marked figure of the docs, with its JSON value and any disagreement."""
    found = []
    for doc in documents():
        for number, line in enumerate(doc.read_text().splitlines(), 1):
            for match in MARKER.finditer(line):
                quote = Quote(str(doc.relative_to(REPO)), number, **match.groupdict())
                quote.spec = quote.spec.strip()
                check(quote)
                found.append(quote)
    return found


def check(quote: Quote) -> None:
    """Fill in the quote's value, what the docs should say, and the problem if they differ."""
    path = RESULTS / quote.file
    if not path.is_file():
        quote.problem = f"no results file benchmarks/results/{quote.file}"
        return
    try:
        quote.value = lookup(json.loads(path.read_text()), quote.path)
    except (KeyError, IndexError, ValueError, TypeError) as err:
        quote.problem = f"{quote.file} has no {quote.path!r} ({err})"
        return
    quote.expected = render(quote.value, quote.spec)
    if quote.expected != quote.figure:
        quote.problem = f"says {quote.figure}, {quote.file} says {quote.expected}"


def main() -> int:
    found = quotes()
    bad = [q for q in found if q.problem]
    for q in found:
        mark = "DIFFERS" if q.problem else "ok"
        print(f"{q.doc}:{q.line:<5} {q.figure:>12}  {q.file}: {q.path}  {mark}")
    for q in bad:
        print(f"{q.doc}:{q.line}: {q.problem}", file=sys.stderr)
    print(f"{len(found)} figures checked, {len(bad)} differ")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
