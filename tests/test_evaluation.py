"""Evaluation: layout-independent validation, named sets, multiple-choice tasks, keep ratios,
mone-eval. The distributed runs use real gloo process groups (tests/helpers/distributed.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from mone_train.evaluation.errors import EvaluationError
from mone_train.evaluation.tasks import (
    Continuation,
    Example,
    Task,
    Text,
    encode_rows,
    load_task,
    load_tasks,
    rolling_windows,
    score,
)
from tests.helpers.distributed import metrics, train

TOL = 1e-5
# 4 micro batches of 2 per step on one data-parallel rank (2 on each of two): validation reads
# eval_iters x global batch = 16 sequences whatever the layout.
LAYOUT_RUN = [
    "moe=moe",
    "trainer.steps=4",
    "trainer.eval_interval=2",
    "trainer.eval_iters=2",
    "trainer.micro_batch_size=2",
    "trainer.global_batch_size=8",
    "trainer.save_interval=0",
    "evaluation.stdlib_task_examples=24",
]


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def _evals(run_dir: Path) -> list[dict]:
    return [r for r in metrics(run_dir) if "val_loss" in r]


# -- task files ------------------------------------------------------------------------------


def test_task_file_loads_and_names_the_task_by_stem(tmp_path):
    path = _write(tmp_path / "capitals.jsonl", [
        json.dumps({"context": "Paris is in", "choices": [" France", " Spain"], "gold": 0}),
        "",
        json.dumps({"context": "", "choices": ["a", "bb", "ccc"], "gold": 2}),
    ])  # fmt: skip
    task = load_task(path)
    assert task.name == "capitals" and task.kind == "multiple-choice" and len(task.examples) == 2
    assert task.examples[1] == Example("", ("a", "bb", "ccc"), 2)


@pytest.mark.parametrize(
    "line,message",
    [
        ("not json", "capitals.jsonl:2: not valid JSON"),
        ('["a"]', "capitals.jsonl:2: expected a JSON object"),
        ('{"context": "x", "choices": ["a", "b"]}', "capitals.jsonl:2: missing ['gold']"),
        ('{"context": "x", "choices": ["a"], "gold": 0}', "at least 2 non-empty strings"),
        ('{"context": 3, "choices": ["a", "b"], "gold": 0}', "context must be a string"),
        ('{"context": "x", "choices": ["a", "b"], "gold": 2}',
         "capitals.jsonl:2: gold=2 is out of range for 2 choices (expected 0..1)"),
        ('{"context": "x", "choices": ["a", "b"], "gold": "0"}', "gold must be an integer"),
    ],
)  # fmt: skip
def test_bad_task_line_is_one_line_naming_file_and_line(tmp_path, line, message):
    good = json.dumps({"context": "x", "choices": ["a", "b"], "gold": 1})
    path = _write(tmp_path / "capitals.jsonl", [good, line])
    with pytest.raises(EvaluationError) as err:
        load_task(path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_empty_or_missing_task_file_and_duplicate_names(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(EvaluationError, match=r"empty\.jsonl is empty: expected one JSON object"):
        load_task(tmp_path / "empty.jsonl")
    with pytest.raises(EvaluationError, match="does not exist"):
        load_task(tmp_path / "nope.jsonl")
    good = json.dumps({"context": "x", "choices": ["a", "b"], "gold": 1})
    (tmp_path / "a").mkdir()
    paths = [_write(tmp_path / "t.jsonl", [good]), _write(tmp_path / "a" / "t.jsonl", [good])]
    with pytest.raises(EvaluationError, match="two files are named 't'"):
        load_tasks([str(p) for p in paths])


def test_scores_are_lm_eval_harness_acc_and_acc_norm():
    """acc: argmax of the log-likelihoods; acc_norm: argmax of ll / len(choice) in characters;
    ties to the first choice (numpy.argmax), as lm-evaluation-harness 0.4.x computes them."""
    task = Task("t", (
        Example("q", ("a", "bbbb"), 1),  # ll -2 vs -4: acc picks a, acc_norm (-2 vs -1) bbbb
        Example("q", ("xx", "y", "zzz"), 0),  # -3,-3,-9: tie -> first; norm -1.5,-3,-3 -> xx
        Example("q", ("é", "ab"), 0),  # characters: -1/1 vs -1.5/2 -> ab (bytes: é)
    ))  # fmt: skip
    lls = [-2.0, -4.0, -3.0, -3.0, -9.0, -1.0, -1.5]
    result = score(task, lls)
    assert result == {"acc": pytest.approx(2 / 3), "acc_norm": pytest.approx(2 / 3), "count": 3}


def test_rows_tokenize_context_then_choice_like_the_harness():
    from mone_train.data.tokenizer import ByteTokenizer

    task = Task("t", (Example("ab ", ("cd", "e"), 0), Example("", ("xy", "z"), 1)))
    rows = encode_rows(task, ByteTokenizer(), max_tokens=5)
    # the context's trailing space moves to the choice; an empty context is the eod token
    assert [(r.tolist(), n) for r, n in rows] == [
        ([97, 98, 32, 99, 100], 3), ([97, 98, 32, 101], 2), ([256, 120, 121], 2), ([256, 122], 1),
    ]  # fmt: skip
    long = encode_rows(Task("t", (Example("abcdefgh", ("ij", "k"), 0),)), ByteTokenizer(), 4)
    assert long[0][0].tolist() == [103, 104, 105, 106] and long[0][1] == 2


def test_the_keys_of_the_lines_decide_the_kind_of_a_task(tmp_path):
    mc = _write(
        tmp_path / "mc.jsonl", [json.dumps({"context": "a", "choices": ["b", "c"], "gold": 0})]
    )
    cont = _write(tmp_path / "lambada.jsonl", [
        json.dumps({"context": "The cat sat on the", "continuation": " mat", "id": 7}),
        json.dumps({"context": "", "continuation": "x"}),
    ])  # fmt: skip
    text = _write(tmp_path / "wiki.jsonl", [json.dumps({"text": "One page."})])
    kinds = {t.name: (t.kind, t.examples[0]) for t in load_tasks([str(mc), str(cont), str(text)])}
    assert kinds == {
        "mc": ("multiple-choice", Example("a", ("b", "c"), 0)),
        "lambada": ("continuation", Continuation("The cat sat on the", " mat")),
        "wiki": ("text", Text("One page.")),
    }


@pytest.mark.parametrize(
    "lines,message",
    [
        (['{"text": "a"}', '{"context": "x", "continuation": "y"}'],
         "t.jsonl:2: a continuation line in a text task (line 1): one kind per file"),
        (['{"context": "x", "continuation": "y"}', "", '{"context": "x", "choices": ["a", "b"], "gold": 0}'],
         "t.jsonl:3: a multiple-choice line in a continuation task (line 1)"),
        (['{"context": "x"}'], "t.jsonl:1: none of the task keys: expected ['context', 'choices', 'gold']"),
        (['{"text": "x", "continuation": "y"}'], "t.jsonl:1: keys of several kinds among the task keys"),
        (['{"context": 1, "continuation": "y"}'], "t.jsonl:1: context must be a string"),
        (['{"context": "x", "continuation": ""}'], "t.jsonl:1: continuation must be a non-empty string"),
        (['{"text": ["a"]}'], "t.jsonl:1: text must be a non-empty string"),
    ],
)  # fmt: skip
def test_mixed_kinds_and_bad_continuation_or_text_lines_are_one_line(tmp_path, lines, message):
    path = _write(tmp_path / "t.jsonl", lines)
    with pytest.raises(EvaluationError) as err:
        load_task(path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_continuation_and_text_scores_are_lm_eval_harness_definitions():
    r"""Continuation (output_type loglikelihood): perplexity = exp(-mean ll), acc = mean of
    is_greedy. Text (loglikelihood_rolling): word and byte perplexity exp(-sum ll / sum
    weight), bits_per_byte -sum ll / sum bytes / ln 2; words: re.split(r"\s+", text)."""
    task = Task("c", (Continuation("a", "b"), Continuation("c", "dd")))
    result = score(task, [-1.0, -3.0], greedy=[True, False])
    assert result == {"loglikelihood": -2.0, "perplexity": pytest.approx(math.exp(2.0)),
                      "acc": 0.5, "count": 2}  # fmt: skip
    text = Task("t", (Text("a b  c"), Text("é x")))  # 3 + 2 words, 6 + 4 bytes
    result = score(text, [-2.0, -1.0, -3.0])  # rows: windows of either text, in order
    assert result == {
        "word_perplexity": pytest.approx(math.exp(6 / 5)),
        "byte_perplexity": pytest.approx(math.exp(6 / 10)),
        "bits_per_byte": pytest.approx(6 / 10 / math.log(2)),
        "count": 2,
    }


def _harness_rolling_windows(tokens, prefix, max_seq_len):
    """lm-evaluation-harness's get_rolling_token_windows (context_len=1), then
    make_disjoint_window: [(context, scored)], written from its documented behaviour."""
    windows = [([prefix] + tokens[: min(max_seq_len, len(tokens)) - 1],
                tokens[: min(max_seq_len, len(tokens))])]  # fmt: skip
    predicted = len(windows[0][1])
    while predicted < len(tokens):
        n = min(len(tokens) - predicted, max_seq_len)
        end = predicted + n
        windows.append((tokens[end - max_seq_len - 1 : end - 1], tokens[end - n : end]))
        predicted += n
    return [(ctx[: len(ctx) - len(pred) + 1], pred) for ctx, pred in windows]


@pytest.mark.parametrize("length", [1, 3, 4])
def test_text_rows_are_the_harness_rolling_windows(length):
    for size in range(1, 12):
        ids = list(range(100, 100 + size))
        got = [(t.tolist(), n) for t, n in rolling_windows(ids, 7, length)]
        want = [(ctx + pred, len(pred)) for ctx, pred in _harness_rolling_windows(ids, 7, length)]
        assert got == want, (size, got, want)
        assert sum(n for _, n in got) == size and all(len(t) <= length + 1 for t, _ in got)


def test_continuation_rows_tokenize_like_choices_and_text_rows_cover_every_token():
    from mone_train.data.tokenizer import ByteTokenizer

    tokenizer = ByteTokenizer()
    rows = encode_rows(Task("c", (Continuation("ab ", "cd"), Continuation("", "z"))), tokenizer, 5)
    assert [(r.tolist(), n) for r, n in rows] == [([97, 98, 32, 99, 100], 3), ([256, 122], 1)]
    rows = encode_rows(Task("t", (Text("abcdefg"), Text("hi"))), tokenizer, max_tokens=4)
    assert [(r.tolist(), n) for r, n in rows] == [
        ([256, 97, 98, 99], 3), ([99, 100, 101, 102], 3), ([100, 101, 102, 103], 1),
        ([256, 104, 105], 2),
    ]  # fmt: skip


def test_greedy_is_the_first_argmax_over_the_whole_vocabulary():
    import torch

    from mone_train.evaluation.forward import _is_argmax
    from mone_train.parallel.process_groups import DistInfo

    logits_SBV = torch.tensor([[[0.0, 2.0, 2.0]], [[5.0, 1.0, 0.0]], [[0.0, 0.0, 3.0]]])
    labels_BS = torch.tensor([[1, 2, 2]])  # tie at 1 and 2: argmax is 1; then 0 wins; then 2
    info = DistInfo(0, 1, 0, 0, 1, 0, 1, torch.device("cpu"))
    assert _is_argmax(logits_SBV, labels_BS, info).tolist() == [[True, False, True]]


# -- config ----------------------------------------------------------------------------------


def test_keep_ratio_outside_unit_interval_and_unknown_set_are_one_line(tmp_path):
    from mone_train.components.evaluator import check_evaluation
    from mone_train.compose import compose_config
    from mone_train.errors import ConfigError

    cfg = compose_config(["evaluation.keep_ratios=[1.0,0.0]"])
    with pytest.raises(ConfigError, match=r"evaluation.keep_ratios=\[1.0, 0.0\] is invalid: "):
        cfg.validate()
    cfg.evaluation.keep_ratios = [0.5]
    cfg.moe.flavour = "moe"
    with pytest.raises(EvaluationError, match="invalid for moe=moe: plain experts keep every"):
        check_evaluation(cfg)
    cfg.evaluation.keep_ratios = []
    cfg.evaluation.sets = {"code": f"{tmp_path}/missing"}
    with pytest.raises(EvaluationError) as err:
        check_evaluation(cfg)
    assert str(err.value).startswith(f"evaluation.sets.code='{tmp_path}/missing': ")
    assert "missing.bin does not exist" in str(err.value)


def test_shipped_evaluation_config_composes_and_validates():
    from mone_train.compose import compose_config

    cfg = compose_config([])
    cfg.validate()
    e = cfg.evaluation
    assert (e.sets, e.tasks, e.keep_ratios, e.stdlib_task_examples) == ({}, [], [], 200)
    cfg = compose_config(["+evaluation.sets.code=[/a,/b]", "evaluation.keep_ratios=[1,0.25]"])
    cfg.validate()
    assert cfg.evaluation.sets == {"code": ["/a", "/b"]}


# -- in the training loop ----------------------------------------------------------------------


@pytest.mark.slow
def test_validation_is_the_same_on_every_layout(tmp_path):
    """One job at one process, TP1xDP2, TP2xDP1, PP2xDP1 and EP2xDP2: the same validation loss
    (to 1e-5), the same task accuracy and greedy matches, and the same continuation and text
    likelihoods (to 1e-5 relative) at every evaluation."""
    from mone_train.evaluation.stdlib_task import stdlib_continuation_task

    # continuations of 1 and 10 characters (the short ones: some greedy matches already) and
    # texts of 2 windows, from held-out places
    real = [(e.context, e.choices[e.gold]) for e in stdlib_continuation_task(50, 24, 32).examples]
    _write(tmp_path / "next.jsonl", [json.dumps({"context": c, "continuation": r[:n]})
                                     for c, r in real for n in (1, 10)])  # fmt: skip
    _write(tmp_path / "texts.jsonl", [json.dumps({"text": c + r}) for c, r in real[:8]])
    tasks = f"evaluation.tasks=[{tmp_path / 'next.jsonl'},{tmp_path / 'texts.jsonl'}]"
    layouts = {
        "one": (1, []),
        "dp2": (2, []),
        "tp2": (2, ["trainer.tensor_parallel_size=2"]),
        "pp2": (2, ["trainer.pipeline_parallel_size=2"]),
        "ep2": (2, ["trainer.expert_parallel_size=2"]),
    }
    evals = {}
    for name, (world, extra) in layouts.items():
        train(tmp_path / name, world, *LAYOUT_RUN, tasks, *extra)
        evals[name] = _evals(tmp_path / name)
    reference = evals.pop("one")
    assert [r["step"] for r in reference] == [2, 4]
    for name, records in evals.items():
        assert [r["step"] for r in records] == [2, 4], name
        for ref, got in zip(reference, records):
            assert abs(got["val_loss"] - ref["val_loss"]) <= TOL, (name, got, ref)
            key = "task/stdlib_continuation/acc"
            assert got[key] == ref[key] and got[key.replace("acc", "count")] == 24, name
            # continuation and text tasks: the same likelihoods, the same greedy matches
            assert got["task/next/acc"] == ref["task/next/acc"], name
            for key in ("task/next/loglikelihood", "task/texts/bits_per_byte"):
                assert abs(got[key] - ref[key]) <= TOL * abs(ref[key]), (name, key)
    assert 0 < reference[-1]["task/next/acc"] < 1  # measured: 1 of 48 greedy after 4 steps


RESUME_RUN = [*LAYOUT_RUN, "evaluation.stdlib_task_examples=0", "trainer.async_save=false"]


@pytest.fixture(scope="module")
def stopped_on_dp2(tmp_path_factory):
    """A plain-MoE run on DP 2 evaluated at steps 2 and 4, and the same run stopped after
    step 2 (saved there)."""
    root = tmp_path_factory.mktemp("resume")
    train(root / "straight", 2, *RESUME_RUN)
    train(root / "stopped", 2, *RESUME_RUN, "trainer.steps=2", "trainer.save_interval=2")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("world,layout", [(2, "trainer.tensor_parallel_size=2"), (1, None)])
def test_resumed_on_another_layout_evaluates_like_the_uninterrupted_run(
    stopped_on_dp2, tmp_path, world, layout
):
    """Stopped at step 2 on DP 2 and resumed (the checkpoint resharded) on TP 2 x DP 1 or one
    process: the validation loss at the next evaluation is the uninterrupted run's (to 1e-5)."""
    import shutil

    run_dir = tmp_path / "resumed"
    shutil.copytree(stopped_on_dp2 / "stopped", run_dir)
    train(run_dir, world, *RESUME_RUN, *([layout] if layout else []))
    straight, resumed = _evals(stopped_on_dp2 / "straight"), _evals(run_dir)
    assert [r["step"] for r in resumed] == [r["step"] for r in straight] == [2, 4]
    assert resumed[0]["val_loss"] == straight[0]["val_loss"]  # before the stop: the same run
    assert abs(resumed[1]["val_loss"] - straight[1]["val_loss"]) <= TOL, (resumed, straight)
    # resumed at step 2 (a fresh start would have set the records of steps 1-2 aside)
    assert not list(run_dir.glob("metrics-superseded-*"))
    assert [r["step"] for r in metrics(run_dir) if "loss" in r] == [1, 2, 3, 4]
    # and training went on from the checkpoint's weights: the loss moved in steps 3 and 4
    assert abs(resumed[1]["val_loss"] - resumed[0]["val_loss"]) > 100 * TOL


