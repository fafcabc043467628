"""Process-wide torch settings: the default number of intra-op threads."""

from __future__ import annotations

import torch

from mone_train.runtime import default_threads


def test_processes_on_one_machine_share_its_cores_on_the_cpu():
    cores = torch.get_num_threads()
    assert default_threads(True, {}) == cores
    assert default_threads(True, {"LOCAL_WORLD_SIZE": "2"}) == max(1, cores // 2)
    assert default_threads(True, {"SLURM_NTASKS_PER_NODE": "2(x3)"}) == max(1, cores // 2)
    assert default_threads(True, {"LOCAL_WORLD_SIZE": str(4 * cores)}) == 1


def test_an_explicit_omp_setting_and_gpu_runs_keep_torchs_default():
    cores = torch.get_num_threads()
    assert default_threads(True, {"LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "7"}) == cores
    assert default_threads(False, {"LOCAL_WORLD_SIZE": "2"}) == cores
