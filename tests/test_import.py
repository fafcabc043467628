"""mone-import: released MoE models and upcycled dense ones, against transformers' own forward
(tiny random models built locally from the config classes; nothing is downloaded)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mone_train.importer.cli import main as import_main
from tests.helpers.distributed import free_port
from tests.helpers.hf_models import (
    DENSE_TYPES,
    MOE_TYPES,
    build_hf_model,
    hf_logits,
    save_hf_model,
    tokens,
)

REPO = Path(__file__).resolve().parent.parent


def _import(source: Path, out: Path, *extra: str) -> Path:
    assert import_main([str(source), "--out", str(out), *extra]) == 0
    return out


def _our_logits(path: Path, tokens_BS: torch.Tensor) -> torch.Tensor:
    from tests.test_export import _megatron_logits

    return _megatron_logits(path, tokens_BS)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """Each MoE family: (the transformers model, its saved folder, our import of it)."""
    root = tmp_path_factory.mktemp("imports")
    out = {}
    for model_type in MOE_TYPES:
        model = build_hf_model(model_type)
        # Qwen3-MoE saved in shards: the index and every shard are read
        shard = "20KB" if model_type == "qwen3_moe" else None
        source = save_hf_model(model, root / f"{model_type}-hf", max_shard_size=shard)
        out[model_type] = (model, source, _import(source, root / f"{model_type}-ours"))
    return out


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_imported_moe_reproduces_transformers_logits(imported, model_type):
    """fp32, 1e-4: the same products, sums in another order. The tiny models exercise the
    family's every mapping: Mixtral's names, OLMoE's QK-norm over all heads, Qwen2-MoE's gated
    shared expert and q/k/v biases, Qwen3-MoE's per-head QK-norm, head size of its own (24 for
    4 x 16 of hidden) and dense first layer; norms and biases perturbed away from their init."""
    model, source, ours = imported[model_type]
    if model_type == "qwen3_moe":
        assert json.loads((source / "model.safetensors.index.json").read_text())["weight_map"]
    marker = json.loads((ours / "COMPLETE.json").read_text())
    assert marker["weights_only"] and marker["config"]["model"]["family"] == model_type
    t = tokens()
    torch.testing.assert_close(_our_logits(ours, t), hf_logits(model, t), rtol=0, atol=1e-4)


_EP2_LOGITS = """
import sys, torch
from mone_train.parallel.process_groups import init_distributed, shutdown_distributed
from mone_train.components.checkpoint import config_from_marker, load_model_weights, read_marker
from mone_train.model.builder import build_gpt_model
from mone_train.model.lm import causal_mask
from pathlib import Path
path, tokens_file, out = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
marker = read_marker(path)
cfg = config_from_marker(path, marker)
cfg.trainer.expert_parallel_size = 2
info = init_distributed(2)
torch.manual_seed(0)
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
model_parallel_cuda_manual_seed(0)
model = build_gpt_model(cfg, cfg.model.vocab_size)
load_model_weights(path, model)
tokens = torch.load(tokens_file)
b, s = tokens.shape
with torch.no_grad():
    logits = model.eval()(tokens, torch.arange(s).expand(b, s), causal_mask(s, torch.device("cpu")))
if info.rank == 0:
    torch.save(logits, out)
