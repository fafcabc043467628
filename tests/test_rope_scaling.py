"""Scaled RoPE as released models ship it (Llama 3's, YaRN): imported, upcycled and exported,
against transformers' own forward (tiny random models built locally; nothing is downloaded).

The tiny models' RoPE parameters are chosen so that every branch of each scaling acts on a
16-wide head: Llama 3's kept, smoothed and divided frequencies (low/high frequency factors and
an original context other than megatron's built-in 1, 4, 8192), YaRN's interpolated, ramped and
extrapolated dimensions with its cos/sin factor from the scale, given explicitly, or from
DeepSeek's mscale pair.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from mone_train.importer.cli import main as import_main
from tests.helpers.hf_models import COMMON, CONFIGS, hf_logits, save_hf_model, tokens

THETA = 100000.0
LLAMA3 = {"rope_type": "llama3", "rope_theta": THETA, "factor": 8.0, "low_freq_factor": 1.5,
          "high_freq_factor": 6.0, "original_max_position_embeddings": 64}  # fmt: skip
YARN = {"rope_type": "yarn", "rope_theta": THETA, "factor": 4.0,
        "original_max_position_embeddings": 64}  # fmt: skip
YARN_VARIANTS = {
    "from-scale": YARN,
    "explicit": {**YARN, "attention_factor": 1.3, "beta_fast": 16.0, "beta_slow": 2.0},
    "mscale": {**YARN, "mscale": 1.0, "mscale_all_dim": 0.5},
}


def build_rope_model(model_type: str, rope: dict, seed: int = 0):
    """``tests.helpers.hf_models.build_hf_model`` with ``rope`` as the RoPE parameters."""
    import transformers

    config_name, fields = CONFIGS[model_type]
    config = getattr(transformers, config_name)(**{**COMMON, "rope_parameters": dict(rope)},
                                                **fields)  # fmt: skip
    config._attn_implementation = "eager"
    if hasattr(config, "_experts_implementation"):
        config._experts_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():  # norms away from 1; sharp attention, so positions matter
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.add_(torch.randn_like(param) * 0.1)
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                param.mul_(8.0)
    assert model.config.rope_parameters["rope_type"] == rope["rope_type"]
    return model


def _import(source: Path, out: Path, *extra: str) -> Path:
    assert import_main([str(source), "--out", str(out), *extra]) == 0
    return out


def _our_logits(path: Path, tokens_BS: torch.Tensor) -> torch.Tensor:
    from tests.test_export import _megatron_logits

    return _megatron_logits(path, tokens_BS)


def _long_tokens() -> torch.Tensor:
    """Past the original context (64), where the scalings differ most from plain RoPE."""
    return tokens(batch=2, length=96)


# ------------------------------------------------------------------------------ the model


def test_megatron_rope_frequencies_equal_transformers():
    """Our config -> megatron's embeddings: the same inverse frequencies and cos/sin factor
    as transformers' ROPE_INIT_FUNCTIONS, for each scaling."""
    import transformers
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
        YarnRotaryEmbedding,
        _yarn_get_concentration_factor,
    )
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from mone_train.config import ModelConfig, RopeScalingConfig
    from mone_train.model.rope import set_llama3_frequencies, yarn_config_attributes
    from mone_train.parallel.cpu_compat import apply

    apply()
    for rope in (LLAMA3, *YARN_VARIANTS.values()):
        hf = transformers.LlamaConfig(**{**COMMON, "rope_parameters": dict(rope)},
                                      head_dim=16, intermediate_size=96)  # fmt: skip
        expected, expected_scale = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf)
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        m = ModelConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=256,
                        rotary_base=THETA, rope_scaling=RopeScalingConfig(**scaling))  # fmt: skip
        m.validate()
        if rope["rope_type"] == "llama3":
            emb = RotaryEmbedding(16, 1.0, rotary_base=THETA, rope_scaling=True,
                                  rope_scaling_factor=8.0, use_cpu_initialization=True)  # fmt: skip
            set_llama3_frequencies(emb, m)
            freqs, scale = emb.inv_freq, 1.0
        else:
            a = yarn_config_attributes(m)
            emb = YarnRotaryEmbedding(
                16, rotary_base=THETA, use_cpu_initialization=True,
                scaling_factor=a["yarn_rotary_scaling_factor"],
                original_max_position_embeddings=a["yarn_original_max_position_embeddings"],
                beta_fast=a["yarn_beta_fast"], beta_slow=a["yarn_beta_slow"],
                mscale=a["yarn_mscale"], mscale_all_dim=a["yarn_mscale_all_dim"],
            )  # fmt: skip
            freqs = emb(2)[0][1, 0, 0, :8]  # position 1: the frequencies themselves
            scale = _yarn_get_concentration_factor(
                a["yarn_rotary_scaling_factor"], a["yarn_mscale"], a["yarn_mscale_all_dim"]
            )
        torch.testing.assert_close(freqs, expected, rtol=1e-6, atol=0)
        assert scale == pytest.approx(expected_scale, rel=1e-12), rope
        assert not torch.allclose(expected, 1.0 / THETA ** (torch.arange(0, 16, 2) / 16))


def test_an_unknown_rope_type_in_our_config_is_one_line_naming_the_valid_ones():
    from mone_train.config import ModelConfig, RopeScalingConfig
    from mone_train.errors import ConfigError

    m = ModelConfig(rope_scaling=RopeScalingConfig(rope_type="longrope"))
    with pytest.raises(ConfigError, match=r"model.rope_scaling.rope_type='longrope' is invalid: "
                       r"expected one of \['default', 'llama3', 'yarn'\]"):  # fmt: skip
        m.validate()


# ------------------------------------------------------------------------------ import


