"""mone-analyze: the sparsification study and the activation study, on our checkpoints and on
tiny Hugging Face MoE models built here from configs (nothing is downloaded)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mone_kernels import num_kept_neurons
from mone_train.analysis.cli import main
from mone_train.analysis.data import Batches, TokenSource
from tests.helpers.distributed import TINY_RUN

# Training runs, subprocesses or process groups: the full tier only (make test).
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TRAIN = [*TINY_RUN, "trainer.seq_length=64", "trainer.log_interval=50", "trainer.eval_interval=30"]


def _half_up(ratio: float, num_neurons: int) -> int:
    """round(ratio * F) with halves rounded up, computed independently of mone_kernels."""
    return max(1, int(math.floor(ratio * num_neurons + 0.5)))


def _stream(prefix: str, num_tokens: int) -> np.ndarray:
    """The first ``num_tokens`` tokens of an indexed dataset, documents concatenated."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    parts, have = [], 0
    for i in range(len(dataset)):
        parts.append(np.asarray(dataset[i], dtype=np.int64))
        have += len(parts[-1])
        if have >= num_tokens:
            break
    return np.concatenate(parts)[:num_tokens]


def _windows(stream: np.ndarray, seq_length: int, count: int) -> np.ndarray:
    return np.stack(
        [stream[i * seq_length : i * seq_length + seq_length + 1] for i in range(count)]
    )


def _analyze(*argv) -> int:
    return main([*map(str, argv), "--no-progress"])


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 2000


# ---------------------------------------------------------------------------------------------
# Tiny models of ours, trained once for the module


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
    """A plain-MoE run long enough to have learnt something, and a short MoNE (rho = 0.5) run."""
    from mone_train.compose import compose_config
    from mone_train.trainer import run

    root = tmp_path_factory.mktemp("runs")
    runs = {}
    for flavour, steps in [("moe", 150), ("mone", 20)]:
        overrides = [
            *TRAIN,
            f"moe={flavour}",
            f"trainer.steps={steps}",
            f"trainer.save_interval={steps}",
            f"trainer.eval_interval={steps}",
            f"trainer.run_dir={root / flavour}",
        ]
        run(compose_config(overrides))
        runs[flavour] = (root / flavour, overrides)
    return runs


def test_batches_are_overlapping_windows_bounded_by_max_tokens():
    stream = np.arange(100, dtype=np.int64)
    source = TokenSource("--data", "x", lambda: iter(np.array_split(stream, 3)), len(stream))
    batches = Batches(source, seq_length=10, batch_size=3, max_tokens=50, vocab_size=100)
    got = list(batches)
    assert [b.shape for b in got] == [(3, 11), (2, 11)] and batches.max_batches == 2
    rows = np.concatenate(got)
    assert np.array_equal(rows, _windows(stream, 10, 5))  # every token predicted exactly once
    with pytest.raises(ValueError, match="token id 90 is outside the model.s vocabulary of 80"):
        list(Batches(source, 10, 3, 1000, vocab_size=80))


def test_sparsify_our_moe_checkpoint(trained, corpus, tmp_path, megatron_single):
    run_dir, overrides = trained["moe"]
    out = tmp_path / "out"
    code = _analyze(
        "sparsify", "--model", run_dir, "--data", corpus.valid_prefix, "--seq-length", 64,
        "--batch-size", 8, "--max-tokens", 2048, "--p", "0,0.5,0.9", "--out", out,
    )  # fmt: skip
    assert code == 0
    result = json.loads((out / "sparsify.json").read_text())
    rows = {row["p"]: row for row in result["results"]}
    assert result["num_tokens"] == 2048 and result["data"]["seq_length"] == 64
    assert _is_png(out / "sparsify.png")

    # p = 0 is exactly the model as the trainer loads and runs it.
    from mone_train.components.checkpoint import load_checkpoint, model_signature
    from mone_train.components.optimizer import build_optimizer
    from mone_train.compose import compose_config
    from mone_train.model.builder import build_model
    from mone_train.model.lm import causal_mask

    cfg = compose_config(overrides)
    model, params = build_model(cfg, 258)
    checkpoint = run_dir / "checkpoints" / "step_00000150"
    load_checkpoint(
        checkpoint, model, build_optimizer(cfg.optim, params), model_signature(cfg, 258)
    )
    model.eval()
    windows = torch.from_numpy(_windows(_stream(corpus.valid_prefix, 2049), 64, 32))
    total = 0.0
    with torch.no_grad():
        for batch in windows.split(8):
            positions = torch.arange(64).expand(batch.shape[0], 64)
            per_token = model(
                batch[:, :-1], positions, causal_mask(64, batch.device), labels=batch[:, 1:]
            )
            total += float(per_token.double().sum())
    assert rows[0.0]["loss"] == total / 2048
    assert rows[0.0]["own_computation"] and result["reference"]["loss"] == rows[0.0]["loss"]

    # Pruning 90% of the activated neurons (13 of 128 kept) hurts a trained model; no margin:
    # how much depends on the trained weights, and rounding moves a 2048-token mean loss by
    # orders of magnitude less than such a cut. The kept count is exact.
    assert rows[0.9]["loss"] > rows[0.0]["loss"]
    for p in (0.0, 0.5, 0.9):
        kept = num_kept_neurons(1 - p, 128)
        assert kept == _half_up(1 - p, 128)
        assert rows[p]["num_kept"] == rows[p]["kept_per_row_min"] == rows[p]["kept_per_row_max"]
        assert rows[p]["kept_per_row_min"] == kept
        assert rows[p]["rows"] == 2048 * 2 * 2  # tokens x top-2 x 2 MoE layers
    assert rows[0.9]["perplexity"] == pytest.approx(math.exp(rows[0.9]["loss"]))