shutdown_distributed()
"""


@pytest.mark.slow  # 2 processes per family
@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_imported_moe_loads_at_expert_parallel_two_with_the_same_logits(
    imported, model_type, tmp_path
):
    model, _, ours = imported[model_type]
    t = tokens()
    torch.save(t, tmp_path / "tokens.pt")
    script = tmp_path / "ep2.py"
    script.write_text(_EP2_LOGITS)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(script), str(ours), str(tmp_path / "tokens.pt"), str(tmp_path / "logits.pt")],
        env={**__import__("os").environ, "MASTER_PORT": str(free_port())},
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    logits = torch.load(tmp_path / "logits.pt")
    torch.testing.assert_close(logits, hf_logits(model, t), rtol=0, atol=1e-4)


@pytest.mark.slow  # an export per family
@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_import_then_export_gives_back_the_same_tensors(imported, model_type, tmp_path):
    """Round trip: the exported folder is the family's own transformers class again, with the
    source's tensors (compared as the loaded models' state dicts: names and values)."""
    from transformers import AutoModelForCausalLM

    from tests.test_export import _export

    model, source, ours = imported[model_type]
    out = _export(ours, tmp_path / "exported")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [type(model).__name__]
    back = AutoModelForCausalLM.from_pretrained(out).state_dict()
    original = model.state_dict()
    assert back.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(back[name], tensor), name


@pytest.mark.parametrize("model_type", DENSE_TYPES)
@pytest.mark.parametrize("experts, topk, granularity", [(4, 2, 1), (8, 4, 2), (6, 3, 3)])
def test_upcycled_moe_reproduces_the_dense_model_at_step_zero(
    tmp_path, model_type, experts, topk, granularity
):
    """Copies (g = 1) or parts (g > 1, fine-grained) of each dense MLP as experts, the router
    taking whole copies, the parts' down projections x g: the dense logits (1e-4)."""
    model = build_hf_model(model_type)
    source = save_hf_model(model, tmp_path / "dense")
    ours = _import(source, tmp_path / "moe", "--upcycle-experts", str(experts),
                   "--upcycle-topk", str(topk), "--granularity", str(granularity))  # fmt: skip
    m = json.loads((ours / "COMPLETE.json").read_text())["config"]["model"]
    assert (m["num_experts"], m["router_topk"]) == (experts, topk)
    assert m["moe_ffn_hidden_size"] == 96 // granularity
    t = tokens()
    torch.testing.assert_close(_our_logits(ours, t), hf_logits(model, t), rtol=0, atol=1e-4)


# --------------------------------------------------------------- training from an import


def _tokenizer(tmp_path: Path, vocab: int) -> Path:
    """A byte-level BPE tokenizer of ``vocab`` tokens trained on a few stdlib files."""
    import json as json_module

    from mone_train.data.cli import tokenizer_main

    text = tmp_path / f"text-{vocab}.txt"
    sources = sorted(Path(json_module.__file__).parent.glob("*.py"))[:4]
    text.write_text("\n".join(source.read_text() for source in sources))
    out = tmp_path / f"tokenizer-{vocab}.json"
    args = ["train", "--input", str(text), "--vocab-size", str(vocab), "--output", str(out)]
    assert tokenizer_main(args) == 0
    return out


@pytest.mark.slow  # an import and a 60-step run from the CLI
def test_an_imported_moe_trains_as_mone_from_the_cli_and_its_loss_falls(tmp_path, corpus):
    """MoNE-fying: a plain MoE imported (rho = 1) continues at rho = 0.5 with its own tokenizer,
    from `mone-train --config-dir DIR arch=imported`, and its loss falls."""
    import shutil

    model = build_hf_model("olmoe")
    source = save_hf_model(model, tmp_path / "hf")
    shutil.copy(_tokenizer(tmp_path, 300), source / "tokenizer.json")
    ours = _import(source, tmp_path / "imported")
    assert (ours / "tokenizer.json").is_file() and (ours / "arch" / "imported.yaml").is_file()
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "mone_train.train", "--config-dir", str(ours), "arch=imported",
         "moe.neuron_keep_ratio=0.5", "trainer=smoke", "trainer.seq_length=64",
         f"trainer.run_dir={run_dir}", "logging.wandb_mode=disabled", "optim.lr=1e-3"],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"initial weights from {ours}" in done.stdout
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in records if "loss" in r]
    assert train[-1] < train[0] - 0.5  # from random weights of a 300-token vocabulary
    saved = json.loads((run_dir / "params.json").read_text())
    assert saved["neuron_keep_ratio"] == 0.5


@pytest.mark.slow
def test_sparsify_gives_the_same_numbers_on_the_import_as_on_the_source(imported, corpus,
                                                                         tmp_path):  # fmt: skip
    from mone_train.analysis.cli import main as analyze_main

    results = {}
    for name, path in (("hf", imported["olmoe"][1]), ("ours", imported["olmoe"][2])):
        out = tmp_path / name
        assert analyze_main(["sparsify", "--model", str(path), "--data", corpus.valid_prefix,
                             "--seq-length", "32", "--max-tokens", "2048", "--p", "0,0.5,0.9",
                             "--out", str(out), "--no-progress"]) == 0  # fmt: skip
        results[name] = json.loads((out / "sparsify.json").read_text())
    assert len(results["hf"]["results"]) == len(results["ours"]["results"]) == 3
    for a, b in zip(results["hf"]["results"], results["ours"]["results"]):
        assert a["p"] == b["p"] and abs(a["loss"] - b["loss"]) < 1e-4, (a, b)


