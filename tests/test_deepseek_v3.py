"""``arch=deepseek_v3``: multi-head latent attention (megatron-core's MLASelfAttention, YaRN
RoPE) and multi-token prediction (its MTP block) with MoNE experts: the attention against
transformers' DeepseekV3Attention, MoNE at rho = 1 against megatron's own experts (MTP layer
included), the planner's counts against the built model, training from the CLI (both losses
fall), tensor, expert and pipeline parallelism against one process (MTP on the last stage),
resume across layouts, bad input."""

from __future__ import annotations

import math
import os
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


@pytest.mark.parametrize("q_lora", ["v3", "null"])
def test_flops_per_token_are_every_matmul_of_mla_and_mtp(megatron_single, q_lora):
    """The trainer's (and the planner's) training FLOPs per token with MLA and MTP: three times
    the matrix products torch counts in one forward (every projection, the attention scores
    and values over MLA's head sizes, the routed top-k experts, the MTP layer and its second
    pass through the output layer), plus the 6 x weights the formula counts that no product
    touches (the embedding table, norm scales)."""
    from torch.utils.flop_counter import FlopCounterMode

    from mone_train.components.health import training_flops_per_token
    from mone_train.model.lm import causal_mask
    from mone_train.model.params import count_parameters
    from mone_train.planning.plan import make_plan

    extra = ["model.q_lora_rank=null", "model.mtp_num_layers=2"] if q_lora == "null" else []
    model = tiny_gpt(ARCH, "moe=moe", *extra).eval()  # eval: megatron's MTP-loss log untouched
    cfg = compose_config([ARCH, "model=tiny", "moe=moe", *extra])
    m, seq, batch = cfg.model, cfg.trainer.seq_length, 1
    tokens_BS = torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(0))
    positions_BS = torch.arange(seq)[None]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(tokens_BS, positions_BS, causal_mask(seq, tokens_BS.device), labels=tokens_BS)
    vectors = sum(p.numel() for p in model.parameters() if p.dim() == 1)
    untouched = 6 * (VOCAB * m.hidden_size + vectors)
    activated = count_parameters(model, m.router_topk).activated_moe
    per_token = training_flops_per_token(m, activated, VOCAB, seq)
    assert per_token - untouched == 3 * counter.get_total_flops() / (batch * seq)
    plan = make_plan(cfg, VOCAB, world_size=1)
    assert plan.flops.executed == per_token


@pytest.mark.parametrize("q_lora", ["v3", "null"])
def test_mla_block_keeps_what_the_planner_counts(megatron_single, q_lora):
    """One MLA block (its input norm included) on the SDPA fast path (query/key as wide as the
    value): the bytes autograd keeps for backward, tensor by tensor, are the planner's
    ``mla_attention_bytes`` (within 0.5 %; the planner's rstd rows are approximate)."""
    from mone_train.model.lm import causal_mask
    from mone_train.planning.plan import mla_attention_bytes, shape_of

    overrides = [ARCH, "moe=moe", "model.hidden_size=256", "model.num_attention_heads=8",
                 "model.v_head_dim=48", "model.qk_pos_emb_head_dim=16",
                 "trainer.seq_length=64", "trainer.micro_batch_size=2"]  # fmt: skip
    if q_lora == "null":
        overrides.append("model.q_lora_rank=null")
    layer = tiny_gpt(*overrides).decoder.layers[0]
    shape = shape_of(compose_config(["model=tiny", *overrides]), VOCAB, device="cpu")
    assert not shape.mla_math_core
    x_SBH = torch.randn(shape.seq, shape.micro_batch, shape.hidden, requires_grad=True)
    weights = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    kept: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer.self_attention(layer.input_layernorm(x_SBH), causal_mask(shape.seq, x_SBH.device))
    assert sum(kept.values()) == pytest.approx(mla_attention_bytes(shape), rel=0.005)


