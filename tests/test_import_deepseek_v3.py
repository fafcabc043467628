"""mone-import and mone-export of transformers' DeepseekV3ForCausalLM: multi-head latent
attention (a query latent or none, as in V2-Lite; RoPE pairs side by side or half a part apart),
YaRN, group-limited sigmoid routing with the selection bias, shared and dense layers, the
multi-token prediction layers the release stores after the decoder's, FP8 block-scaled weights;
against transformers' own forward (tiny random models built locally; nothing is downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mone_train.importer.cli import main as import_main
from tests.helpers.hf_models import VOCAB, hf_logits, tokens

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
        "original_max_position_embeddings": 64, "beta_fast": 32.0, "beta_slow": 1.0,
        "mscale": 0.7, "mscale_all_dim": 1.0}  # fmt: skip
V3 = dict(
    vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=4, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
    n_shared_experts=2, num_experts_per_tok=4, n_group=4, topk_group=2,
    routed_scaling_factor=2.5, norm_topk_prob=True, first_k_dense_replace=1, q_lora_rank=48,
    kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
    max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False,
    attention_bias=False, pad_token_id=None, eos_token_id=1, rope_parameters=YARN,
    num_nextn_predict_layers=0,
)  # fmt: skip
# V2-Lite's attention: full-rank queries, plain RoPE; pairs half a RoPE part apart
LITE = dict(q_lora_rank=None, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            rope_interleave=False, n_group=1, topk_group=1)  # fmt: skip
VARIANTS = {"v3": {}, "v2-lite": LITE}


def build_deepseek_v3(seed: int = 0, **overrides):
    """A tiny random DeepseekV3ForCausalLM (fp32, eager, eval), norms and the selection bias
    away from their init so that each must map right."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    config = DeepseekV3Config(**{**V3, **overrides})
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith(("norm.weight", "layernorm.weight", "e_score_correction_bias")):
                tensor.add_(torch.randn_like(tensor) * 0.1)
    return model


def add_mtp_layer(model, folder: Path) -> dict[str, torch.Tensor]:
    """Store one multi-token prediction layer as DeepSeek-V3's release does (layer
    ``num_hidden_layers``: a MoE decoder layer, enorm, hnorm, eh_proj, shared_head, copies of
    the embedding and output layer) and say so in config.json; its tensors."""
    layers = model.config.num_hidden_layers
    donor = build_deepseek_v3(seed=1, num_hidden_layers=layers + 1)
    torch.manual_seed(2)
    hidden = model.config.hidden_size
    mtp = {
        f"model.layers.{layers}.enorm.weight": 1 + 0.1 * torch.randn(hidden),
        f"model.layers.{layers}.hnorm.weight": 1 + 0.1 * torch.randn(hidden),
        f"model.layers.{layers}.eh_proj.weight": 0.02 * torch.randn(hidden, 2 * hidden),
        f"model.layers.{layers}.shared_head.norm.weight": 1 + 0.1 * torch.randn(hidden),
    }
    donor.save_pretrained(folder / "donor")
    for name, tensor in load_file(folder / "donor" / "model.safetensors").items():
        if name.startswith(f"model.layers.{layers}."):
            mtp[name] = tensor
    state = load_file(folder / "model.safetensors")
    mtp[f"model.layers.{layers}.embed_tokens.weight"] = state["model.embed_tokens.weight"].clone()
    mtp[f"model.layers.{layers}.shared_head.head.weight"] = state["lm_head.weight"].clone()
    save_file({**state, **mtp}, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 1}))
    return mtp


def _import(source: Path, out: Path, *extra: str) -> Path:
    assert import_main([str(source), "--out", str(out), *extra]) == 0
    return out


def _our_logits(path: Path, tokens_BS: torch.Tensor) -> torch.Tensor:
    """The main model's logits (megatron's forward computes the MTP loss from labels when it
    has an MTP block: switched off here, the decoder's output is the same)."""
    from mone_train.export.megatron_source import megatron_checkpoint
    from mone_train.model.lm import causal_mask

    batch, length = tokens_BS.shape
    with megatron_checkpoint(path) as loaded, torch.no_grad():
        loaded.model.mtp_process, loaded.model.config.mtp_num_layers = False, None
        positions_BS = torch.arange(length).expand(batch, length)
        return loaded.model(tokens_BS, positions_BS, causal_mask(length, torch.device("cpu")))