@pytest.mark.slow
def test_named_sets_are_logged_as_their_own_loss(tmp_path):
    """The data's own validation split as a named set gives val_loss again; the training split
    as a set gives its own (lower) loss; bits are nats / ln 2."""
    from mone_train.compose import compose_config
    from mone_train.data.corpus import prepare_stdlib_corpus
    from mone_train.data.tokenizer import ByteTokenizer

    cache = compose_config([]).data.cache_dir
    corpus = prepare_stdlib_corpus(cache, 50, ByteTokenizer())
    train(tmp_path / "run", 1, "trainer.steps=20", "evaluation.stdlib_task_examples=0",
          f"+evaluation.sets.again={corpus.valid_prefix}",
          f"+evaluation.sets.seen=[{corpus.train_prefix}]")  # fmt: skip
    records = _evals(tmp_path / "run")
    assert [r["step"] for r in records] == [10, 20]
    for r in records:
        assert r["eval/again/loss"] == pytest.approx(r["val_loss"], abs=1e-12)
        assert r["eval/seen/loss"] != r["val_loss"]
        assert r["eval/seen/bits_per_token"] == pytest.approx(r["eval/seen/loss"] / math.log(2))
        assert 0 < r["eval/valid/bits_per_byte"] < 8.1  # bytes: below 8 bits once trained


