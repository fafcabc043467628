"""mone-export and mone-generate: exported models reproduce megatron's logits, KV-cached
generation, the exported tokenizer, and the bad-input errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mone_train.export.cli import main as export_main
from mone_train.inference.cli import main as generate_main
from tests.helpers.distributed import TINY_RUN

TRAIN = [*TINY_RUN, "trainer.steps=3", "trainer.save_interval=3", "trainer.eval_interval=3",
         "trainer.eval_iters=1", "trainer.log_interval=3"]  # fmt: skip
# plain MoE, every layer MoE: exported as transformers' Mixtral
MOE = ["moe=moe"]
# MoNE rho = 0.5 with grouped-query attention, a dense layer and tied embeddings: our code
MONE = [
    "moe=mone",
    "model.num_layers=3",
    "model.moe_layer_freq=2",
    "model.num_query_groups=2",
    "model.tie_embeddings=true",
]


def _train(run_dir: Path, extra: list[str]) -> Path:
    from mone_train.compose import compose_config
    from mone_train.trainer import run

    run(compose_config([*TRAIN, *extra, f"trainer.run_dir={run_dir}"]))
    return run_dir


def _tokens(batch: int = 2, length: int = 48) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(7))


def _megatron_logits(path: Path, tokens_BS: torch.Tensor) -> torch.Tensor:
    from mone_train.export.megatron_source import megatron_checkpoint
    from mone_train.model.lm import causal_mask

    batch, length = tokens_BS.shape
    with megatron_checkpoint(path) as loaded, torch.no_grad():
        positions_BS = torch.arange(length).expand(batch, length)
        return loaded.model(tokens_BS, positions_BS, causal_mask(length, torch.device("cpu")))


def _load(out: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()


def _export(source: Path, out: Path, *extra: str) -> Path:
    assert export_main([str(source), "--out", str(out), *extra]) == 0
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus):
    """Tiny trained runs: plain MoE and MoNE at EP = 1, MoNE saved at EP = 2."""
    from tests.helpers.distributed import run_processes

    root = tmp_path_factory.mktemp("export-runs")
    ep2 = root / "mone-ep2"
    ep2_overrides = ["moe=mone", "trainer.expert_parallel_size=2", "trainer.micro_batch_size=4"]
    run_processes(2, [*TRAIN, *ep2_overrides, f"trainer.run_dir={ep2}"])
    return {
        "moe": _train(root / "moe", MOE),
        "mone": _train(root / "mone", MONE),
        "mone-ep2": ep2,
    }


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory):
    root = tmp_path_factory.mktemp("exported")
    return {name: _export(path, root / name) for name, path in runs.items()}


@pytest.mark.slow
def test_plain_moe_exports_as_mixtral_with_megatrons_logits(runs, exported):
    out = exported["moe"]
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"] and "auto_map" not in config
    assert not (out / "modeling_mone.py").exists()
    assert config["rope_parameters"]["rope_theta"] == 10000.0 and config["rms_norm_eps"] == 1e-5
    tokens = _tokens()
    model = _load(out)
    assert type(model).__name__ == "MixtralForCausalLM"
    with torch.no_grad():
        logits = model(tokens).logits
    torch.testing.assert_close(logits, _megatron_logits(runs["moe"], tokens), rtol=0, atol=1e-4)


@pytest.mark.slow
def test_plain_moe_through_our_code_at_keep_ratio_one_matches_too(runs):
    """The architecture used for MoE models with dense layers, which Mixtral cannot express."""
    from mone_train.data.tokenizer import ByteTokenizer
    from mone_train.export.convert import convert_state_dict, hf_config, num_kept
    from mone_train.export.megatron_source import read_weights
    from mone_train.export.remote_code.modeling_mone import MoNEForCausalLM

    loaded, state = read_weights(runs["moe"])
    tokenizer = ByteTokenizer()
    config = hf_config(loaded.cfg, loaded.vocab_size, {"eos": tokenizer.eod}, "mone")
    assert config.num_kept_neurons == num_kept(loaded.cfg) == config.moe_intermediate_size
    model = MoNEForCausalLM(config)
    model.load_state_dict(convert_state_dict(loaded.cfg, state, "mone"), strict=True)
    tokens = _tokens()
    with torch.no_grad():
        logits = model.eval()(tokens).logits
    torch.testing.assert_close(logits, _megatron_logits(runs["moe"], tokens), rtol=0, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mone", "mone-ep2"])
def test_mone_export_matches_megatron_on_every_expert_path(runs, exported, name):
    out = exported[name]
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["MoNEForCausalLM"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_mone.MoNEForCausalLM"
    assert (config["num_kept_neurons"], config["moe_intermediate_size"]) == (64, 128)
    assert config["neuron_keep_ratio"] == 0.5
    provenance = json.loads((out / "mone_export.json").read_text())
    assert provenance["flavour"] == "mone" and provenance["num_kept_neurons"] == 64
    marker = json.loads(Path(provenance["checkpoint"], "COMPLETE.json").read_text())
    assert marker["world_size"] == (2 if name == "mone-ep2" else 1)
    tokens = _tokens()
    expected = _megatron_logits(runs[name], tokens)
    model = _load(out)
    for path in ("auto", "dense", "sparse"):
        model.config.decode_path = path
        with torch.no_grad():
            logits = model(tokens).logits
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4, msg=path)


@pytest.mark.slow
def test_kv_cached_generation_matches_uncached(exported):
    model = _load(exported["mone"])
    prompt = _tokens(1, 12)
    with torch.no_grad():
        full = model(prompt).logits
        first = model(prompt[:, :7], use_cache=True)
        rest = model(prompt[:, 7:], cache=first.cache, use_cache=True)
        torch.testing.assert_close(
            torch.cat([first.logits, rest.logits], dim=1), full, rtol=0, atol=1e-5
        )
        greedy = {}
        for path, use_cache in [("auto", True), ("auto", False), ("sparse", True), ("dense", True)]:
            model.config.decode_path = path
            greedy[path, use_cache] = model.generate(
                prompt, max_new_tokens=24, do_sample=False, use_cache=use_cache
            ).tolist()
    assert len(greedy["auto", True][0]) == 36
    assert all(tokens == greedy["auto", True] for tokens in greedy.values())


@pytest.mark.slow
def test_mone_generate_streams_the_same_text_from_export_and_run_dir(runs, exported, capsys):
    argv = ["--prompt", "def main(", "--max-new-tokens", "16", "--greedy"]
    assert generate_main([str(exported["mone"]), *argv, "--decode", "sparse"]) == 0
    from_export = capsys.readouterr()
    assert generate_main([str(runs["mone"]), *argv, "--decode", "dense"]) == 0
    from_run = capsys.readouterr()
    assert from_export.out == from_run.out
    assert from_export.out.startswith("def main(") and len(from_export.out) > len("def main(")
    assert "tokens/s" in from_export.err and "experts: sparse" in from_export.err
    sampling = ["--prompt", "x", "--temperature", "0.7", "--top-p", "0.9", "--seed", "3"]
    outputs = []
    for _ in range(2):
        assert generate_main([str(exported["mone"]), *sampling, "--max-new-tokens", "20"]) == 0
        outputs.append(capsys.readouterr())
    assert outputs[0].out == outputs[1].out  # the seed fixes the samples
    assert "tokens/s" in outputs[0].err and "experts: auto" in outputs[0].err


@pytest.mark.slow
def test_sparse_decode_needs_a_mone_model(exported, capsys):
    code = generate_main([str(exported["moe"]), "--prompt", "x", "--decode", "sparse"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert err == (
        "mone-generate: --decode sparse needs a MoNE model; this MixtralForCausalLM keeps every "
        "neuron"
    )


def test_exported_byte_tokenizer_encodes_like_ours(tmp_path):
    from transformers import AutoTokenizer

    from mone_train.data.tokenizer import ByteTokenizer
    from mone_train.export.tokenizer_files import load_exported_tokenizer, write_tokenizer_files

    description = write_tokenizer_files(None, tmp_path, 512)
    assert description == {"kind": "byte", "file": "tokenizer.json", "eod": 256, "pad": 257}
    text = "héllo wörld\n\tdef f(x):  return x  # ✓ 😀 \x00\x7f"
    ours = ByteTokenizer().tokenize(text).tolist()
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert hf(text, add_special_tokens=False)["input_ids"] == ours
    assert (hf.eos_token_id, hf.pad_token_id) == (256, 257)
    assert hf.decode(ours) == text
    assert isinstance(load_exported_tokenizer(tmp_path), ByteTokenizer)


def _one_line_error(capsys, main, argv: list[str], prog: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"{prog}: ") and "\n" not in err, err
    return err


def test_bad_export_inputs_end_in_one_line(tmp_path, capsys):
    missing = tmp_path / "missing"
    err = _one_line_error(
        capsys, export_main, [str(missing), "--out", str(tmp_path / "o")], "mone-export"
    )
    assert "no such checkpoint directory" in err
    interrupted = tmp_path / "run" / "checkpoints" / "step_00000004"
    interrupted.mkdir(parents=True)
    (interrupted / "common.pt").write_bytes(b"")
    err = _one_line_error(
        capsys, export_main, [str(interrupted), "--out", str(tmp_path / "o")], "mone-export"
    )
    assert "incomplete (no COMPLETE.json)" in err
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    err = _one_line_error(
        capsys, export_main, [str(interrupted), "--out", str(taken)], "mone-export"
    )
    assert "already exists (pass --overwrite" in err
    err = _one_line_error(
        capsys, export_main, [str(interrupted), "--out", str(taken), "--overwrite"], "mone-export"
    )
    assert "not an earlier export" in err and (taken / "notes.txt").is_file()
    _one_line_error(capsys, export_main, [str(interrupted)], "mone-export")  # --out missing
    assert not (tmp_path / "o").exists()


def test_bad_generate_inputs_end_in_one_line(tmp_path, capsys):
    err = _one_line_error(
        capsys, generate_main, [str(tmp_path / "nope"), "--prompt", "x"], "mone-generate"
    )
    assert "no such file or directory" in err
    err = _one_line_error(
        capsys, generate_main, [str(tmp_path), "--prompt", "x", "--greedy", "--temperature", "1"],
        "mone-generate",
    )  # fmt: skip
    assert "--greedy takes no --temperature" in err
    err = _one_line_error(
        capsys, generate_main, [str(tmp_path), "--prompt", "x", "--top-p", "0"], "mone-generate"
    )
    assert "--top-p 0.0 is invalid" in err
    err = _one_line_error(capsys, generate_main, [str(tmp_path), "--prompt", "x"], "mone-generate")
    assert "incomplete (no COMPLETE.json)" in err  # a folder that is neither export nor run
