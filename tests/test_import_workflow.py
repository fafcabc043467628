"""The README's workflow for released weights, from the command line: import (a Llama 3 with
its scaled RoPE, upcycled) -> MoNE-fy and train with ``--config-dir IMPORT arch=imported`` ->
export -> load in transformers -> generate; at expert parallelism 1 and 2. And ``--config-dir``
gets the same one-line checks of its overrides as every other launch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mone_train.preflight import check_overrides
from mone_train.preflight import main as preflight_main

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _cli(*args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")}  # fmt: skip
    env.update(TORCHDYNAMO_DISABLE="1", TORCHRUN=str(BIN / "torchrun"))
    done = subprocess.run(list(args), capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=timeout)  # fmt: skip
    assert done.returncode == 0, (args, done.stderr[-3000:])
    return done


@pytest.mark.slow  # an import, two short runs (one on 2 processes), two exports
def test_the_readme_import_workflow_runs_end_to_end_at_expert_parallel_one_and_two(
    tmp_path, corpus, capsys
):
    """mone-import, mone-export and mone-generate through their command lines' entry points,
    mone-train as a process (EP 1) and through launch/torchrun.sh (EP 2): the exported model
    is MoNE at rho = 0.5 with the Llama 3 RoPE, its logits megatron's (fp32, 1e-4)."""
    import shutil

    from mone_train.export.cli import main as export_main
    from mone_train.importer.cli import main as import_main
    from mone_train.inference.cli import main as generate_main
    from tests.helpers.hf_models import save_hf_model
    from tests.test_export import _load, _megatron_logits
    from tests.test_import import _tokenizer
    from tests.test_rope_scaling import LLAMA3, build_rope_model

    source = save_hf_model(build_rope_model("llama", LLAMA3), tmp_path / "llama3")
    shutil.copy(_tokenizer(tmp_path, 300), source / "tokenizer.json")
    imported = tmp_path / "imported"
    assert import_main([str(source), "--out", str(imported), "--upcycle-experts", "4",
                        "--upcycle-topk", "2"]) == 0  # fmt: skip
    train = ["--config-dir", str(imported), "arch=imported", "moe.neuron_keep_ratio=0.5",
             "trainer=smoke", "trainer.steps=4", "trainer.save_interval=4",
             "trainer.eval_interval=4", "trainer.eval_iters=1", "trainer.micro_batch_size=4",
             "logging.wandb_mode=disabled"]  # fmt: skip
    bad = subprocess.run(
        [sys.executable, "-m", "mone_train.train", *train, "moe.neuron_keep_ratio=1.5",
         f"trainer.run_dir={tmp_path / 'bad-run'}"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "mone-train: error: moe.neuron_keep_ratio=1.5 is invalid: expected a ratio in (0, 1]"
    ]
    assert not (tmp_path / "bad-run").exists()
    tokens_BS = torch.randint(0, 256, (2, 80), generator=torch.Generator().manual_seed(0))
    for ep in (1, 2):
        run_dir = tmp_path / f"run-ep{ep}"
        launch = ([sys.executable, "-m", "mone_train.train"] if ep == 1
                  else ["bash", "launch/torchrun.sh", "2"])  # fmt: skip
        done = _cli(*launch, *train, f"trainer.run_dir={run_dir}",
                    f"trainer.expert_parallel_size={ep}")  # fmt: skip
        assert f"initial weights from {imported}" in done.stdout
        out = tmp_path / f"exported-ep{ep}"
        assert export_main([str(run_dir), "--out", str(out)]) == 0
        config = json.loads((out / "config.json").read_text())
        assert config["model_type"] == "mone" and config["num_kept_neurons"] == 48
        assert config["rope_parameters"] == LLAMA3
        logits = _load(out)(tokens_BS).logits.detach()
        torch.testing.assert_close(logits, _megatron_logits(run_dir, tokens_BS), rtol=0,
                                   atol=1e-4)  # fmt: skip
        capsys.readouterr()
        assert generate_main([str(out), "--prompt", "def main(", "--max-new-tokens", "8",
                              "--greedy"]) == 0  # fmt: skip
        text, report = capsys.readouterr()
        assert text.startswith("def main(") and len(text) > len("def main(")
        assert "[8 tokens in" in report


def _config_dir(tmp_path: Path) -> Path:
    """What ``arch=imported`` needs of a mone-import output: its arch/imported.yaml."""
    (tmp_path / "arch").mkdir()
    (tmp_path / "arch" / "imported.yaml").write_text(
        "# @package _global_\nmodel:\n  name: imported-test\n  rope_scaling:\n"
        "    rope_type: yarn\n    factor: 4.0\n"
    )
    return tmp_path


def _one_line(capsys, check) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        check()
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1, err
    return err[0]


def test_config_dir_overrides_get_the_one_line_preflight_checks(tmp_path, capsys):
    folder = _config_dir(tmp_path)
    check_overrides(["--config-dir", str(folder), "arch=imported", "moe.neuron_keep_ratio=0.5"])
    for flag in (["--config-dir", str(folder)], [f"--config-dir={folder}"], ["-cd", str(folder)]):
        argv = [*flag, "arch=imported", "moe.neuron_keep_ratio=1.5"]
        line = _one_line(capsys, lambda: check_overrides(argv))  # noqa: B023 (called here)
        assert line == ("mone-train: error: moe.neuron_keep_ratio=1.5 is invalid: expected a "
                        "ratio in (0, 1]")  # fmt: skip
    line = _one_line(capsys, lambda: check_overrides(
        ["--config-dir", str(folder), "arch=imported", "model.rope_scaling.rope_type=ntk"]))  # fmt: skip
    assert "model.rope_scaling.rope_type='ntk' is invalid" in line
    line = _one_line(capsys, lambda: check_overrides(
        ["--config-dir", str(tmp_path / "nowhere"), "arch=imported"]))  # fmt: skip
    assert "--config-dir" in line and "nowhere: no such folder" in line
    # the launchers' preflight: the layout on the job's processes, with the imported arch
    line = _one_line(capsys, lambda: preflight_main(
        ["--world-size", "2", "--config-dir", str(folder), "arch=imported",
         "trainer.expert_parallel_size=3"]))  # fmt: skip
    assert line.startswith("mone-train: error: ") and "expert_parallel_size" in line
