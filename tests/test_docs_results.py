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


def test_every_rendered_table_equals_its_results_file():
    tables = docs_figures.tables()
    assert {t.name for t in tables} >= {
        "final_loss",
        "keep_ratio_grid",
        "mone_fying",
        "trainer_throughput",
    }
    assert [f"{t.doc}:{t.line}: {t.problem}" for t in tables if t.problem] == []


def test_a_figure_in_a_results_subfolder(tmp_path, monkeypatch):
    (tmp_path / "results" / "study").mkdir(parents=True)
    (tmp_path / "results" / "study" / "s.json").write_text(json.dumps({"settings": {"a": {"std": 0.02},
        "b": {"std": 0.0056}}, "rows": [{"impl": "x", "n": 1, "ms": 1.5}, {"impl": "x", "n": 2, "ms": 2.5}]}))  # fmt: skip
    doc = tmp_path / "page.md"
    doc.write_text(
        "**0.006<!-- from study/s.json: settings > * > std > min | .3f -->** and "
        "2.5<!-- from study/s.json: rows > impl=x & n=2 > ms | .1f --> and "
        "−1.5<!-- from study/s.json: rows > impl=x & n=1 > ms | *-1 .1f --> and "
        "−2.5<!-- from study/s.json: rows > impl=x & n=2 > ms | .1f -->\n"
    )
    monkeypatch.setattr(docs_figures, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(docs_figures, "REPO", tmp_path)
    monkeypatch.setattr(docs_figures, "documents", lambda: [doc])
    found = docs_figures.quotes()
    assert [q.figure for q in found] == ["0.006", "2.5", "−1.5", "−2.5"]
    assert [q.problem for q in found][:3] == [None, None, None]
    assert found[3].problem == "says −2.5, study/s.json says 2.5"


def test_a_changed_table_is_caught_and_rewritten(tmp_path, monkeypatch):
    results = tmp_path / "results"
    (results / "run").mkdir(parents=True)
    (results / "run" / "mone_fying.json").write_text(
        json.dumps(
            {
                "step_zero": {
                    "moe": {"rho=1": 1.2, "rho=0.5": 1.25},
                    "upcycled": {"rho=1": 1.3, "rho=0.5": 1.31},
                },
                "validation": {
                    "50": {
                        k: [1.5, 0.01]
                        for k in ("moe-continued", "mone-fied", "mone-upcycled", "mone-scratch")
                    }
                },
            }
        )
    )
    doc = tmp_path / "page.md"
    monkeypatch.setattr(docs_figures, "RESULTS", results)
    monkeypatch.setattr(docs_figures, "REPO", tmp_path)
    monkeypatch.setattr(docs_figures, "documents", lambda: [doc])
    good = docs_figures.rendered("run/*.json", "mone_fying")
    assert (
        good.splitlines()[2]
        == "| 0 (held out, before training) | 1.2000 | 1.2500 | 1.3100 (dense: 1.3000) | (random) |"
    )
    stale = good.replace("1.5000 ± 0.010", "1.4000 ± 0.010", 1)
    doc.write_text(
        f"text\n<!-- table from run/*.json: mone_fying -->\n{stale}<!-- end table -->\nmore\n"
    )
    (table,) = docs_figures.tables()
    assert table.line == 2 and "says '| 50 | 1.4000 ± 0.010" in table.problem
    assert docs_figures.write_tables() == 1
    assert (
        doc.read_text()
        == f"text\n<!-- table from run/*.json: mone_fying -->\n{good}<!-- end table -->\nmore\n"
    )
    assert docs_figures.tables()[0].problem is None


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