def test_our_checkpoint_reads_a_text_file_with_its_own_tokenizer(trained, tmp_path):
    run_dir, _ = trained["moe"]
    source = tmp_path / "held_out.py"
    source.write_text(Path(sys.modules["json"].__file__).read_text())  # Python source, as trained
    out = tmp_path / "out"
    code = _analyze(
        "sparsify", "--model", run_dir, "--text", source, "--max-tokens", 512, "--p", "0",
        "--out", out,
    )  # fmt: skip
    assert code == 0
    result = json.loads((out / "sparsify.json").read_text())
    assert result["data"]["source"] == "text" and result["data"]["seq_length"] == 64
    assert result["num_tokens"] == 512
    # 4.0 is 1.55 nats below uniform bytes (ln 258 = 5.55): over half of the ~2.1 nats that
    # byte frequencies alone gain on this file (byte unigram entropy about 3.35-3.5 nats), so
    # only a model that learnt the byte statistics passes it.
    assert result["results"][0]["loss"] < 4.0 < math.log(258)


def test_mone_checkpoint_p_replaces_the_trained_keep_ratio(trained, corpus):
    from mone_train.analysis.data import indexed_source
    from mone_train.analysis.our_models import OurModel

    run_dir, _ = trained["mone"]
    model = OurModel(run_dir, torch.device("cpu"))
    try:
        assert model.native_num_kept == 64 and model.trained_keep_ratio == 0.5
        batch = next(iter(Batches(indexed_source(corpus.valid_prefix), 64, 4, 256, 258)))
        own, count = model.loss_sum(batch)
        assert count == 256
        mone_own = model.control.reset_tally()  # the module's own forward, at its trained K
        assert mone_own.min_kept == mone_own.max_kept == 64 and mone_own.rows == 256 * 2 * 2
        # The tool's own computation of the experts at K = 64 is the MoNE module's forward.
        model.control.keep_ratio = 0.5
        model.control.recorder = lambda layer, expert, g: None  # forces the tool's path
        ours, _ = model.loss_sum(batch)
        tally = model.control.reset_tally()
        model.control.recorder = None
        assert ours == pytest.approx(own, rel=1e-6, abs=1e-4)
        assert tally.min_kept == tally.max_kept == 64 and tally.rows == 256 * 2 * 2
        model.control.keep_ratio = 1.0  # p = 0: every neuron, which the MoNE model never used
        dense, _ = model.loss_sum(batch)
        assert model.control.reset_tally().min_kept == 128
        assert dense != own
        model.control.keep_ratio = None
    finally:
        model.close()


def test_activations_our_checkpoint(trained, corpus, tmp_path):
    run_dir, _ = trained["moe"]
    out = tmp_path / "act"
    code = _analyze(
        "activations", "--model", run_dir / "checkpoints" / "step_00000150",
        "--data", corpus.valid_prefix, "--seq-length", 64, "--max-tokens", 1024,
        "--heatmap-expert", "1:2", "--heatmap-tokens", 40, "--thresholds", "0.1,0.01,1", "--out", out,
    )  # fmt: skip
    assert code == 0
    result = json.loads((out / "activations.json").read_text())
    for name in ("hist", "cdf", "heatmap", "thresholds"):
        assert _is_png(out / f"activations_{name}.png")
    overall = result["overall"]
    assert result["thresholds"] == [0.01, 0.1, 1.0]
    assert overall["count"] == 1024 * 2 * 2 * 128  # tokens x top-2 x layers x neurons
    assert sum(overall["histogram"]) == overall["count"]
    assert sum(e["count"] for e in result["per_expert"]) == overall["count"]
    fractions = [overall["fraction_under"][str(t)] for t in result["thresholds"]]
    assert 0 < fractions[0] < fractions[1] < fractions[2] <= 1
    cdf = np.asarray(overall["cdf"])
    assert np.all(np.diff(cdf) >= 0) and cdf[-1] <= 1
    # The CDF at a bin edge and the exact count under a threshold on that edge agree.
    edge = int(np.argmin(np.abs(np.asarray(result["bins"]["edges"]) - 0.1)))
    assert cdf[edge] == pytest.approx(overall["fraction_under"]["0.1"], abs=1e-12)
    routed = next(e["rows"] for e in result["per_expert"] if (e["layer"], e["expert"]) == (1, 2))
    assert result["heatmap"] == {
        "layer": 1,
        "expert": 2,
        "rows": min(40, routed),
        "num_neurons": 128,
    }


