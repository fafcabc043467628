"""Figures quoted in README.md and docs/ equal the results JSON they name (benchmarks/docs_figures.py)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("docs_figures", REPO / "benchmarks/docs_figures.py")
docs_figures = importlib.util.module_from_spec(_spec)
sys.modules["docs_figures"] = docs_figures  # dataclasses look their module up
_spec.loader.exec_module(docs_figures)


def test_every_quoted_figure_equals_its_results_file():
    quotes = docs_figures.quotes()
    assert len(quotes) >= 12  # the README's measured table is marked
    assert [f"{q.doc}:{q.line}: {q.problem}" for q in quotes if q.problem] == []


def test_a_changed_figure_is_caught(tmp_path, monkeypatch):
    results = tmp_path / "results"
    results.mkdir()
    (results / "r.json").write_text(json.dumps({"machine": {"date": "2026-12-07"},
        "rows": [{"impl": "a", "x": 1.2345}, {"impl": "b", "x": 0.5}, {"impl": "a", "x": 2.0}]}))  # fmt: skip
    doc = tmp_path / "page.md"
    doc.write_text(
        "fine 1.23<!-- from r.json: rows > 0 > x | .2f -->× and 2.0<!-- from r.json: rows > "
        "impl=a* > x > max | .1f --> on 2026-12-07<!-- from r.json: machine > date |  -->\n"
        "stale 1.25<!-- from r.json: rows > impl=b > x | .2f --> and 123<!-- from r.json: rows > "
        "0 > x | *100 .0f --> and 9<!-- from gone.json: a | .0f --> and 1<!-- from r.json: nope | .0f -->\n"
    )
    monkeypatch.setattr(docs_figures, "RESULTS", results)
    monkeypatch.setattr(docs_figures, "REPO", tmp_path)
    monkeypatch.setattr(docs_figures, "documents", lambda: [doc])
    found = docs_figures.quotes()
    assert [q.figure for q in found] == ["1.23", "2.0", "2026-12-07", "1.25", "123", "9", "1"]
    problems = [q.problem for q in found]
    assert problems[:3] == [None, None, None]
    assert problems[3] == "says 1.25, r.json says 0.50"
    assert problems[4] is None
    assert "no results file" in problems[5] and "has no 'nope'" in problems[6]


@pytest.mark.parametrize("spec, value, text", [(".3f", 1.0061, "1.006"), ("*100 .1f", 0.311, "31.1"),
                                               ("/60 .0f", 870.0, "14"), ("", "AMD EPYC", "AMD EPYC")])  # fmt: skip
def test_render(spec, value, text):
    assert docs_figures.render(value, spec) == text
