"""``arch=deepseek_v3``: multi-head latent attention (megatron-core's MLASelfAttention, YaRN
RoPE) and multi-token prediction (its MTP block) with MoNE experts: the attention against
transformers' DeepseekV3Attention, MoNE at rho = 1 against megatron's own experts (MTP layer
included), the planner's counts against the built model, training from the CLI (both losses
fall), tensor and expert parallelism against one process, exact resume, bad input."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mone_train.compose import compose_config
from mone_train.errors import ConfigError
from tests.helpers.distributed import losses, metrics, train
from tests.helpers.gpt_parity import VOCAB, loss_and_grads, meta_parameter_count, tiny_gpt

REPO = Path(__file__).resolve().parent.parent
ARCH = "arch=deepseek_v3"


@pytest.mark.parametrize("size", ["tiny", "3b"])
def test_mla_is_sized_from_the_models_width_and_heads(size):
    m = compose_config([ARCH, f"model={size}"]).model
    head = m.hidden_size // m.num_attention_heads
    assert m.multi_latent_attention and m.num_query_groups is None
    assert (m.qk_head_dim, m.qk_pos_emb_head_dim, m.v_head_dim) == (head, head // 2, head)
    assert (m.kv_lora_rank, m.q_lora_rank) == (m.hidden_size // 4, 3 * m.hidden_size // 4)
    assert m.rope_scaling.rope_type == "yarn" and m.rope_scaling.factor == 40.0
    assert compose_config(["arch=deepseek", f"model={size}"]).model.multi_latent_attention is False


def test_recipe_reaches_megatrons_mla_config(megatron_single):
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    from mone_train.model.builder import transformer_config

    config = transformer_config(compose_config([ARCH, "model=tiny"]))
    assert isinstance(config, MLATransformerConfig) and config.multi_latent_attention
    assert (config.q_lora_rank, config.kv_lora_rank) == (48, 16)
    assert (config.qk_head_dim, config.qk_pos_emb_head_dim, config.v_head_dim) == (16, 8, 16)
    assert config.qk_layernorm  # the latent norms
    assert (config.rope_type, config.rotary_scaling_factor) == ("yarn", 40.0)
    assert (config.mscale, config.mscale_all_dim) == (1.0, 1.0)
    assert (config.mtp_num_layers, config.mtp_loss_scaling_factor) == (1, 0.1)
    assert not config.apply_rope_fusion  # megatron's fused MLA RoPE is a CUDA kernel
    assert config.moe_router_score_function == "sigmoid" and config.moe_layer_freq == [0, 1]


# ------------------------------------------------------ MLA against transformers' DeepSeek-V3

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.7, "mscale_all_dim": 1.0}  # fmt: skip


def _hf_attention(m, rope: dict):
    """transformers' DeepseekV3Attention and rotary embedding of our ``model`` settings."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf

    config = DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=m.hidden_size, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_attention_heads, q_lora_rank=m.q_lora_rank,
        kv_lora_rank=m.kv_lora_rank, qk_nope_head_dim=m.qk_head_dim,
        qk_rope_head_dim=m.qk_pos_emb_head_dim, v_head_dim=m.v_head_dim,
        max_position_embeddings=m.max_position_embeddings, rms_norm_eps=m.norm_epsilon,
        rope_interleave=True, attention_bias=False,
        rope_parameters={**rope, "rope_theta": m.rotary_base},
    )  # fmt: skip
    config._attn_implementation = "eager"
    return hf.DeepseekV3Attention(config, 0).eval(), hf.DeepseekV3RotaryEmbedding(config)


HF_NAMES = {"linear_q_down_proj": "q_a_proj", "linear_q_up_proj": "q_b_proj",
            "linear_q_proj": "q_proj", "q_layernorm": "q_a_layernorm",
            "linear_kv_down_proj": "kv_a_proj_with_mqa", "kv_layernorm": "kv_a_layernorm",
            "linear_kv_up_proj": "kv_b_proj", "linear_proj": "o_proj"}  # fmt: skip


