"""Every CUDA-guarded branch has a GPU-tier test, and the device choice behind them.

An AST scan finds each function of mone_train and mone_kernels that asks whether it runs on
CUDA (``torch.cuda.is_available()``, ``.is_cuda``, a comparison with ``"cuda"`` or ``"nccl"``,
``on_cuda()``, ``cuda_absent()``); COVERED maps each to the test of tests/test_gpu.py that
executes that branch on a GPU. The test fails for a branch without an entry, an entry whose
test does not exist, and an entry whose branch is gone.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from mone_train.errors import ConfigError
from mone_train.parallel.process_groups import choose_device

REPO = Path(__file__).resolve().parent.parent
GPU_TESTS = REPO / "tests" / "test_gpu.py"

_GROUP = "test_one_process_group_runs_collectives_on_the_device_without_cpu_patches"
_FAMILIES = "test_every_family_trains_a_1b_slice_in_bf16_close_to_fp32"
_KERNEL = "test_compiled_kernel_forward_and_backward_match_reference"
_GROUPED = "test_grouped_experts_match_expert_by_expert_on_the_device"
_RESUME = "test_resume_after_a_stop_is_bit_exact_on_the_device"
_GENERATE = "test_generation_and_the_sparse_decode_path_on_the_device"
_ANALYSIS = "test_analysis_runs_on_the_device"
_TWO_RANKS = "test_two_ranks_expert_and_pipeline_parallel_on_the_device"  # needs 2 GPUs

# "module:function" -> the GPU-tier test that runs its CUDA branch.
COVERED = {
    "mone_train.__init__:silence_megatron_notices": _GENERATE,  # mone-generate calls it
    "mone_train.analysis.cli:_device": _ANALYSIS,
    "mone_train.analysis.models:open_model": _ANALYSIS,
    "mone_train.components.checkpoint:_save_rng_states": _RESUME,
    "mone_train.components.checkpoint:load_checkpoint": _RESUME,
    "mone_train.components.checkpoint_model:open_checkpoint_model": _GENERATE,
    "mone_train.components.metrics:TrainMetrics._gpu_flops": _FAMILIES,
    "mone_train.components.metrics:read_aux_losses": _TWO_RANKS,
    "mone_train.components.metrics:read_mtp_loss": _TWO_RANKS,
    "mone_train.components.stragglers:StragglerReport.on_phase": (
        "test_gradient_sync_is_timed_with_device_events"
    ),
    "mone_train.config:MoEConfig.grouped_on": _GROUPED,
    "mone_train.inference.cli:run": _GENERATE,
    "mone_train.model.builder:parallel_settings": _TWO_RANKS,
    "mone_train.model.builder:transformer_config": _GROUPED,
    "mone_train.model.builder:_experts_module": _FAMILIES,
    "mone_train.model.builder:build_model": _FAMILIES,
    "mone_train.parallel.comm_stats:_on_cuda_stream": _GROUP,
    "mone_train.parallel.cpu_compat:cuda_absent": _GROUP,
    "mone_train.parallel.cpu_compat:apply": _GROUP,
    "mone_train.parallel.cpu_compat:_install_alltoall_splits.maybe_move_tensor_to_cpu": _GROUP,
    "mone_train.parallel.cpu_compat:_CPUZerosTorch.zeros": _GROUP,
    "mone_train.parallel.process_groups:choose_device": _GROUP,
    "mone_train.parallel.process_groups:run_device": _GROUP,
    "mone_train.parallel.process_groups:on_cuda": _GROUP,
    "mone_train.parallel.process_groups:init_distributed": _GROUP,
    "mone_train.planning.plan:shape_of": _FAMILIES,  # the plan checked against the peak
    "mone_train.runtime:configure_torch": "test_compile_on_and_off_train_alike",
    "mone_kernels.dispatch:resolve_impl": _KERNEL,
    "mone_kernels.triton_topk_swiglu:triton_runnable": _KERNEL,
}


def _asks_for_cuda(node: ast.AST) -> bool:
    if isinstance(node, ast.Call):
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr == "is_available":
            return isinstance(func.value, ast.Attribute) and func.value.attr == "cuda"
        return isinstance(func, ast.Name) and func.id in ("on_cuda", "cuda_absent")
    if isinstance(node, ast.Attribute):
        return node.attr == "is_cuda"
    if isinstance(node, ast.Compare):
        sides = [node.left, *node.comparators]
        return any(isinstance(s, ast.Constant) and s.value in ("cuda", "nccl") for s in sides)
    return False


def cuda_branches(package: str) -> dict[str, list[int]]:
    """``{"module:qualified.function": [line, ...]}`` of the CUDA questions in ``package``."""
    found: dict[str, list[int]] = {}
    for path in sorted((REPO / package).rglob("*.py")):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts)

        def visit(node: ast.AST, qualname: str, module: str = module) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    visit(child, f"{qualname}.{child.name}" if qualname else child.name)
                    continue
                if _asks_for_cuda(child):
                    found.setdefault(f"{module}:{qualname or '<module>'}", []).append(child.lineno)
                visit(child, qualname)

        visit(ast.parse(path.read_text()), "")
    return found


def _gpu_tier_tests() -> set[str]:
    tree = ast.parse(GPU_TESTS.read_text())
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name[:5] == "test_"}


def test_every_cuda_branch_has_a_gpu_tier_test():
    branches = {**cuda_branches("mone_train"), **cuda_branches("mone_kernels")}
    uncovered = {k: v for k, v in branches.items() if k not in COVERED}
    assert not uncovered, f"CUDA branches without a tests/test_gpu.py entry in COVERED: {uncovered}"
    stale = sorted(set(COVERED) - set(branches))
    assert not stale, f"COVERED names functions with no CUDA branch (any more): {stale}"
    missing = {k: t for k, t in COVERED.items() if t not in _gpu_tier_tests()}
    assert not missing, f"COVERED names tests that tests/test_gpu.py lacks: {missing}"


def test_the_scan_finds_each_kind_of_cuda_question():
    source = (
        "def a(t):\n    return t.is_cuda\n"
        "def b(d):\n    if d.type == 'cuda':\n        pass\n"
        "class C:\n    def m(self):\n        return torch.cuda.is_available()\n"
        "def e():\n    return dist.get_backend() != 'nccl' or on_cuda()\n"
    )
    found = []

    class Visitor(ast.NodeVisitor):
        def generic_visit(self, node):
            if _asks_for_cuda(node):
                found.append(node.lineno)
            super().generic_visit(node)

    Visitor().visit(ast.parse(source))
    assert found == [2, 4, 8, 10, 10]


# --- the device choice (what makes the rest of the suite stay on the CPU) ----------------------


@pytest.mark.parametrize(
    ("choice", "cuda", "env", "expected"),
    [
        ("auto", True, None, "cuda"),
        ("auto", False, None, "cpu"),
        ("auto", True, "cpu", "cpu"),  # the test suite on a GPU machine
        ("cpu", True, None, "cpu"),
        ("cpu", True, "cuda", "cpu"),  # a named device wins over the variable
        ("cuda", True, "cpu", "cuda"),  # the GPU tier inside the test suite
    ],
)
def test_device_choice(choice, cuda, env, expected):
    assert choose_device(choice, cuda, env) == expected


@pytest.mark.parametrize(
    ("choice", "cuda", "env", "message"),
    [
        ("cuda", False, None, "trainer.device=cuda is invalid here: no CUDA device"),
        ("cuda", False, "cpu", "trainer.device=cuda is invalid here: no CUDA device"),
        ("auto", False, "cuda", "MONE_TRAIN_DEVICE=cuda is invalid here: no CUDA device"),
        ("auto", True, "gpu", "MONE_TRAIN_DEVICE='gpu' is invalid: cpu, cuda or unset"),
        ("tpu", True, None, "trainer.device='tpu' is invalid: one of ['auto', 'cpu', 'cuda']"),
    ],
)
def test_bad_device_choice_is_one_config_error(choice, cuda, env, message):
    with pytest.raises(ConfigError, match="^" + message.replace("[", r"\[").replace("(", r"\(")):
        choose_device(choice, cuda, env)


def test_the_suite_runs_on_the_cpu_and_trainer_device_is_validated():
    import os

    from mone_train.compose import compose_config

    assert os.environ["MONE_TRAIN_DEVICE"] == "cpu"  # tests/conftest.py
    assert compose_config([]).trainer.device == "auto"
    with pytest.raises(ConfigError, match="trainer.device"):
        compose_config(["trainer.device=gpu"]).validate()


@pytest.mark.slow  # a fresh interpreter importing megatron-core
def test_cpu_patches_come_out_again():
    """restore() puts back every attribute the CPU patches replaced (run in a fresh process:
    this one keeps its patches)."""
    code = (
        "import torch\n"
        "from megatron.core.pipeline_parallel import schedules\n"
        "from megatron.core.tensor_parallel import random as mp_random\n"
        "from mone_train.parallel import cpu_compat\n"
        "before = (torch.cuda.current_device, torch.cuda.Stream, schedules.torch,\n"
        "          mp_random.CudaRNGStatesTracker)\n"
        "assert cpu_compat.apply(device='cuda') <= cpu_compat.ANY_DEVICE\n"  # TE's absence only
        "assert cpu_compat.apply(device='cpu') == frozenset(cpu_compat.PATCHES)\n"
        "assert torch.cuda.current_device() == 'cpu'\n"
        "cpu_compat.restore()\n"
        "after = (torch.cuda.current_device, torch.cuda.Stream, schedules.torch,\n"
        "         mp_random.CudaRNGStatesTracker)\n"
        "assert after == before and not cpu_compat.applied_patches(), after\n"
        "assert type(mp_random.get_cuda_rng_tracker()) is mp_random.CudaRNGStatesTracker\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