# ------------------------------------------------------------------------------ bad input


def _error(capsys, *args: str) -> str:
    capsys.readouterr()  # what came before (transformers' progress bars when saving)
    assert import_main(list(args)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mone-import: "), err
    return err[0]


def test_bad_imports_end_in_one_line_and_write_nothing(tmp_path, capsys, imported):
    _, source, _ = imported["mixtral"]
    out = tmp_path / "out"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no config.json" in _error(capsys, str(empty), "--out", str(out))
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    (weightless / "config.json").write_text((source / "config.json").read_text())
    assert "no model.safetensors" in _error(capsys, str(weightless), "--out", str(out))
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert "model_type 'gpt2' is not supported" in _error(capsys, str(unknown), "--out", str(out))
    v2 = tmp_path / "deepseek-v2"  # DeepSeek-V3's class imports (test_import_deepseek_v3.py)
    v2.mkdir()
    (v2 / "config.json").write_text(json.dumps({"model_type": "deepseek_v2"}))
    assert "model_type 'deepseek_v2' is not supported" in _error(capsys, str(v2), "--out", str(out))
    assert not out.exists()


def test_a_missing_shard_is_named(tmp_path, capsys, imported):
    import shutil

    _, source, _ = imported["qwen3_moe"]
    broken = tmp_path / "broken"
    shutil.copytree(source, broken)
    shard = sorted(broken.glob("model-*.safetensors"))[-1]
    shard.unlink()
    assert f"shard {shard.name} listed in model.safetensors.index.json is missing" in _error(
        capsys, str(broken), "--out", str(tmp_path / "out")
    )


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path, capsys, imported):
    import shutil

    _, source, _ = imported["mixtral"]
    mismatched = tmp_path / "mismatched"
    shutil.copytree(source, mismatched)
    shutil.copy(_tokenizer(tmp_path, 400), mismatched / "tokenizer.json")  # model: 300
    message = _error(capsys, str(mismatched), "--out", str(tmp_path / "out"))
    assert "the tokenizer has 400 tokens but the model's vocabulary" in message


def test_an_existing_out_is_refused_unless_overwrite_and_nothing_is_lost(tmp_path, capsys,
                                                                         imported):  # fmt: skip
    _, source, _ = imported["mixtral"]
    out = tmp_path / "taken"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert "already exists (pass --overwrite" in _error(capsys, str(source), "--out", str(out))
    assert "not an earlier import" in _error(capsys, str(source), "--out", str(out), "--overwrite")
    assert (out / "precious.txt").read_text() == "keep me"
    first = _import(source, tmp_path / "again")
    assert _import(source, first, "--overwrite") == first  # an earlier import is replaced


def test_dense_models_need_upcycling_and_its_numbers_must_fit(tmp_path, capsys):
    source = save_hf_model(build_hf_model("llama"), tmp_path / "llama")
    out = str(tmp_path / "out")
    assert "upcycle it with --upcycle-experts" in _error(capsys, str(source), "--out", out)
    assert "must be a multiple of --granularity" in _error(
        capsys, str(source), "--out", out, "--upcycle-experts", "6", "--upcycle-topk", "2",
        "--granularity", "4")  # fmt: skip
    assert "do not split into that many" in _error(
        capsys, str(source), "--out", out, "--upcycle-experts", "10", "--upcycle-topk", "5",
        "--granularity", "5")  # fmt: skip


@pytest.mark.slow  # a training run, an export and an import
def test_a_one_expert_moe_of_ours_upcycles_like_a_dense_model(tmp_path):
    """A mone-train MoE of one expert is a dense model (exported as a one-expert Mixtral):
    upcycled into 4 experts of top-2 it keeps its logits."""
    from tests.test_export import _export, _train

    one = ["moe=moe", "model.num_experts=1", "model.router_topk=1", "model.router_pre_softmax=true"]
    run = _train(tmp_path / "dense", one)
    exported = _export(run, tmp_path / "hf")
    ours = _import(exported, tmp_path / "moe", "--upcycle-experts", "4", "--upcycle-topk", "2")
    from tests.test_export import _megatron_logits, _tokens

    t = _tokens()  # bytes: the run's vocabulary
    torch.testing.assert_close(_our_logits(ours, t), _megatron_logits(run, t), rtol=0, atol=1e-4)