@pytest.mark.parametrize(
    "overrides,rope",
    [([], YARN), pytest.param(["model.q_lora_rank=null", "model.rope_scaling.rope_type=default"],
                              {"rope_type": "default"}, marks=pytest.mark.slow)],
    ids=["v3-yarn", "v2-lite-rope"],
)  # fmt: skip
def test_mla_layer_equals_transformers_deepseek_v3_attention(megatron_single, overrides, rope):
    """One attention block: megatron's MLA with our SDPA core and RMSNorm, weights copied into
    transformers' DeepseekV3Attention (interleaved RoPE, YaRN with mscale != mscale_all_dim,
    DeepSeek's softmax scale), the same output on a causal sequence (fp32, 1e-5)."""
    from mone_train.model.lm import causal_mask

    yarn = [f"model.rope_scaling.{k}={v}" for k, v in YARN.items()]
    cfg_overrides = [ARCH, *yarn, *overrides, "model.norm_epsilon=1e-6"]
    model = tiny_gpt(*cfg_overrides)
    ours = model.decoder.layers[0].self_attention.eval()
    m = compose_config(["model=tiny", *cfg_overrides]).model
    theirs, rotary = _hf_attention(m, rope)
    with torch.no_grad():
        for name, param in ours.named_parameters():
            module, _ = name.rsplit(".", 1)
            target = getattr(theirs, HF_NAMES[module]).weight
            target.copy_(param if param.dim() > 1 else param + 0.1 * torch.randn_like(param))
            param.copy_(target)  # the norms away from one, on both sides
    seq, batch = 24, 2
    x_BSH = torch.randn(batch, seq, m.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out_SBH, _ = ours(x_BSH.transpose(0, 1).contiguous(), causal_mask(seq, x_BSH.device))
        cos, sin = rotary(x_BSH, torch.arange(seq)[None].expand(batch, seq))
        additive = torch.triu(torch.full((seq, seq), -math.inf), 1)[None, None]
        want_BSH, _ = theirs(x_BSH, (cos, sin), additive)
    torch.testing.assert_close(out_SBH.transpose(0, 1), want_BSH, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------- MoNE at rho = 1 inside MLA layers


@pytest.mark.parametrize(
    "shared_mone",
    [False, pytest.param(True, marks=pytest.mark.slow)],
    ids=["dense-shared", "mone-shared"],
)
def test_keep_ratio_one_equals_megatrons_own_experts_under_mla(megatron_single, shared_mone):
    """Our MoNE experts (and MoNE shared expert) at rho = 1 in megatron's MLA layers and in its
    multi-token prediction block against megatron's SequentialMLP and SharedExpertMLP: the same
    loss and every gradient (the MTP loss's included, through its backward)."""
    from mone_train.model.mone_experts import MoNEExperts

    common = [ARCH, "model.norm=torch"]
    reference = tiny_gpt(*common, "moe=moe")
    ours = tiny_gpt(*common, "moe=mone", "moe.neuron_keep_ratio=1.0",
                    f"moe.shared_expert_mone={str(shared_mone).lower()}")  # fmt: skip
    assert any(isinstance(mod, MoNEExperts) for mod in ours.modules())
    ours.load_state_dict(reference.state_dict(), strict=True)
    loss, grads = loss_and_grads(reference)
    loss_ours, grads_ours = loss_and_grads(ours)
    torch.testing.assert_close(loss_ours, loss, rtol=1e-5, atol=1e-5)
    assert grads.keys() == grads_ours.keys()
    assert any("linear_kv_down_proj" in name for name in grads)
    assert any(name.startswith("mtp.layers.0.transformer_layer.mlp.experts") for name in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ours[name], grad, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.slow
def test_fused_norms_equal_torchs_in_the_latents(megatron_single):
    """Our RMSNorm in the latent norms (model.norm=fused) computes what torch's does."""
    from mone_train.model.norm import RMSNorm

    reference = tiny_gpt(ARCH, "moe=moe", "model.norm=torch")
    fused = tiny_gpt(ARCH, "moe=moe")
    assert isinstance(fused.decoder.layers[0].self_attention.kv_layernorm, RMSNorm)
    fused.load_state_dict(reference.state_dict(), strict=True)
    loss, grads = loss_and_grads(reference)
    loss_fused, grads_fused = loss_and_grads(fused)
    torch.testing.assert_close(loss_fused, loss, rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_fused[name], grad, rtol=1e-4, atol=1e-6, msg=name)


# ------------------------------------------------------------------------------ the planner


@pytest.mark.parametrize(
    "model,q_lora",
    [("tiny", "v3"), ("tiny", "null"), ("1b", "v3"),
     pytest.param("1b", "null", marks=pytest.mark.slow),
     pytest.param("3b", "v3", marks=pytest.mark.slow)],
)  # fmt: skip
def test_planner_counts_equal_the_meta_device_model(megatron_single, model, q_lora):
    from mone_train.planning.plan import model_state_bytes, parameter_numbers, shape_of

    extra = ["model.q_lora_rank=null", "model.mtp_num_layers=2"] if q_lora == "null" else []
    cfg = compose_config([ARCH, f"model={model}", "trainer.expert_parallel_size=1", *extra])
    numbers = parameter_numbers(shape_of(cfg, 50304))
    assert numbers.local == meta_parameter_count(cfg, 50304)
    assert model_state_bytes(shape_of(cfg, 50304), "fp32").params == 4 * numbers.local


def test_planner_splits_mla_over_tensor_parallel_ranks():
    """Per rank at TP = 2: the latent down-projections and norms whole, the per-head
    projections halved."""
    from mone_train.planning.plan import mla_parameters, shape_of

    cfg = compose_config([ARCH, "model=1b", "trainer.tensor_parallel_size=2"])
    shape = shape_of(cfg, 50304)
    whole, per_rank = mla_parameters(shape), mla_parameters(shape, 2)
    h = shape.hidden
    whole_on_each = (
        (shape.q_lora + shape.kv_lora + shape.qk_rope) * h + shape.q_lora + shape.kv_lora
    )
    assert per_rank == (whole - whole_on_each) // 2 + whole_on_each


# ------------------------------------------------------------------- training and layouts

RUN = ["model=tiny", "trainer.steps=5", "trainer.log_interval=1", "trainer.eval_interval=5",
       "trainer.eval_iters=2", "trainer.seq_length=32", "trainer.micro_batch_size=4",
       "trainer.global_batch_size=8", "evaluation.stdlib_task_examples=0", ARCH]  # fmt: skip


def _steps(run_dir: Path) -> list[dict]:
    return [r for r in metrics(run_dir) if "loss" in r]


@pytest.mark.slow
def test_trains_from_the_cli_and_the_loss_falls(tmp_path):
    result = subprocess.run(
        [str(Path(sys.executable).parent / "mone-train"), ARCH, "model=tiny", "trainer=smoke",
         f"trainer.run_dir={tmp_path}", "logging.wandb_mode=disabled"],
        capture_output=True, text=True, cwd=REPO, timeout=600,
        env={"TORCHDYNAMO_DISABLE": "1", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    steps = _steps(tmp_path)
    assert steps[-1]["loss"] < steps[0]["loss"] - 1.0, [r["loss"] for r in steps]
    # the multi-token prediction loss (the token after next), logged on its own, falls too
    assert steps[-1]["mtp_loss"] < steps[0]["mtp_loss"] - 1.0, [r["mtp_loss"] for r in steps]


def _assert_same(a: list[dict], b: list[dict], tol: float) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4, 5]
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= tol, (x["step"], x["loss"], y["loss"])
        assert abs(x["grad_norm"] - y["grad_norm"]) <= tol, (x["step"], x["grad_norm"])
        assert abs(x["mtp_loss"] - y["mtp_loss"]) <= tol, (x["step"], x["mtp_loss"])
        assert x["load/1/tokens"] == y["load/1/tokens"]  # layer 0 is dense


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["trainer.tensor_parallel_size=2",
                                    "trainer.expert_parallel_size=2"])  # fmt: skip
def test_model_parallel_mla_matches_one_process(tmp_path, layout):
    """Plain MoE with MLA and MTP at TP = 2 (sequence parallel: the latents gathered and
    scattered) and at EP = 2 against one process, 5 steps: 1e-5 in every loss (the MTP loss
    too) and gradient norm."""
    one = tmp_path / "one"
    two = tmp_path / "two"
    train(one, 1, *RUN, "moe=moe")
    # EP = 2 over 2 processes is data parallel 2 too: the same global batch, split
    train(two, 2, *RUN, "moe=moe", layout)
    _assert_same(_steps(one), _steps(two), 1e-5)


@pytest.mark.slow
def test_resume_is_bit_exact(tmp_path):
    """MoNE with the expert bias, 6 steps straight against 3 + 3 resumed (evaluated at 3 and
    6 in both): every training and validation loss the same bits."""
    run = [*RUN, "moe=mone", "trainer.eval_interval=3"]
    train(tmp_path / "straight", 1, *run, "trainer.steps=6")
    train(tmp_path / "resumed", 1, *run, "trainer.steps=3", "trainer.save_interval=3")
    train(tmp_path / "resumed", 1, *run, "trainer.steps=6", "trainer.save_interval=3")
    straight = losses(tmp_path / "straight")
    assert len(straight) == 8 and losses(tmp_path / "resumed") == straight


# ------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model.qk_layernorm=head"], "model.qk_layernorm='head' is invalid: expected none with "
                                      "model.multi_latent_attention=true"),
        (["model.qk_layernorm=full"], "model.qk_layernorm='full' is invalid"),
        (["model.attention=megatron"], "model.attention='megatron' is invalid: expected sdpa"),
        (["model.rope_scaling.rope_type=llama3"], "default or yarn with "
                                                  "model.multi_latent_attention=true"),
        (["model.num_query_groups=2"], "model.num_query_groups=2 is invalid"),
        (["model.qk_pos_emb_head_dim=7"], "model.qk_pos_emb_head_dim=7 is invalid"),
        (["model.kv_lora_rank=0"], "model.kv_lora_rank=0 is invalid"),
        (["trainer.pipeline_parallel_size=2"], "model.mtp_num_layers=1 is invalid: expected 0 "
                                               "with trainer.pipeline_parallel_size=2"),
        (["model.mtp_num_layers=-1"], "model.mtp_num_layers=-1 is invalid"),
        (["model.q_lora_rank=0"], "model.q_lora_rank=0 is invalid"),
    ],
)  # fmt: skip
def test_bad_mla_settings_are_one_line(overrides, message):
    cfg = compose_config([ARCH, "model=tiny", *overrides])
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bad_mla_setting_from_the_cli_exits_2_and_writes_nothing(tmp_path):
    result = subprocess.run(
        [str(Path(sys.executable).parent / "mone-train"), ARCH, "model=tiny",
         "model.qk_layernorm=head", f"trainer.run_dir={tmp_path / 'run'}"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.qk_layernorm='head' is invalid" in lines[0]
    assert not (tmp_path / "run").exists()


def test_export_refuses_mla_in_one_line(megatron_single):
    """Our modeling code has no MLA yet: export names the setting instead of writing a model
    that computes something else."""
    from mone_train.export.errors import ExportError
    from mone_train.export.megatron_source import check_semantics

    cfg = compose_config([ARCH, "model=tiny", "moe=moe"])
    with pytest.raises(ExportError) as err:
        check_semantics(tiny_gpt(ARCH, "moe=moe"), cfg)
    assert "multi_latent_attention=True (expected False)" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("declared", [True, False], ids=["quantization_config", "tensors-only"])
def test_fp8_block_scaled_checkpoint_is_one_line(tmp_path, capsys, declared):
    """DeepSeek-V3's release stores FP8 weights with a weight_scale_inv per 128 x 128 block:
    mone-import names what is needed (dequantise to bf16 first), exit 2, nothing written."""
    import json

    from safetensors.torch import save_file

    from mone_train.importer.cli import main as import_main

    source = tmp_path / "fp8"
    source.mkdir()
    config = {"model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"]}
    if declared:
        config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (source / "config.json").write_text(json.dumps(config))
    save_file({"model.layers.0.mlp.down_proj.weight": torch.zeros(4, 4),
               "model.layers.0.mlp.down_proj.weight_scale_inv": torch.ones(1, 1)},
              str(source / "model.safetensors"))  # fmt: skip
    out = tmp_path / "out"
    capsys.readouterr()
    assert import_main([str(source), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "FP8 block-scaled weights (weight_scale_inv tensors" in err[0], err
    assert "dequantise to bf16 first" in err[0] and not out.exists()