# ---------------------------------------------------------------------------------------------
# Tiny Hugging Face MoE models built from configs


def _hf_model(family: str, folder: Path, vocab_size: int = 258):
    from transformers import (
        MixtralConfig,
        MixtralForCausalLM,
        OlmoeConfig,
        OlmoeForCausalLM,
        Qwen2MoeConfig,
        Qwen2MoeForCausalLM,
    )

    common = {
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 128,
        "initializer_range": 0.2,  # larger than real models' 0.02, so pruning shows in the loss
    }
    config, cls = {
        "mixtral": (
            lambda: MixtralConfig(
                intermediate_size=24, num_key_value_heads=2, num_local_experts=4,
                num_experts_per_tok=2, **common,
            ),
            MixtralForCausalLM,
        ),
        "qwen2_moe": (
            lambda: Qwen2MoeConfig(
                intermediate_size=48, moe_intermediate_size=24, shared_expert_intermediate_size=32,
                num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1,
                **common,
            ),
            Qwen2MoeForCausalLM,
        ),
        "olmoe": (
            lambda: OlmoeConfig(
                intermediate_size=24, num_key_value_heads=4, num_experts=4, num_experts_per_tok=2,
                **common,
            ),
            OlmoeForCausalLM,
        ),
    }[family]  # fmt: skip
    torch.manual_seed(0)
    model = cls(config())
    model.save_pretrained(folder)
    return cls


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "olmoe"])
def test_sparsify_hf_moe_matches_the_models_own_loss(family, corpus, tmp_path):
    folder = tmp_path / family
    cls = _hf_model(family, folder)
    out = tmp_path / "out"
    code = _analyze(
        "sparsify", "--model", folder, "--data", corpus.valid_prefix, "--seq-length", 32,
        "--batch-size", 4, "--max-tokens", 128, "--p", "0,0.5", "--out", out,
    )  # fmt: skip
    assert code == 0
    result = json.loads((out / "sparsify.json").read_text())
    rows = {row["p"]: row for row in result["results"]}
    assert result["model"]["class"] == cls.__name__ and result["model"]["moe_layers"] == [0, 1]
    assert result["model"]["shared_experts"] == ("not pruned" if family == "qwen2_moe" else None)

    # The model's own forward and loss (whatever experts implementation transformers picks).
    own = cls.from_pretrained(folder, local_files_only=True).eval()
    windows = torch.from_numpy(_windows(_stream(corpus.valid_prefix, 129), 32, 4))
    with torch.no_grad():
        loss = float(own(input_ids=windows, labels=windows).loss)
    assert rows[0.0]["loss"] == pytest.approx(loss, rel=1e-6)

    # The experts were hooked: every routed row kept exactly round(F / 2) neurons at p = 0.5.
    assert rows[0.5]["num_kept"] == rows[0.5]["kept_per_row_min"] == rows[0.5]["kept_per_row_max"]
    assert rows[0.5]["num_kept"] == _half_up(0.5, 24) == 12
    assert rows[0.5]["rows"] == rows[0.0]["rows"] == 128 * 2 * 2
    assert rows[0.0]["kept_per_row_min"] == 24
    assert abs(rows[0.5]["loss"] - rows[0.0]["loss"]) > 1e-4


