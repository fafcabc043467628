"""The sparse decode path of a MoNE expert against the dense masked computation."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mone_kernels import sparse_decode as sd
from mone_kernels.reference import neuron_topk_mask, neuron_topk_swiglu_reference

REPO = Path(__file__).resolve().parent.parent


def _expert(rows: int, hidden: int, neurons: int, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x_TD = torch.randn(rows, hidden, generator=g)
    gate_up_2FD = torch.randn(2 * neurons, hidden, generator=g) / hidden**0.5
    down_t_FD = torch.randn(neurons, hidden, generator=g) / neurons**0.5
    probs_T = torch.rand(rows, generator=g)
    return x_TD.to(dtype), gate_up_2FD.to(dtype), down_t_FD.to(dtype), probs_T


def _reference(x_TD, gate_up_2FD, down_t_FD, k, probs_T=None):
    """fc1 -> mone_kernels' reference activation -> probabilities -> fc2, in fp32."""
    h_TF, _, _ = neuron_topk_swiglu_reference(x_TD.float() @ gate_up_2FD.float().T, k)
    if probs_T is not None:
        h_TF = h_TF * probs_T[:, None]
    return h_TF @ down_t_FD.float()


SHAPES = [  # (T, D, F, K): one row and several, k = 1, k = F, odd widths
    (1, 16, 64, 1),
    (1, 16, 64, 64),
    (1, 24, 300, 77),
    (1, 64, 256, 128),
    (5, 16, 64, 1),
    (5, 24, 300, 150),
    (7, 32, 96, 96),
    (3, 64, 512, 100),
]


@pytest.mark.parametrize("rows,hidden,neurons,k", SHAPES)
@pytest.mark.parametrize("fused", [True, False])
def test_sparse_equals_dense_masked(rows, hidden, neurons, k, fused, monkeypatch):
    monkeypatch.setattr(sd, "_fused_row_dots", lambda rows_RD: fused)
    x_TD, gate_up_2FD, down_t_FD, probs_T = _expert(rows, hidden, neurons, seed=k)
    expected = _reference(x_TD, gate_up_2FD, down_t_FD, k, probs_T)
    sparse = sd.sparse_expert_forward(x_TD, gate_up_2FD, down_t_FD, k, probs_T)
    dense = sd.dense_masked_expert_forward(x_TD, gate_up_2FD, down_t_FD, k, probs_T)
    torch.testing.assert_close(sparse, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dense, expected, rtol=1e-5, atol=1e-5)
    unweighted = sd.sparse_expert_forward(x_TD, gate_up_2FD, down_t_FD, k)
    torch.testing.assert_close(
        unweighted, _reference(x_TD, gate_up_2FD, down_t_FD, k), rtol=1e-5, atol=1e-5
    )


def test_bf16_weights_stay_close_to_fp32():
    x_TD, gate_up_2FD, down_t_FD, probs_T = _expert(1, 64, 256, seed=3, dtype=torch.bfloat16)
    out = sd.sparse_expert_forward(x_TD, gate_up_2FD, down_t_FD, 128, probs_T)
    assert out.dtype == torch.bfloat16
    expected = _reference(x_TD, gate_up_2FD, down_t_FD, 128, probs_T)
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)


def test_kept_neurons_follow_the_reference_rule_with_ties():
    score_TF = torch.tensor(
        [
            [1.0, 2.0, 2.0, 2.0, 0.0, 2.0],
            [3.0, 3.0, 3.0, 3.0, 3.0, 3.0],
            [0.0, 0.0, 1.0, 0.0, 0.0, 0.0],
            [0.5, 0.1, 0.9, 0.3, 0.7, 0.2],
        ]
    )
    for k in range(1, 7):
        mask_TF = sd.kept_neuron_mask(score_TF, k)
        assert torch.equal(mask_TF, neuron_topk_mask(score_TF, k)), k
        idx_TK = sd.kept_neuron_indices(score_TF, k)
        assert idx_TK.shape == (4, k)
        assert torch.equal(idx_TK, idx_TK.sort(dim=-1).values)  # ascending in every row
        assert torch.equal(torch.zeros_like(mask_TF).scatter_(1, idx_TK, True), mask_TF)
    assert sd.kept_neuron_indices(score_TF, 2)[1].tolist() == [0, 1]  # ties: lower index wins
    random_TF = torch.rand(9, 333, generator=torch.Generator().manual_seed(1))
    assert torch.equal(sd.kept_neuron_mask(random_TF, 100), neuron_topk_mask(random_TF, 100))