@pytest.fixture(scope="module")
def yarn_moe(tmp_path_factory):
    """A Qwen3-MoE with YaRN (each cos/sin factor rule): (the model, its import)."""
    root = tmp_path_factory.mktemp("yarn-moe")
    out = {}
    for name, rope in YARN_VARIANTS.items():
        model = build_rope_model("qwen3_moe", rope)
        source = save_hf_model(model, root / f"{name}-hf")
        out[name] = (model, _import(source, root / f"{name}-ours"))
    return out


@pytest.mark.slow  # three imports
@pytest.mark.parametrize("variant", list(YARN_VARIANTS))
def test_an_imported_yarn_moe_reproduces_transformers_logits(yarn_moe, variant):
    model, ours = yarn_moe[variant]
    m = json.loads((ours / "COMPLETE.json").read_text())["config"]["model"]
    assert m["rope_scaling"]["rope_type"] == "yarn" and m["rope_scaling"]["factor"] == 4.0
    t = _long_tokens()
    torch.testing.assert_close(_our_logits(ours, t), hf_logits(model, t), rtol=0, atol=1e-4)


@pytest.mark.parametrize("model_type, rope", [("llama", LLAMA3), ("qwen3", YARN)])
def test_an_upcycled_dense_model_with_scaled_rope_reproduces_it_at_step_zero(
    tmp_path, model_type, rope
):
    """The README's upcycling of a Llama 3.x (rope_type llama3), and a long-context Qwen3
    (YaRN): the MoE's logits at step 0 are the dense model's (fp32, 1e-4)."""
    model = build_rope_model(model_type, rope)
    source = save_hf_model(model, tmp_path / "dense")
    ours = _import(source, tmp_path / "moe", "--upcycle-experts", "4", "--upcycle-topk", "2")
    m = json.loads((ours / "COMPLETE.json").read_text())["config"]["model"]
    assert m["rope_scaling"]["rope_type"] == rope["rope_type"]
    t = _long_tokens()
    torch.testing.assert_close(_our_logits(ours, t), hf_logits(model, t), rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    "rope, message",
    [
        ({"rope_type": "linear", "factor": 2.0},
         "rope_type 'linear' is not supported (supported: default, llama3, yarn)"),
        ({"rope_type": "default", "partial_rotary_factor": 0.5},
         "partial_rotary_factor 0.5 is not supported (RoPE over the whole head only)"),
    ],
)  # fmt: skip
def test_an_unsupported_rope_is_one_line_and_nothing_is_written(tmp_path, capsys, rope, message):
    model = build_rope_model("llama", {**rope, "rope_theta": THETA})
    source = save_hf_model(model, tmp_path / "dense")
    out = tmp_path / "out"
    capsys.readouterr()
    code = import_main([str(source), "--out", str(out), "--upcycle-experts", "4",
                        "--upcycle-topk", "2"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("mone-import: ") and message in err[0]
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["dense"]


# ------------------------------------------------------------------------------ export


def _as_mone(imported: Path, out: Path) -> Path:
    """The imported weights as a MoNE checkpoint (rho = 0.5): a plain MoE's tensors are a MoNE
    model's (no neuron bias with the default balancing), only the config's moe section differs."""
    shutil.copytree(imported, out)
    marker = json.loads((out / "COMPLETE.json").read_text())
    marker["config"]["moe"].update(flavour="mone", neuron_keep_ratio=0.5)
    (out / "COMPLETE.json").write_text(json.dumps(marker, indent=2))
    return out


@pytest.mark.slow  # two exports
def test_a_yarn_model_exports_with_its_rope_natively_and_through_our_code(yarn_moe, tmp_path):
    """Native class (Qwen3-MoE) and our modeling code (a MoNE model): the exported config says
    YaRN with its parameters, and transformers' forward equals megatron's (fp32, 1e-4)."""
    from tests.test_export import _export, _load

    model, ours = yarn_moe["explicit"]
    t = _long_tokens()
    native = _export(ours, tmp_path / "native")
    config = json.loads((native / "config.json").read_text())
    assert config["architectures"] == ["Qwen3MoeForCausalLM"]
    rope = config["rope_parameters"]
    assert {k: rope[k] for k in YARN_VARIANTS["explicit"]} == YARN_VARIANTS["explicit"]
    torch.testing.assert_close(hf_logits(_load(native), t), hf_logits(model, t), rtol=0,
                               atol=1e-4)  # fmt: skip
    mone = _as_mone(ours, tmp_path / "mone-run")
    ours_mone = _export(mone, tmp_path / "mone")
    config = json.loads((ours_mone / "config.json").read_text())
    assert config["model_type"] == "mone" and config["rope_parameters"]["rope_type"] == "yarn"
    expected = _our_logits(mone, t)
    assert not torch.allclose(expected, hf_logits(model, t), atol=1e-3)  # rho = 0.5 acts
    torch.testing.assert_close(hf_logits(_load(ours_mone), t), expected, rtol=0, atol=1e-4)


@pytest.mark.slow  # an upcycling and an export
def test_an_upcycled_llama3_exports_with_llama3_rope(tmp_path):
    """Llama 3 upcycled into Mixtral's family exports as Mixtral with rope_type llama3: the
    transformers model's logits are the dense Llama's."""
    from tests.test_export import _export, _load

    model = build_rope_model("llama", LLAMA3)
    source = save_hf_model(model, tmp_path / "dense")
    ours = _import(source, tmp_path / "moe", "--upcycle-experts", "4", "--upcycle-topk", "2")
    out = _export(ours, tmp_path / "exported")
    config = json.loads((out / "config.json").read_text())
    assert config["rope_parameters"] == LLAMA3
    t = _long_tokens()
    torch.testing.assert_close(hf_logits(_load(out), t), hf_logits(model, t), rtol=0, atol=1e-4)
