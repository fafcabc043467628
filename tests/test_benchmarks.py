"""The benchmark scripts still run (tiny shapes, CPU) and write their JSON; no timing asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _run(args, tmp_path):
    result = subprocess.run(
        [sys.executable, *args, "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.slow  # a benchmark script in a subprocess
def test_kernel_benchmark_runs_on_cpu(tmp_path):
    out = _run(
        [
            "benchmarks/kernel_bench.py",
            "--rows",
            "64",
            "--neurons",
            "32",
            "--ratios",
            "0.5",
            "--repeats",
            "1",
        ],
        tmp_path,
    )
    assert "the fused path is the C++ CPU operator" in out
    (json_path,) = tmp_path.glob("kernel_bench_cpu-*.json")  # named by the CPU paths it ran
    data = json.loads(json_path.read_text())
    assert json_path.name == f"kernel_bench_cpu-{data['machine']['mone_cpu_isa']}.json"
    impls = {row["impl"] for row in data["rows"]}
    assert {"fused", "reference", "dense", "expert"} <= impls
    assert json_path.with_suffix(".png").stat().st_size > 0


@pytest.mark.slow  # trains in a subprocess
def test_trainer_throughput_benchmark_runs(tmp_path):
    out = _run(
        [
            "benchmarks/trainer_throughput.py",
            "--steps-per-turn",
            "1",
            "--warmup",
            "1",
            "--rounds",
            "2",
            "--overrides",
            "model=tiny",
            "trainer.seq_length=32",
            "trainer.micro_batch_size=2",
            "trainer.global_batch_size=2",
        ],  # fmt: skip
        tmp_path,
    )
    assert "trainer/mone" in out
    (json_path,) = tmp_path.glob("trainer_throughput_cpu-*.json")
    data = json.loads(json_path.read_text())
    assert [row["contender"] for row in data["results"]] == [
        "bare/moe",
        "trainer/moe",
        "trainer/mone",
        "trainer/mone-no-health",
        "trainer/deepseek-moe",
        "trainer/deepseek-mone",
        "trainer/deepseek_v3-moe",
        "trainer/deepseek_v3-mone",
    ]
    assert all(len(row["rounds_tokens_per_s"]) == 2 for row in data["results"])
    assert "MoNE / MoE step time, DeepSeek-style" in data["paired_effects"]
    assert "MoNE / MoE step time, deepseek_v3" in data["paired_effects"]
    assert data["machine"]["cpu_cores"] >= 1 and data["machine"]["torch_cpu_capability"]


@pytest.mark.slow  # trains in a subprocess
def test_health_overhead_benchmark_runs(tmp_path):
    out = _run(
        ["benchmarks/health_overhead.py", "--blocks", "2", "--steps", "1", "--warmup", "1",
         "--overrides", "model=tiny", "trainer.seq_length=32", "trainer.micro_batch_size=2",
         "trainer.global_batch_size=2"],
        tmp_path,
    )  # fmt: skip
    assert "cost" in out
    data = json.loads((tmp_path / "health_overhead_cpu.json").read_text())
    assert len(data["cost_per_block_pair"]) == 2 and data["seconds_per_step_plain"] > 0


@pytest.mark.slow  # trains twice in subprocesses
def test_gpu_check_dry_run_writes_every_table(tmp_path):
    """benchmarks/gpu_check.sh at toy sizes on CPU: the script a GPU runs, its quicker steps
    exercised (kernel compile report, kernel benchmark, bf16 MoE vs MoNE step time through the
    trainer, grouped GEMMs) and the others reported as skipped; the whole dry run (the GPU tier
    and the defaults' runs too) takes tens of minutes on 2 cores (docs/testing.md)."""
    import os

    out = tmp_path / "gpu"
    steps = ["grouped_gemm", "kernel_bench", "step_time", "kernel_static"]
    done = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(out)],
        capture_output=True, text=True, timeout=400,
        env={**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable,
             "WHEELS": str(tmp_path / "none"), "STEPS": " ".join(steps)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    ran = {s["step"]: s["status"] for s in json.loads((out / "steps.json").read_text())["steps"]}
    assert ran == {"gpu_tier": "skipped", "gpu_defaults": "skipped", "checkpoint_save": "skipped",
                   **{name: "ok" for name in steps}}  # fmt: skip
    grouped = json.loads((out / "gpu_grouped_gemm_cpu_dry_run.json").read_text())["results"]
    assert len(grouped) == 18 and all(r["grouped_tflops"] > 0 for r in grouped)
    assert "all targets met" in (out / "kernel_static.txt").read_text()
    assert json.loads(next(out.glob("kernel_bench_cpu-*.json")).read_text())
    step = json.loads((out / "step_time_cpu_dry_run.json").read_text())
    assert [r["flavour"] for r in step["runs"]] == ["moe", "mone"]
    assert all(r["tokens_per_s"] > 0 and r["peak_rss_gib"] > 0 for r in step["runs"])
    assert step["mone_over_moe_step_time"] > 0
    assert "tables in" in (out / "gpu_check.log").read_text()


@pytest.mark.slow  # a bash script starting interpreters
def test_gpu_check_says_what_it_could_not_run(tmp_path):
    """Without a GPU and with its budget spent, gpu_check.sh skips every step, says why in
    steps.md / steps.json, and exits 0 (nothing failed)."""
    import os

    out = tmp_path / "gpu"
    done = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(out)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "DRY_RUN": "0", "BUDGET_S": "0", "PYTHON": sys.executable,
             "WHEELS": str(tmp_path / "none")},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    steps = json.loads((out / "steps.json").read_text())["steps"]
    assert [s["step"] for s in steps] == [
        "gpu_tier",
        "grouped_gemm",
        "kernel_bench",
        "step_time",
        "gpu_defaults",
        "checkpoint_save",
        "kernel_static",
    ]
    notes = {s["step"]: (s["status"], s["note"]) for s in steps}
    assert notes["gpu_tier"] == ("skipped", "no CUDA device")
    assert notes["kernel_static"] == ("skipped", "budget of 0 s spent")
    assert "| step_time | skipped | 0 | no CUDA device |" in (out / "steps.md").read_text()