# -- keep ratios and mone-eval on one trained MoNE model ------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny MoNE model (rho 0.5) trained 40 steps and one after 1 step, both evaluated in the
    loop on tasks written here (real vs shuffled continuations of held-out files; the real
    ones as a continuation task; context and continuation as texts) at four keep ratios, and
    saved."""
    from mone_train.evaluation.stdlib_task import stdlib_continuation_task, write_jsonl

    root = tmp_path_factory.mktemp("trained")
    task = stdlib_continuation_task(50, 200, 32, seed=7)
    task_file = write_jsonl(task, root / "held_out.jsonl")
    # the same held-out places as a continuation task and as texts (2 windows each)
    real = [(e.context, e.choices[e.gold]) for e in task.examples]
    _write(
        root / "next.jsonl", [json.dumps({"context": c, "continuation": r}) for c, r in real[:64]]
    )
    _write(root / "texts.jsonl", [json.dumps({"text": c + r}) for c, r in real[:16]])
    files = ",".join(str(root / f) for f in ("held_out.jsonl", "next.jsonl", "texts.jsonl"))
    common = ["evaluation.stdlib_task_examples=0", f"evaluation.tasks=[{files}]",
              "evaluation.keep_ratios=[1.0,0.5,0.1,0.02]", "trainer.async_save=false"]  # fmt: skip
    train(root / "run", 1, "trainer.steps=40", "trainer.eval_interval=40", "trainer.save_interval=40",
          *common)  # fmt: skip
    train(root / "step1", 1, "trainer.steps=1", "trainer.save_interval=1", *common)
    return root, task_file


@pytest.fixture(scope="module")
def offline(trained) -> tuple[int, dict]:
    """``mone-eval RUN --json`` on the 40-step run: its exit code and output."""
    import contextlib
    import io

    from mone_train.evaluation.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([str(trained[0] / "run"), "--json"])
    return code, json.loads(out.getvalue())


def _mone_eval(capsys, *argv: str) -> tuple[int, str, str]:
    from mone_train.evaluation.cli import main

    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow
def test_keep_ratio_sweep_in_the_loop(trained):
    """rho_eval = rho_train is the plain evaluation; below it the loss rises."""
    root, _ = trained
    last = _evals(root / "run")[-1]
    assert last["step"] == 40
    for key in ("eval/valid/loss", "task/held_out/acc", "task/held_out/acc_norm"):
        assert last[f"rho0.5/{key}"] == pytest.approx(last[key], abs=1e-12), key
    # fewer neurons than trained with: the loss rises as rho falls (measured: 3.1129 at 0.5,
    # 3.1165 at 0.1, 3.140 at 0.02 after 40 steps; the tiny model leans little on its experts)
    losses = [last[f"rho{r}/eval/valid/loss"] for r in ("0.5", "0.1", "0.02")]
    assert losses[0] < losses[1] < losses[2], losses
    assert last["rho1/eval/valid/loss"] != last["eval/valid/loss"]  # K changed: all neurons


@pytest.mark.slow
def test_report_plots_task_accuracy_per_keep_ratio(trained, tmp_path):
    from mone_train.report.cli import build_report

    root, _ = trained
    result = build_report([root / "run"], tmp_path / "report")
    curves = result["rows"][0].task_curves
    assert sorted(curves) == [f"{task}{rho}" for task in ("held_out", "next", "texts")
                              for rho in ("", " rho=0.02", " rho=0.1", " rho=0.5", " rho=1")]  # fmt: skip
    assert [step for step, _ in curves["held_out"]] == [40]
    assert result["rows"][0].task_metrics == {"held_out": "acc", "next": "acc",
                                              "texts": "bits_per_byte"}  # fmt: skip
    assert curves["texts"] == [(40, _evals(root / "run")[-1]["task/texts/bits_per_byte"])]
    assert (tmp_path / "report" / "tasks.png").stat().st_size > 0


@pytest.mark.slow
def test_mone_eval_equals_the_loop_and_a_trained_model_knows_the_task(trained, offline, capsys):
    root, task_file = trained
    last = _evals(root / "run")[-1]
    code, result = offline
    assert code == 0
    assert result["step"] == 40
    assert result["sets"]["valid"]["loss"] == pytest.approx(last["val_loss"], abs=1e-9)
    task = result["tasks"]["held_out"]
    assert task["count"] == len(load_task(task_file).examples) > 190
    for metric in ("acc", "acc_norm"):
        assert task[metric] == last[f"task/held_out/{metric}"]
        assert (
            result["keep_ratios"]["0.1"]["tasks"]["held_out"][metric]
            == last[f"rho0.1/task/held_out/{metric}"]
        )
    assert task["acc"] >= 0.7  # learnt how code is spelt (measured 0.85)
    # after one step the model knows nothing of code: chance (0.5) within 3 standard errors
    # (measured 0.51; 0.48 at another seed)
    code, out, _ = _mone_eval(capsys, root / "step1", "--tasks", task_file, "--keep-ratios",
                              "0.5", "--json")  # fmt: skip
    early = json.loads(out)
    assert code == 0 and early["step"] == 1 and abs(early["tasks"]["held_out"]["acc"] - 0.5) <= 0.1
    assert list(early["keep_ratios"]) == ["0.5"]


@pytest.mark.slow
def test_continuation_and_text_tasks_learnt_in_the_loop_and_equal_in_mone_eval(
    trained, offline, capsys
):
    """The trained model's continuations are likelier than the 1-step model's, its texts take
    fewer bits per byte; mone-eval gives the in-loop numbers."""
    root, _ = trained
    last, early = _evals(root / "run")[-1], _evals(root / "step1")[-1]
    assert (last["step"], early["step"]) == (40, 1)
    assert last["task/next/count"] == 64 and last["task/texts/count"] == 16
    # measured: -39.2 nats per 10-character continuation after 40 steps, -59.6 after 1 step;
    # 4.95 and 7.94 bits per byte on the texts
    # (a uniform guess over the byte vocabulary: 10 x ln 258 = 55.5)
    assert early["task/next/loglikelihood"] < last["task/next/loglikelihood"] - 10
    assert last["task/next/loglikelihood"] < 0
    assert last["task/next/perplexity"] == pytest.approx(math.exp(-last["task/next/loglikelihood"]))
    assert 0 <= last["task/next/acc"] <= 1
    assert last["task/texts/bits_per_byte"] < early["task/texts/bits_per_byte"] - 1
    assert last["task/texts/byte_perplexity"] == pytest.approx(
        2 ** last["task/texts/bits_per_byte"]
    )
    assert last["task/texts/word_perplexity"] > last["task/texts/byte_perplexity"]
    code, result = offline
    assert code == 0
    for name in ("next", "texts"):
        offline = result["tasks"][name]
        for metric, value in offline.items():
            assert value == pytest.approx(last[f"task/{name}/{metric}"], rel=1e-9, abs=1e-12)
        assert result["keep_ratios"]["0.1"]["tasks"][name] == pytest.approx(
            {
                k[len(f"rho0.1/task/{name}/") :]: v
                for k, v in last.items()
                if k.startswith(f"rho0.1/task/{name}/")
            }  # fmt: skip
        )
    from mone_train.evaluation.cli import _print_table

    _print_table(result)  # the table (mone-eval without --json) prints every kind's metrics
    out = capsys.readouterr().out
    assert "task next: acc " in out and ", loglikelihood -" in out
    assert "task texts: word_perplexity" in out and "bits_per_byte" in out


@pytest.mark.slow
def test_mone_eval_bad_input_is_one_line(trained, capsys, tmp_path):
    root, _ = trained
    (tmp_path / "empty.jsonl").write_text("")
    cases = [
        ([tmp_path / "nothing"], "RUN_OR_CHECKPOINT="),
        ([root / "run", "--keep-ratios", "1.5"], "evaluation.keep_ratios=[1.5] is invalid"),
        ([root / "run", "--tasks", tmp_path / "empty.jsonl"], "empty.jsonl is empty"),
    ]
    for argv, message in cases:
        code, out, err = _mone_eval(capsys, *argv)
        assert code == 2 and out == "", argv
        assert err.startswith("mone-eval: ") and message in err and err.count("\n") == 1, err


@pytest.mark.slow
def test_in_loop_task_scores_equal_transformers_on_the_exported_model(trained, tmp_path):
    """The same rows scored independently: the mone-export output in transformers, the
    log-likelihood of each choice's tokens from its logits, acc and acc_norm recomputed."""
    import torch
    from transformers import AutoModelForCausalLM

    from mone_train.data.tokenizer import ByteTokenizer
    from mone_train.export.cli import main as export_main

    root, task_file = trained
    assert export_main([str(root / "run"), "--out", str(tmp_path / "hf")]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    task = load_task(task_file)
    lls = []
    with torch.no_grad():
        for tokens, num_scored in encode_rows(task, ByteTokenizer(), max_tokens=33):
            ids = torch.from_numpy(tokens)[None]
            logprobs = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
            picked = logprobs.gather(1, ids[0, 1:, None])[:, 0]
            lls.append(float(picked[-num_scored:].sum()))
    acc = acc_norm = 0
    for i, example in enumerate(task.examples):
        pair = lls[2 * i : 2 * i + 2]
        acc += max(range(2), key=lambda c: (pair[c], -c)) == example.gold
        norm = [pair[c] / len(example.choices[c]) for c in range(2)]
        acc_norm += max(range(2), key=lambda c: (norm[c], -c)) == example.gold
    last = _evals(root / "run")[-1]
    assert acc / len(task.examples) == last["task/held_out/acc"]
    assert acc_norm / len(task.examples) == last["task/held_out/acc_norm"]


@pytest.mark.slow
def test_eval_overhead_benchmark_runs(tmp_path):
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, "benchmarks/eval_overhead.py", "--overrides", "model=tiny", "trainer=smoke",
         "evaluation.stdlib_task_examples=20", "--repeats", "1", "--train-steps", "1", "--out",
         str(tmp_path)],
        capture_output=True, text=True, cwd=repo, timeout=300,
        env={**os.environ, "TORCHDYNAMO_DISABLE": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "eval_overhead_cpu.json").read_text())
    assert report["task_examples"] == 20 and 0 < report["evaluation_share_of_run"] < 1
    assert report["run"] == {"steps": 60, "eval_interval": 30, "evaluations": 2}
