"""The fused kernels' register, spill and occupancy targets, from the compiler (no GPU needed).

Triton compiles for sm_80 / sm_90 on any machine and its bundled ptxas / cuobjdump report the
resources, so these tests guard the design notes' targets in CI: forward >= 16 and backward
>= 32 resident warps per SM for F <= 4096, no spills up to F = 8192.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

from mone_kernels import static_check  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(
    not Path(triton.knobs.nvidia.cuobjdump.path).exists(), reason="triton ships no cuobjdump"
)


def test_resident_warps_follow_the_occupancy_rules():
    sm90, sm80 = static_check.ARCHS[90], static_check.ARCHS[80]
    # 200 registers: 6400 per warp, 10 warps' worth, two 4-warp CTAs.
    assert static_check.resident_warps(200, 1024, 4, sm90) == 8
    assert static_check.resident_warps(128, 1024, 16, sm90) == 16
    assert static_check.resident_warps(64, 1024, 8, sm90) == 32
    # Few registers: the 64-warp limit binds; a 100 KiB CTA: shared memory binds on sm_80.
    assert static_check.resident_warps(24, 1024, 4, sm90) == 64
    assert static_check.resident_warps(32, 100 * 1024, 4, sm80) == 4
    assert static_check.resident_warps(32, 100 * 1024, 4, sm90) == 8


@pytest.mark.parametrize("neurons", [256, 4096])
def test_forward_and_backward_meet_the_occupancy_targets_on_sm90_bf16(neurons):
    usages = static_check.measure_all([neurons], ["bf16"], [90], ["forward", "backward"])
    by_kernel = {u.kernel: u for u in usages}
    assert by_kernel["forward"].warps_per_sm >= 16
    assert by_kernel["backward"].warps_per_sm >= 32
    assert all(u.stack_bytes == 0 and u.regs > 0 for u in usages)
    assert static_check.goal_failures(usages) == []


def test_the_weighted_forward_keeps_the_occupancy_target_on_sm90():
    """The neuron-level balance's variant (selection weights looked up per row)."""
    usages = static_check.measure_all([4096], ["bf16"], [90], ["forward+bias"])
    assert usages[0].stack_bytes == 0 and usages[0].warps_per_sm >= 16
    assert static_check.goal_failures(usages) == []


@pytest.mark.parametrize(("arch", "dtype"), [(90, "bf16"), (80, "fp32")])
def test_no_spills_at_f8192(arch, dtype):
    # fp32 on sm_80 holds the most registers per element; bf16 on sm_90 is the training case.
    usages = static_check.measure_all([8192], [dtype], [arch], ["forward", "backward+lbl"])
    assert [u.stack_bytes for u in usages] == [0, 0]
    assert static_check.goal_failures(usages) == []


def test_goal_failures_name_the_kernel_and_the_miss():
    usage = static_check.KernelUsage(
        kernel="forward", arch=90, dtype="bf16", num_neurons=1024, num_warps=4, constexprs={},
        regs=200, stack_bytes=16, smem_bytes=1024, warps_per_sm=8, bytes_per_row=0,
    )  # fmt: skip
    failures = static_check.goal_failures([usage])
    assert failures == [
        "forward sm_90 bf16 F=1024: 8 resident warps/SM < 16",
        "forward sm_90 bf16 F=1024: 16 stack bytes (spills)",
    ]


@pytest.mark.slow  # the benchmark script end to end
def test_benchmark_script_writes_json_and_markdown(tmp_path):
    result = subprocess.run(
        [sys.executable, "benchmarks/kernel_static.py", "--archs", "90", "--neurons", "256",
         "--dtypes", "bf16", "--kernels", "forward", "backward", "--out", str(tmp_path),
         "--date", "2000-01-01", "--check"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "all targets met" in result.stdout
    data = json.loads((tmp_path / "kernel_static_2000-01-01.json").read_text())
    assert [k["kernel"] for k in data["kernels"]] == ["forward", "backward"]
    assert data["failures"] == [] and data["machine"]["cpu_cores"] >= 1
    assert data["kernels"][0]["bytes_per_row"] == 3 * 256 * 2 + 32
    markdown = (tmp_path / "kernel_static_2000-01-01.md").read_text()
    assert "| forward | sm_90 | bf16 | 256 |" in markdown