@pytest.mark.parametrize(
    "recompute", ["none", pytest.param("moe", marks=pytest.mark.slow),
                  pytest.param("full", marks=pytest.mark.slow)],
)  # fmt: skip
def test_activation_estimate_of_mla_and_mtp_matches_the_measured_cpu_peak(recompute):
    """The planner's activation peak (MLA's latents, per-head projections and, on CPU, the
    math-path softmax; the MTP layer and its second loss) within 25 % of the allocator peak of
    one forward + backward measured by benchmarks/memory_plan_check.py (measured with none,
    moe, full: -4, -5, -16 % at tiny; -2, -2, -17 % at small, sequence 512)."""
    import json

    from mone_train.planning.plan import activation_bytes, shape_of

    overrides = [ARCH, "model=tiny", "trainer.micro_batch_size=16", "trainer.seq_length=128",
                 f"trainer.recompute={recompute}"]  # fmt: skip
    shape = shape_of(compose_config(overrides), VOCAB, device="cpu")
    estimate = activation_bytes(shape, recompute)
    assert estimate.parts["mtp"] > 0 and shape.mla_math_core
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "memory_plan_check.py"), "--child",
         "allocator", *overrides],
        capture_output=True, text=True, check=True, env={**os.environ, "TORCHDYNAMO_DISABLE": "1"},
    )  # fmt: skip
    peak = json.loads(out.stdout.strip().splitlines()[-1])["allocator"]
    assert abs(estimate.peak - peak) <= 0.25 * peak, (estimate.peak, peak)


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
@pytest.mark.parametrize("moe,tol", [("moe", 1e-5), ("mone", 1e-4)])
def test_pipeline_parallel_mla_with_mtp_matches_one_process(tmp_path, moe, tol):
    """MLA and MTP over 2 pipeline stages (the MTP block and a copy of the word embedding on the
    last stage, the copy's gradient all-reduced with the first stage's) against one process,
    5 steps: every loss, the MTP loss (logged from the last stage) and the gradient norm (the
    copy counted once) within ``tol``, the validation loss through the pipeline, and the
    parameter count (the copy not counted). Plain MoE 1e-5; MoNE 1e-4, since a sum taken in
    another order can flip a near-tie of its neuron top-K (both measured within 3e-7)."""
    import json

    one, two = tmp_path / "one", tmp_path / "pp2"
    train(one, 1, *RUN, f"moe={moe}")
    train(two, 2, *RUN, f"moe={moe}", "trainer.pipeline_parallel_size=2")
    _assert_same(_steps(one), _steps(two), tol)
    val = [r["val_loss"] for r in metrics(one) if "val_loss" in r]
    assert [r["val_loss"] for r in metrics(two) if "val_loss" in r] == pytest.approx(val, abs=tol)
    params = json.loads((one / "params.json").read_text())
    assert json.loads((two / "params.json").read_text()) == params


@pytest.mark.slow
def test_saved_with_mtp_on_a_later_stage_resumes_on_one_process(tmp_path):
    """A checkpoint saved at PP = 2 (the last stage's embedding copy a replica of the first's)
    resumes at PP = 1: steps 4-6 and the validation losses as a straight run's (1e-5)."""
    run = [*RUN, "moe=moe", "trainer.eval_interval=3"]
    train(tmp_path / "straight", 1, *run, "trainer.steps=6")
    resumed = tmp_path / "resumed"
    train(resumed, 2, *run, "trainer.steps=3", "trainer.save_interval=3",
          "trainer.pipeline_parallel_size=2")  # fmt: skip
    train(resumed, 1, *run, "trainer.steps=6", "trainer.save_interval=3")
    straight = losses(tmp_path / "straight")
    assert len(straight) == 8 and losses(resumed) == pytest.approx(straight, abs=1e-5)


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
        # megatron puts the MTP block on the last stage: equal stages leave none of them empty
        (["model.num_layers=1", "model.first_dense_layers=0", "trainer.pipeline_parallel_size=2"],
         "trainer.pipeline_parallel_size=2 is invalid: expected a divisor of model.num_layers=1"),
        # the heads split over TP; the latents do not (their down-projections are replicated)
        (["trainer.tensor_parallel_size=3"], "model.num_attention_heads=4 is invalid: expected "
                                             "a multiple of trainer.tensor_parallel_size=3"),
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