def _our_state(path: Path) -> dict[str, torch.Tensor]:
    from mone_train.export.megatron_source import read_weights

    return read_weights(path)[1]


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """Each variant: (the transformers model, its saved folder, our import of it)."""
    root = tmp_path_factory.mktemp("deepseek-v3")
    out = {}
    for name, overrides in VARIANTS.items():
        model = build_deepseek_v3(**overrides)
        source = root / f"{name}-hf"
        model.save_pretrained(source)
        mtp = add_mtp_layer(model, source) if name == "v3" else {}
        out[name] = (model, source, _import(source, root / f"{name}-ours"), mtp)
    return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_imported_deepseek_v3_reproduces_transformers_logits(imported, variant):
    """fp32, 1e-4: MLA with a query latent and YaRN (mscale != mscale_all_dim), or V2-Lite's
    full-rank queries with plain RoPE stored half a part apart (rope_interleave=false); value
    heads narrower than the keys; 4 groups of 2 experts, 2 of them chosen; two shared experts'
    width; a dense first layer."""
    model, source, ours, _ = imported[variant]
    marker = json.loads((ours / "COMPLETE.json").read_text())
    m = marker["config"]["model"]
    assert m["family"] == "deepseek_v3" and m["multi_latent_attention"]
    assert (m["router_num_groups"], m["router_group_topk"]) == (
        (4, 2) if variant == "v3" else (None, None)
    )
    assert m["shared_expert_ffn_hidden_size"] == 64 and m["first_dense_layers"] == 1
    t = tokens()
    torch.testing.assert_close(_our_logits(ours, t), hf_logits(model, t), rtol=0, atol=1e-4)


def test_the_multi_token_prediction_layer_is_imported_into_megatrons_mtp_block(imported):
    """The release's layer ``num_hidden_layers`` (which transformers' model does not read)
    becomes megatron's MTP layer: its norms, projection and transformer layer, tensor for
    tensor."""
    _, _, ours, mtp = imported["v3"]
    assert (
        json.loads((ours / "COMPLETE.json").read_text())["config"]["model"]["mtp_num_layers"] == 1
    )
    state = _our_state(ours)
    layer, block = "model.layers.3.", "mtp.layers.0."
    pairs = {
        "enorm.weight": "enorm.weight", "eh_proj.weight": "eh_proj.weight",
        "shared_head.norm.weight": "final_layernorm.weight",
        "self_attn.kv_b_proj.weight": "transformer_layer.self_attention.linear_kv_up_proj.weight",
        "mlp.gate.e_score_correction_bias": "transformer_layer.mlp.router.expert_bias",
        "mlp.experts.5.down_proj.weight":
            "transformer_layer.mlp.experts.local_experts.5.linear_fc2.weight",
        "mlp.shared_experts.down_proj.weight": "transformer_layer.mlp.shared_experts.linear_fc2.weight",
    }  # fmt: skip
    for theirs, name in pairs.items():
        assert torch.equal(state[f"{block}{name}"], mtp[f"{layer}{theirs}"]), name
    without = imported["v2-lite"][2]
    assert not any(name.startswith("mtp.") for name in _our_state(without))


def _export(source: Path, out: Path, *extra: str) -> Path:
    from mone_train.export.cli import main as export_main

    assert export_main([str(source), "--out", str(out), *extra]) == 0
    return out


def test_export_gives_back_deepseek_v3_with_our_logits_and_mtp_only_when_asked(imported, tmp_path):
    """Round trip: the export of the import is DeepseekV3ForCausalLM again, with the source's
    tensors and our logits (1e-4); the MTP layer is left out unless --with-mtp, which writes
    it back as the release stores it."""
    from transformers import AutoModelForCausalLM

    model, source, ours, mtp = imported["v3"]
    out = _export(ours, tmp_path / "plain")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["DeepseekV3ForCausalLM"]
    assert (
        config["num_nextn_predict_layers"] == 0 and config["rope_parameters"]["rope_type"] == "yarn"
    )
    assert not any(
        name.startswith("model.layers.3.") for name in load_file(out / "model.safetensors")
    )
    back = AutoModelForCausalLM.from_pretrained(out).eval()
    original = model.state_dict()
    assert back.state_dict().keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(back.state_dict()[name], tensor), name
    t = tokens()
    torch.testing.assert_close(hf_logits(back, t), _our_logits(ours, t), rtol=0, atol=1e-4)

    with_mtp = _export(ours, tmp_path / "with-mtp", "--with-mtp")
    assert json.loads((with_mtp / "config.json").read_text())["num_nextn_predict_layers"] == 1
    written = load_file(with_mtp / "model.safetensors")
    assert {name for name in written if name.startswith("model.layers.3.")} == set(mtp)
    for name, tensor in mtp.items():
        assert torch.equal(written[name], tensor), name