def test_auto_takes_the_sparse_path_only_where_it_pays():
    big = (4096, 1024)  # F, D: at the size threshold
    assert sd.use_sparse_path(1, 2048, *big) and sd.SPARSE_MAX_ROWS == 1
    assert sd.use_sparse_path(1, 1, *big)
    assert not sd.use_sparse_path(2, 2048, *big)  # more rows than SPARSE_MAX_ROWS
    assert not sd.use_sparse_path(0, 2048, *big)
    assert not sd.use_sparse_path(1, 2049, *big)  # rho above SPARSE_MAX_KEEP_RATIO
    assert not sd.use_sparse_path(1, 4096, *big)  # K = F: nothing to skip
    assert not sd.use_sparse_path(1, 128, 256, 128)  # too small to pay
    assert sd.use_sparse_path(9, 128, 128, 8, "sparse")
    assert not sd.use_sparse_path(1, 2048, *big, "dense")
    with pytest.raises(ValueError, match="decode path 'fast'"):
        sd.use_sparse_path(1, 64, 128, 8, "fast")


def test_dispatch_and_bad_shapes():
    x_TD, gate_up_2FD, down_t_FD, _ = _expert(1, 16, 64)
    for path in sd.DECODE_PATHS:
        torch.testing.assert_close(
            sd.expert_forward(x_TD, gate_up_2FD, down_t_FD, 10, path=path),
            _reference(x_TD, gate_up_2FD, down_t_FD, 10),
            rtol=1e-5,
            atol=1e-5,
        )
    assert sd.sparse_expert_forward(x_TD[:0], gate_up_2FD, down_t_FD, 10).shape == (0, 16)
    with pytest.raises(ValueError, match="num_kept=65"):
        sd.sparse_expert_forward(x_TD, gate_up_2FD, down_t_FD, 65)
    with pytest.raises(ValueError, match="gate_up must be"):
        sd.sparse_expert_forward(x_TD, gate_up_2FD[:64], down_t_FD, 8)
    with pytest.raises(ValueError, match="x must be"):
        sd.dense_masked_expert_forward(x_TD[:, :8], gate_up_2FD, down_t_FD, 8)


def test_the_kernel_file_imports_torch_only():
    """Exported models carry a copy of it: it must not need this project or megatron."""
    tree = ast.parse(Path(sd.__file__).read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            roots.add((node.module or "").split(".")[0])
    assert roots == {"__future__", "torch"}


@pytest.mark.slow
def test_decode_benchmark_runs(tmp_path):
    cmd = [
        sys.executable, "benchmarks/decode_bench.py", "--shapes", "64x256", "--dtypes", "fp32",
        "--batches", "1", "--ratios", "0.5", "--repeats", "2", "--hot", "--skip-e2e",
        "--out", str(tmp_path),
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (result,) = tmp_path.glob("decode_bench_cpu_*.json")
    rows = json.loads(result.read_text())["expert_mlp"]
    assert [(r["tokens"], r["rho"], r["k"]) for r in rows] == [(1, 0.5, 128)]
    assert rows[0]["dense_ms"] > 0 and rows[0]["sparse_ms"] > 0 and rows[0]["ceiling_t1"] == 1.5
    assert result.with_suffix(".png").stat().st_size > 0
