"""The package as users install it: a wheel (not the editable checkout) runs the trainer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_wheel_install_trains_from_another_directory(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(wheels), str(REPO)],
        check=True, cwd=tmp_path,
    )  # fmt: skip
    (wheel,) = wheels.glob("mone_train-*.whl")
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
         "--target", str(site), str(wheel)],
        check=True,
    )  # fmt: skip
    assert (site / "mone_train" / "configs" / "config.yaml").is_file()
    # The CPU operators' sources travel with the package (built on first use from there).
    from mone_kernels.cpu_build import HEADERS, SOURCES

    for source in [*SOURCES, *HEADERS]:
        assert (site / "mone_kernels" / "csrc" / source.name).is_file(), source.name
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # The installed copy comes before the checkout's editable finder on the import path.
    env = {**os.environ, "PYTHONPATH": str(site), "WANDB_MODE": "disabled"}
    where = subprocess.run(
        [sys.executable, "-c", "import mone_train, mone_kernels; print(mone_train.__file__)"],
        env=env, cwd=elsewhere, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert where.stdout.strip().startswith(str(site))
    run_dir = elsewhere / "run"
    done = subprocess.run(
        [str(site / "bin" / "mone-train"), "model=tiny", "trainer=smoke", "trainer.steps=4",
         "trainer.eval_interval=4", "trainer.eval_iters=1", f"trainer.run_dir={run_dir}"],
        env=env, cwd=elsewhere, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 4 and "val_loss" in records[-1]