def test_the_import_mone_fies_like_any_other_family(imported, megatron_single):
    """`mone-train --config-dir DIR arch=imported moe.neuron_keep_ratio=...` (Hydra's search
    path): MoNE by default; at rho = 1 the imported weights give transformers' logits, at 0.5
    each expert keeps half its neurons and the logits move."""
    from mone_train.components.checkpoint import load_initial_weights, model_signature
    from mone_train.compose import compose_config
    from mone_train.model.builder import build_gpt_model
    from mone_train.model.lm import causal_mask

    model, _, ours, _ = imported["v3"]
    t = tokens()
    batch, length = t.shape
    logits = {}
    for ratio in (1.0, 0.5):
        cfg = compose_config([f"hydra.searchpath=[file://{ours}]", "arch=imported",
                              f"moe.neuron_keep_ratio={ratio}"])  # fmt: skip
        assert cfg.moe.flavour == "mone" and cfg.model.family == "deepseek_v3"
        torch.manual_seed(0)
        ours_model = build_gpt_model(cfg, VOCAB).eval()
        load_initial_weights(str(ours), ours_model, model_signature(cfg, VOCAB))
        ours_model.mtp_process, ours_model.config.mtp_num_layers = False, None
        with torch.no_grad():
            positions = torch.arange(length).expand(batch, length)
            logits[ratio] = ours_model(t, positions, causal_mask(length, torch.device("cpu")))
    torch.testing.assert_close(logits[1.0], hf_logits(model, t), rtol=0, atol=1e-4)
    assert torch.isfinite(logits[0.5]).all()
    assert (logits[0.5] - logits[1.0]).abs().max() > 1e-2


# ------------------------------------------------------------------ FP8 and bad input

BLOCK = [32, 24]  # tiny blocks, some of them cut by the edge (64 = 2 x 24 + 16)


