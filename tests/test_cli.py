"""Every ``mone-*`` command follows one convention: ``<area>/cli.py`` (``mone-train``: the
Hydra entry point ``train.py``), ``--help`` ending with examples, and bad input as one line from
the ConfigError hierarchy with exit code 2."""

from __future__ import annotations

import importlib
import tomllib
from pathlib import Path

import pytest

from mone_train.command_line import CommandParser, UsageError
from mone_train.errors import EXIT_CONFIG_ERROR, ConfigError

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
ARGPARSE_COMMANDS = sorted(name for name in SCRIPTS if name != "mone-train")


def _entry(name: str):
    module, _, function = SCRIPTS[name].partition(":")
    return module, getattr(importlib.import_module(module), function)


def test_every_command_lives_in_an_area_cli_module():
    for name, target in SCRIPTS.items():
        module = target.partition(":")[0]
        expected = "mone_train.train" if name == "mone-train" else "<area>.cli"
        assert module.endswith(".cli") or module == "mone_train.train", (name, expected, module)


@pytest.mark.parametrize("name", ARGPARSE_COMMANDS)
def test_help_ends_with_examples(name, capsys):
    _, main = _entry(name)
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    examples = out.split("examples:\n", 1)
    assert len(examples) == 2, f"{name} --help shows no example"
    assert f"  {name} " in examples[1] or "  mone-" in examples[1]


@pytest.mark.parametrize("name", ARGPARSE_COMMANDS)
def test_an_unknown_option_is_one_line_and_exit_2(name, capsys):
    _, main = _entry(name)
    try:
        code = main(["--no-such-option", "x"])
    except SystemExit as done:
        code = done.code
    err = capsys.readouterr().err.strip()
    assert code == EXIT_CONFIG_ERROR, (name, code, err)
    assert len(err.splitlines()) == 1 and err.startswith(f"{name}: "), err
    assert "Traceback" not in err


def test_usage_errors_belong_to_the_config_error_hierarchy():
    parser = CommandParser(prog="mone-x", examples=("mone-x --n 3",))
    parser.add_argument("--n", type=int, required=True)
    with pytest.raises(UsageError, match=r"--n.*see mone-x --help") as raised:
        parser.parse_args(["--n", "three"])
    assert isinstance(raised.value, ConfigError)
    assert parser.format_help().rstrip().endswith("mone-x --n 3")


def test_every_area_error_is_a_config_error():
    from mone_train.analysis.errors import AnalysisError
    from mone_train.components.checkpoint import CheckpointError
    from mone_train.data.dataset import DataError
    from mone_train.data.preprocess import PreprocessError
    from mone_train.data.tokenizer import TokenizerError
    from mone_train.export.errors import ExportError
    from mone_train.parallel.process_groups import LaunchError
    from mone_train.report.cli import ReportError

    for error in (AnalysisError, CheckpointError, DataError, PreprocessError, TokenizerError,
                  ExportError, LaunchError, ReportError):  # fmt: skip
        assert issubclass(error, ConfigError), error


@pytest.mark.slow  # a fresh interpreter per command
@pytest.mark.parametrize("name", ARGPARSE_COMMANDS)
def test_help_from_the_installed_command_prints_no_library_notices(name):
    """No warning from the libraries a command imports (megatron-core's CPU fallbacks) before
    its own output: commands silence them before importing them."""
    import subprocess
    import sys

    done = subprocess.run([str(Path(sys.executable).parent / name), "--help"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0 and done.stdout
    assert done.stderr == "", done.stderr[-1000:]
