"""Each CPU patch: megatron's code path works with it and fails without it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mone_train.parallel import cpu_compat
from tests.helpers.cpu_probes import PROBES

REPO = Path(__file__).resolve().parent.parent

# The error each patch exists for, as megatron-core / torch raise it on a CPU-only machine.
EXPECTED_FAILURE = {
    "rng_tracker": "Torch not compiled with CUDA enabled",
    "current_device": "Torch not compiled with CUDA enabled",
    "streams": "CUDA",
    "te_names": "te_general_gemm",
    "alltoall_splits": "incompatible function arguments",
    "schedule_tokens": "Torch not compiled with CUDA enabled",
    "mla_te_stubs": "isinstance() arg 2 must be a type",
    "embedding_copy": "Torch not compiled with CUDA enabled",
}

pytestmark = [
    pytest.mark.skipif(torch.cuda.is_available(), reason="the patches apply only without CUDA"),
    pytest.mark.slow,  # subprocess probes: the full tier only (make test)
]


def test_patch_list_matches_probes():
    assert set(cpu_compat.PATCHES) == set(PROBES) == set(EXPECTED_FAILURE)


@pytest.mark.parametrize("patch", cpu_compat.PATCHES)
def test_megatron_path_works_with_the_patch(megatron_single, patch):
    assert patch in cpu_compat.applied_patches()
    PROBES[patch]()


@pytest.mark.parametrize("patch", cpu_compat.PATCHES)
def test_megatron_path_fails_without_the_patch(patch):
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1"}
    result = subprocess.run(
        [sys.executable, "tests/helpers/cpu_probes.py", patch],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=180,
    )
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("FAILED"), f"{patch} is no longer needed? probe printed {last!r}"
    assert EXPECTED_FAILURE[patch] in last


def test_apply_is_idempotent_and_rejects_unknown_names():
    before = cpu_compat.apply()
    assert cpu_compat.apply() == before
    with pytest.raises(ValueError, match="unknown cpu_compat patch"):
        cpu_compat.apply(only=("warp_drive",))


def test_a_cuda_run_without_transformer_engine_gets_only_the_te_patch():
    """On CUDA no CPU patch is installed, but MLA still needs megatron told that TE is absent."""
    import subprocess
    import sys

    code = (
        "import importlib.util; from mone_train.parallel import cpu_compat; "
        "print(sorted(cpu_compat.apply(device='cuda')), "
        "importlib.util.find_spec('transformer_engine') is None)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    patches, te_absent = done.stdout.strip().rsplit(" ", 1)
    assert patches == ("['mla_te_stubs']" if te_absent == "True" else "[]")