def test_hf_text_file_uses_the_models_own_tokenizer(corpus, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = (Path(sys.modules["json"].__file__).read_text()) * 3
    source = tmp_path / "held_out.txt"
    source.write_text(text)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    folder = tmp_path / "qwen"
    cls = _hf_model("qwen2_moe", folder, vocab_size=tok.get_vocab_size())
    tokenizer.save_pretrained(folder)

    out = tmp_path / "out"
    code = _analyze(
        "activations", "--model", folder, "--text", source, "--seq-length", 32, "--max-tokens", 256,
        "--layers", "1", "--experts", "0,3", "--out", out,
    )  # fmt: skip
    assert code == 0
    result = json.loads((out / "activations.json").read_text())
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"])
    windows = torch.from_numpy(_windows(ids, 32, 8))
    own = cls.from_pretrained(folder, local_files_only=True).eval()
    with torch.no_grad():
        loss = float(own(input_ids=windows, labels=windows).loss)
    assert result["num_tokens"] == 256 and result["loss"] == pytest.approx(loss, rel=1e-6)
    assert result["layers"] == [1] and result["experts"] == [0, 3]
    assert {(e["layer"], e["expert"]) for e in result["per_expert"]} <= {(1, 0), (1, 3)}
    assert result["heatmap"]["layer"] == 1 and result["heatmap"]["expert"] == 0
    assert result["overall"]["count"] == sum(e["rows"] for e in result["per_expert"]) * 24
    assert _is_png(out / "activations_heatmap.png")


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit code 2, nothing written


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("mone-analyze: ")
    return err[0]


def test_a_path_that_is_not_a_model(tmp_path, capsys, corpus):
    (tmp_path / "notes.txt").write_text("hello")
    for model in (tmp_path, "mistralai/Mixtral-8x7B-v0.1", tmp_path / "missing"):
        out = tmp_path / "out"
        assert (
            _analyze("sparsify", "--model", model, "--data", corpus.valid_prefix, "--out", out) == 2
        )
        assert "is not a model directory (expected a local Hugging Face model directory" in (
            _error_line(capsys)
        )
        assert not out.exists()


def test_a_model_without_moe_layers(tmp_path, capsys, corpus):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=258, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=4, max_position_embeddings=64,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "dense")
    capsys.readouterr()
    code = _analyze(
        "sparsify", "--model", tmp_path / "dense", "--data", corpus.valid_prefix, "--out", tmp_path
    )
    assert code == 2
    assert "LlamaForCausalLM has no MoE layers" in _error_line(capsys)


@pytest.mark.parametrize("fractions", ["1.0", "-0.1", "0,0.5,1.2", "0.5,abc"])
def test_pruning_fractions_outside_0_1(fractions, tmp_path, capsys, corpus):
    code = _analyze(
        "sparsify", "--model", tmp_path, "--data", corpus.valid_prefix, "--p", fractions,
        "--out", tmp_path / "out",
    )  # fmt: skip
    assert code == 2
    line = _error_line(capsys)
    assert line.startswith("mone-analyze: --p ") and ("[0, 1)" in line or "numbers" in line)


def test_existing_results_are_not_overwritten(tmp_path, capsys, corpus):
    folder = tmp_path / "olmoe"
    _hf_model("olmoe", folder)
    capsys.readouterr()
    out = tmp_path / "out"
    out.mkdir()
    (out / "sparsify.png").write_text("earlier result")
    base = ["sparsify", "--model", folder, "--data", corpus.valid_prefix, "--seq-length", 16,
            "--max-tokens", 16, "--p", "0", "--out", out]  # fmt: skip
    assert _analyze(*base) == 2
    assert "sparsify.png already exists (pass --overwrite" in _error_line(capsys)
    assert (out / "sparsify.png").read_text() == "earlier result"
    assert not (out / "sparsify.json").exists()
    assert _analyze(*base, "--overwrite") == 0
    assert _is_png(out / "sparsify.png")


def test_bad_data_and_layer_choices(tmp_path, capsys, corpus):
    folder = tmp_path / "mixtral"
    _hf_model("mixtral", folder, vocab_size=64)  # smaller than the byte corpus' 258 tokens
    capsys.readouterr()
    cases = [
        (["--data", tmp_path / "nope"], "--data "),
        (["--text", tmp_path / "nope.txt"], "--text "),
        (["--data", corpus.valid_prefix], "outside the model's vocabulary of 64"),
        (["--data", corpus.valid_prefix, "--seq-length", 4096], "--seq-length 4096 is invalid"),
    ]
    for extra, expected in cases:
        code = _analyze("sparsify", "--model", folder, *extra, "--out", tmp_path / "o1")
        assert code == 2 and expected in _error_line(capsys)
    code = _analyze(
        "activations", "--model", folder, "--data", corpus.valid_prefix, "--layers", "5",
        "--out", tmp_path / "o2",
    )  # fmt: skip
    assert code == 2 and "--layers 5 is invalid" in _error_line(capsys)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_console_script_exits_2_with_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mone_train.analysis.cli", "sparsify", "--model", tmp_path / "x",
         "--data", tmp_path / "y"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"mone-analyze: --model {tmp_path / 'x'} is not a model directory (expected a local "
        "Hugging Face model directory (config.json with model_type), a mone-train run directory "
        "(with checkpoints/) or checkpoint folder (with COMPLETE.json); nothing is downloaded)"
    ]
