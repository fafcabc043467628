"""mone-report on hand-written run directories: seed groups, mean ± std, single runs as before."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from mone_train.compose import compose_config
from mone_train.report.cli import build_report, main


def _fake_run(folder: Path, overrides: list[str], seed: int, losses: list[float]) -> None:
    """A finished run as mone-train leaves it: resolved config, parameter counts, metrics."""
    from omegaconf import OmegaConf

    cfg = compose_config(
        [*overrides, f"trainer.seed={seed}", f"trainer.run_dir={folder}", "trainer.steps=20"]
    )
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    (folder / "params.json").write_text(
        json.dumps({"total": 1000, "activated": 500, "activated_moe": 600})
    )
    records = [
        {"step": 10, "loss": 3.0, "tokens_per_s": 100.0, "val_loss": losses[0]},
        {"step": 20, "loss": 2.0, "tokens_per_s": 120.0, "val_loss": losses[1]},
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_runs_differing_only_in_seed_are_one_row_with_mean_and_std(tmp_path):
    finals = {1: 1.50, 2: 1.54, 3: 1.52}
    for seed, final in finals.items():
        _fake_run(tmp_path / "mone" / f"seed{seed}", ["moe=mone"], seed, [2.0 + seed, final])
    _fake_run(tmp_path / "moe" / "seed1", ["moe=moe"], 1, [2.5, 1.49])
    # the same seeds, another keep ratio: a setting of its own
    _fake_run(tmp_path / "mone-q" / "seed1", ["moe=mone", "moe.neuron_keep_ratio=0.25"], 1,
              [2.6, 1.6])  # fmt: skip

    result = build_report([tmp_path], tmp_path / "report")
    groups = {g.first.label: g for g in result["groups"]}
    assert sorted(groups) == ["MoE F=256", "MoNE rho=0.25", "MoNE rho=0.5"]
    assert [r.seed for r in groups["MoNE rho=0.5"].rows] == [1, 2, 3]

    mean, std = statistics.fmean(finals.values()), statistics.stdev(finals.values())
    table = (tmp_path / "report" / "report.md").read_text()
    assert f"| 1,2,3 | {mean:.4f} ± {std:.4f} |" in table
    assert "| MoE F=256 | moe | 1 | 256 | 20 | 1 | 1.4900 |" in table  # one seed: no ± part
    record = {g["label"]: g for g in json.loads((tmp_path / "report" / "report.json").read_text())[
        "groups"]}  # fmt: skip
    assert abs(record["MoNE rho=0.5"]["final_val_loss_std"] - std) < 1e-12
    assert record["MoNE rho=0.5"]["seeds"] == [1, 2, 3]
    steps, means, stds = groups["MoNE rho=0.5"].mean_curve()
    assert steps == [10, 20] and means[0] == 4.0 and abs(stds[0] - 1.0) < 1e-12
    for png in ("val_loss.png", "loss_vs_activated.png"):
        assert (tmp_path / "report" / png).read_bytes()[:4] == b"\x89PNG"


def test_single_seed_runs_report_as_before(tmp_path, capsys):
    _fake_run(tmp_path / "a", ["moe=mone"], 1, [2.0, 1.5])
    _fake_run(tmp_path / "b", ["moe=mone", "moe.neuron_keep_ratio=0.25"], 1, [2.0, 1.6])
    _fake_run(tmp_path / "c", ["moe=moe"], 7, [2.0, 1.4])
    assert main([str(tmp_path), "--out", str(tmp_path / "report")]) == 0
    table = (tmp_path / "report" / "report.md").read_text()
    assert "seeds" not in table and "±" not in table  # every setting once: today's table
    assert "| MoNE rho=0.5 | mone | 0.5 | 256 | 20 | 1.5000 | 1.5000 |" in table
    assert "| 1.6000 |" in table and "| 1.4000 |" in table
    assert "MoNE rho=0.5" in capsys.readouterr().out


def test_two_seeds_of_one_setting_anywhere_are_grouped(tmp_path, capsys):
    _fake_run(tmp_path / "x" / "0", ["moe=mone"], 1, [2.0, 1.5])
    _fake_run(tmp_path / "y" / "0", ["moe=mone"], 2, [2.0, 1.7])
    assert main([str(tmp_path), "--out", str(tmp_path / "report")]) == 0
    table = (tmp_path / "report" / "report.md").read_text()
    assert "| 1,2 | 1.6000 ± 0.1414 |" in table
    capsys.readouterr()