@pytest.mark.slow  # trains in a subprocess
def test_watchdog_overhead_benchmark_runs(tmp_path):
    out = _run(
        [
            "benchmarks/watchdog_overhead.py",
            "--rounds",
            "2",
            "--steps-per-turn",
            "1",
            "--overrides",
            "model=tiny",
            "trainer.seq_length=32",
            "trainer.micro_batch_size=2",
            "trainer.global_batch_size=2",
        ],  # fmt: skip
        tmp_path,
    )
    assert "step time with / without the watchdog" in out
    data = json.loads((tmp_path / "watchdog_overhead_cpu.json").read_text())
    assert len(data["rounds"]) == 2 and data["step_time_ratio"] > 0


@pytest.mark.slow  # trains and exports two models in subprocesses
def test_lm_eval_parity_benchmark_runs_and_agrees(tmp_path):
    """lm-evaluation-harness scores both exports (Mixtral, MoNE remote code) as mone-eval scores
    the checkpoints; skipped where lm-eval is not installed (it is no dependency: CI)."""
    pytest.importorskip("lm_eval")
    out = _run(["benchmarks/lm_eval_parity.py", "--steps", "2", "--examples", "20"], tmp_path)
    assert "all equal: True" in out
    data = json.loads((tmp_path / "lm_eval_parity_cpu.json").read_text())
    assert [m["architecture"] for m in data["models"].values()] == [
        "MixtralForCausalLM",
        "MoNEForCausalLM",
    ]
    coverage = data["task_coverage"]
    assert coverage["varied"]["empty_contexts"] and coverage["varied"]["rows_longer_than_sequence"]
    assert coverage["held_out"]["examples"] == 20
    for model in data["models"].values():
        for name, task in model["tasks"].items():
            assert task["mone_eval"] == task["lm_eval"]
            assert task["examples"] == coverage[name]["examples"]