def _quantise_fp8(source: Path, folder: Path) -> dict[str, torch.Tensor]:
    """``source`` as DeepSeek-V3's release stores it: every projection in float8_e4m3fn with a
    ``weight_scale_inv`` per BLOCK block; the dequantised weights (what the import must read)."""
    import shutil

    shutil.copytree(source, folder)
    state = load_file(folder / "model.safetensors")
    stored, dequantised = {}, {}
    for name, weight in state.items():
        if not name.endswith("proj.weight"):
            stored[name] = weight
            continue
        rows, cols = weight.shape
        blocks = (-(-rows // BLOCK[0]), -(-cols // BLOCK[1]))
        padded = torch.zeros(blocks[0] * BLOCK[0], blocks[1] * BLOCK[1])
        padded[:rows, :cols] = weight
        amax = padded.view(blocks[0], BLOCK[0], blocks[1], BLOCK[1]).abs().amax(dim=(1, 3))
        scale = amax.clamp(min=1e-12) / torch.finfo(torch.float8_e4m3fn).max
        expanded = torch.kron(scale, torch.ones(*BLOCK))[:rows, :cols]
        stored[name] = (weight / expanded).to(torch.float8_e4m3fn)
        stored[f"{name}_scale_inv"] = scale
        dequantised[name] = stored[name].float() * expanded
    save_file(stored, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": BLOCK,
    }
    (folder / "config.json").write_text(json.dumps(config))  # fmt: skip
    return dequantised


def test_fp8_block_scaled_weights_are_dequantised_block_by_block(imported, tmp_path):
    """A release-style FP8 checkpoint (weights in float8_e4m3fn, one weight_scale_inv per
    block, edge blocks cut short) imports as its dequantised weights: our logits equal
    transformers' with those weights loaded, the MTP layer's weights dequantised too."""
    model, source, _, _ = imported["v3"]
    dequantised = _quantise_fp8(source, tmp_path / "fp8")
    ours = _import(tmp_path / "fp8", tmp_path / "ours", "--dtype", "float32")
    plain = _with_config(source, tmp_path / "dequantised")  # the same weights, stored in fp32
    state = load_file(plain / "model.safetensors")
    save_file({**state, **dequantised}, plain / "model.safetensors", metadata={"format": "pt"})
    reference = _load_hf(plain)
    t = tokens()
    torch.testing.assert_close(_our_logits(ours, t), hf_logits(reference, t), rtol=0, atol=1e-4)
    name = "model.layers.1.self_attn.kv_b_proj.weight"
    assert not torch.equal(reference.state_dict()[name], model.state_dict()[name])
    assert torch.equal(_our_state(ours)["mtp.layers.0.eh_proj.weight"],
                       dequantised["model.layers.3.eh_proj.weight"])  # fmt: skip


def _load_hf(folder: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
    return model.float().eval()


def _error(capsys, *args: str) -> str:
    capsys.readouterr()
    assert import_main(list(args)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mone-import: "), err
    return err[0]


def _with_config(source: Path, folder: Path, **changes) -> Path:
    import shutil

    shutil.copytree(source, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


def test_what_megatron_cannot_reproduce_is_one_line(imported, tmp_path, capsys):
    _, source, _, _ = imported["v2-lite"]
    out = str(tmp_path / "out")
    cases = {
        "gptq": ({"quantization_config": {"quant_method": "gptq", "bits": 4}},
                 "quantised weights (quant_method 'gptq') are not supported"),
        "groups": ({"n_group": 2, "topk_group": 1},
                   "transformers scores a group by its top 2 experts"),
        "norm": ({"norm_topk_prob": False}, "megatron renormalises a sigmoid top-k"),
        "bias": ({"attention_bias": True}, "attention_bias (a bias on the output projection)"),
    }  # fmt: skip
    for name, (changes, message) in cases.items():
        folder = _with_config(source, tmp_path / name, **changes)
        assert message in _error(capsys, str(folder), "--out", out), name
    unscaled = _with_config(source, tmp_path / "unscaled")
    state = load_file(unscaled / "model.safetensors")
    state["model.layers.0.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"].to(
        torch.float8_e4m3fn
    )
    save_file(state, unscaled / "model.safetensors", metadata={"format": "pt"})
    assert "without a 'model.layers.0.mlp.up_proj.weight_scale_inv'" in _error(
        capsys, str(unscaled), "--out", out
    )
    assert not Path(out).exists()


def test_arch_deepseek_v3_exports_as_the_class_unless_mone_keeps_fewer_neurons():
    """A plain-MoE arch=deepseek_v3 model is DeepseekV3ForCausalLM exactly (its tiny recipe:
    8 of 32 experts in 4 of 8 groups, a shared expert, a dense first layer); MoNE with K < F
    is our modeling code, with its latent attention."""
    from mone_train.compose import compose_config
    from mone_train.export.convert import architecture_for

    plain = compose_config(["arch=deepseek_v3", "model=tiny", "moe=moe"])
    assert architecture_for(plain) == "deepseek_v3"
    mone = compose_config(["arch=deepseek_v3", "model=tiny", "moe=mone"])
    assert architecture_for(mone) == "mone"
    gqa = compose_config(["arch=deepseek", "model=tiny", "moe=moe"])
    assert architecture_for(gqa) == "mone"  # no transformers class of its own


# ------------------------------------------------------- MoNE under MLA: our modeling code

# a query latent (V3) or none (V2-Lite); YaRN x 40 with mscale = mscale_all_dim = 1 (the
# recipe's) in one, cos/sin scaled too (mscale 0.7 != mscale_all_dim 1) in the other
MONE_V3 = {
    "q-latent": [],
    "no-q-latent": ["model.q_lora_rank=null", "model.rope_scaling.factor=4.0",
                    "model.rope_scaling.original_max_position_embeddings=16",
                    "model.rope_scaling.mscale=0.7"],
}  # fmt: skip


@pytest.mark.slow  # a 2-step run and an export per variant
@pytest.mark.parametrize("variant", MONE_V3)
def test_mone_under_latent_attention_exports_as_our_code_with_megatrons_logits(
    tmp_path, variant, corpus, capsys
):
    """arch=deepseek_v3 moe=mone (rho = 0.5): MoNEForCausalLM with MLA, the MTP layer left
    out (--with-mtp is one line), logits equal to megatron's main model's (fp32, 1e-4)."""
    from transformers import AutoModelForCausalLM

    from mone_train.export.cli import main as export_main
    from tests.test_export import _tokens, _train

    run = _train(tmp_path / "run", ["arch=deepseek_v3", "moe=mone", "trainer.steps=2",
                                    "trainer.save_interval=2", "trainer.eval_interval=2",
                                    "trainer.log_interval=2", *MONE_V3[variant]])  # fmt: skip
    out = _export(run, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["MoNEForCausalLM"] and config["multi_latent_attention"]
    assert config["q_lora_rank"] == (None if variant == "no-q-latent" else 48)
    assert config["num_kept_neurons"] * 2 == config["moe_intermediate_size"]
    assert not any(".layers.2." in name for name in load_file(out / "model.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    t = _tokens()
    with torch.no_grad():
        logits = model(t).logits
    torch.testing.assert_close(logits, _our_logits(run, t), rtol=0, atol=1e-4)

    capsys.readouterr()
    assert export_main([str(run), "--out", str(tmp_path / "mtp"), "--with-mtp"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no multi-token prediction layers" in err[0], err
