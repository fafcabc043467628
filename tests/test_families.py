"""The MoE families (``arch=``): configs, training, parity with megatron-core's own layers,
loss-free balancing of experts and of neurons, checkpoints, export, and bad combinations."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from mone_train.compose import compose_config
from mone_train.errors import ConfigError
from mone_train.families import family_names, load_family
from tests.helpers.distributed import losses, metrics, train
from tests.helpers.gpt_parity import VOCAB, loss_and_grads, tiny_gpt

FAMILIES = family_names()


def test_every_family_ships_a_folder_with_its_recipe_and_mapping():
    assert FAMILIES == ["deepseek", "deepseek_v3", "mixtral", "olmoe", "qwen2_moe", "qwen3_moe"]
    for name in FAMILIES:
        family = load_family(name)
        assert family.name == name
        cfg = compose_config([f"arch={name}"])
        assert cfg.model.family == name
        if family.hf_class:  # plain MoE of the family's recipe fits its transformers class
            plain = compose_config([f"arch={name}", "moe=moe"])
            assert family.native_mismatch(plain) is None, name
            assert family.native_mismatch(cfg) == "MoNE keeps K < F neurons per expert"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("size", ["tiny", "small", "1b", "3b"])
def test_every_family_composes_with_every_size(family, size):
    """Sizes and families are independent: the size's routed experts split by the family's
    granularity g into g x experts, g x top-k, F / g neurons (the same activated weights)."""
    base = compose_config([f"model={size}"]).model
    cfg = compose_config([f"arch={family}", f"model={size}"])
    cfg.validate()
    m, g = cfg.model, cfg.model.expert_granularity
    assert (m.num_experts, m.router_topk, m.moe_ffn_hidden_size * g) == (
        base.num_experts * g, base.router_topk * g, base.moe_ffn_hidden_size,
    )  # fmt: skip
    assert m.hidden_size == base.hidden_size and m.num_layers == base.num_layers


def test_family_recipes_reach_megatrons_transformer_config(megatron_single):
    from mone_train.model.builder import transformer_config

    config = transformer_config(compose_config(["arch=deepseek", "model=tiny"]))
    assert config.moe_layer_freq == [0, 1]  # the first layer dense
    assert config.moe_router_score_function == "sigmoid" and config.moe_router_enable_expert_bias
    assert config.moe_router_load_balancing_type == "seq_aux_loss"
    assert (config.moe_router_num_groups, config.moe_router_group_topk) == (8, 4)
    assert config.moe_router_topk_scaling_factor == 2.5
    assert config.moe_shared_expert_intermediate_size == 32
    config = transformer_config(compose_config(["arch=olmoe", "model=tiny"]))
    assert config.moe_z_loss_coeff == 1e-3 and config.qk_layernorm
    config = transformer_config(compose_config(["arch=qwen2_moe", "model=tiny"]))
    assert config.add_qkv_bias and config.moe_shared_expert_gate and config.moe_router_pre_softmax


# ------------------------------------------------------------- parity with megatron's layers

PARITY_CASES = {
    "mixtral": [],
    "deepseek": [],  # shared expert, sigmoid + expert bias, groups, scaling, a dense layer
    "qwen3_moe": [],
    "qwen2_moe": [],  # gated shared expert, q/k/v biases, pre-softmax
    "olmoe": [],  # z-loss, QK-norm over all heads
    "deepseek-dropping": ["arch=deepseek", "model.capacity_factor=1.0"],  # token dropping
    "qwen3-dropping": ["arch=qwen3_moe", "model.capacity_factor=0.5",
                       "model.token_drop_policy=position", "model.pad_to_capacity=true"],
}  # fmt: skip


def _recipe(case: str) -> list[str]:
    return PARITY_CASES[case] or [f"arch={case}"]


# MoNE shared experts only where the recipe has a shared expert.
PARITY_CASES_AND_SHARED = [(case, False) for case in PARITY_CASES] + [
    (case, True)
    for case in PARITY_CASES
    if compose_config(_recipe(case)).model.shared_expert_ffn_hidden_size > 0
]


@pytest.mark.parametrize(
    "case, shared_mone",
    PARITY_CASES_AND_SHARED,
    ids=[f"{c}-{'mone' if s else 'dense'}-shared" for c, s in PARITY_CASES_AND_SHARED],
)
def test_keep_ratio_one_equals_megatrons_own_layers(megatron_single, case, shared_mone):
    """MoNE at rho = 1 (our experts, our shared experts with shared_expert_mone) against
    megatron-core's SequentialMLP and SharedExpertMLP in the family's recipe: the same loss
    and every gradient (1e-5: the same products, sums in another order at most)."""
    recipe = _recipe(case)
    # fp32 without the fused norm/RoPE on both sides: only the experts differ
    common = [*recipe, "model.norm=torch", "model.rope_fusion=false", "model.attention=megatron"]
    reference = tiny_gpt(*common, "moe=moe")
    ours = tiny_gpt(*common, "moe=mone", "moe.neuron_keep_ratio=1.0",
                    f"moe.shared_expert_mone={str(shared_mone).lower()}")  # fmt: skip
    from mone_train.model.mone_experts import MoNEExperts
    from mone_train.model.shared_experts import MoNESharedExperts

    assert any(isinstance(m, MoNEExperts) for m in ours.modules())
    assert any(isinstance(m, MoNESharedExperts) for m in ours.modules()) == shared_mone
    ours.load_state_dict(reference.state_dict(), strict=True)
    loss, grads = loss_and_grads(reference)
    loss_ours, grads_ours = loss_and_grads(ours)
    torch.testing.assert_close(loss_ours, loss, rtol=1e-5, atol=1e-5)
    assert grads.keys() == grads_ours.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ours[name], grad, rtol=1e-5, atol=1e-5, msg=name)


def test_token_dropping_really_drops(megatron_single):
    from mone_train.components.health import HealthMonitor

    model = tiny_gpt("arch=qwen3_moe", "model.capacity_factor=0.5")
    monitor = HealthMonitor(model)
    model.train()
    loss_and_grads(model)
    dropped = [v for k, v in monitor.collect().items() if k.endswith("/dropped")]
    # Capacity 0.5 of an even share: at least half of the choices cannot be kept.
    assert len(dropped) == 2 and all(share >= 0.5 for share in dropped)


# --------------------------------------------------------- loss-free balancing: the rules


def _one_train_step(info, *overrides: str, observe=None):
    """A TrainStep of `tiny` + overrides and a fixed batch (``info``: megatron's groups)."""
    from mone_train.components.optimizer import build_optimizer
    from mone_train.components.train_step import TrainStep
    from mone_train.model.builder import build_model
    from mone_train.model.lm import causal_mask

    cfg = compose_config(["model=tiny", *overrides])
    model, params = build_model(cfg, VOCAB)
    if observe is not None:
        observe(model)
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, VOCAB, (4, 32), generator=gen)
    batch = {"tokens": tokens, "labels": tokens, "loss_mask": torch.ones(4, 32),
             "position_ids": torch.arange(32).expand(4, 32)}  # fmt: skip
    step = TrainStep(model, build_optimizer(cfg.optim, params), params,
                     causal_mask(32, torch.device("cpu")), info, accum=1, clip_grad=1.0)  # fmt: skip
    return cfg, model, step, iter([batch])


def test_expert_bias_moves_by_the_published_rule(megatron_single):
    """DeepSeek-V3's auxiliary-loss-free balancing: after a step each expert's bias moves by
    rate x sign(mean load - its load), the loads counted over the step's tokens (here from the
    routers' own outputs, independently of megatron's counter)."""
    loads = {}

    def observe(model):
        from megatron.core.transformer.moe.router import TopKRouter

        for name, module in model.named_modules():
            if isinstance(module, TopKRouter):

                def hook(mod, args, output, name=name):
                    loads[name] = loads.get(name, 0) + output[1].sum(dim=0).float()

                module.register_forward_hook(hook)

    cfg, model, step, batches = _one_train_step(megatron_single, "arch=deepseek", "moe=moe",
                                                "model.router_bias_update_rate=0.01",
                                                observe=observe)  # fmt: skip
    routers = {n: m for n, m in model.named_modules() if n.endswith(".router")}
    before = {n: m.expert_bias.clone() for n, m in routers.items()}
    assert all(bool((b == 0).all()) for b in before.values())
    step(batches, lr=1e-3)
    assert loads.keys() == before.keys()
    for name, load in loads.items():
        want = before[name] + 0.01 * torch.sign(load.mean() - load)
        assert torch.equal(routers[name].expert_bias, want), name
        assert bool((routers[name].local_tokens_per_expert == 0).all())  # reset for next step


def test_neuron_bias_moves_by_the_same_rule_per_expert(megatron_single):
    masks: dict = {}

    def observe(model):
        from mone_train.model.mone_experts import MoNEExperts

        for name, module in model.named_modules():
            if isinstance(module, MoNEExperts):
                module.monitor = lambda found, name=name: masks.setdefault(name, found)

    cfg, model, step, batches = _one_train_step(megatron_single, "moe=mone",
                                                "moe.neuron_balance=bias",
                                                "moe.neuron_bias_update_rate=0.05",
                                                observe=observe)  # fmt: skip
    from mone_train.model.mone_experts import MoNEExperts

    experts = {n: m for n, m in model.named_modules() if isinstance(m, MoNEExperts)}
    step(batches, lr=1e-3)
    assert len(experts) == 2 and masks.keys() == experts.keys()  # both MoE layers
    for name, module in experts.items():
        for e, mask in enumerate(masks[name]):
            counts = mask.float().sum(dim=0)
            want = 0.05 * torch.sign(counts.mean() - counts)
            assert torch.equal(module.neuron_bias[e], want), (name, e)
        assert bool((module.neuron_selections == 0).all())


def test_neuron_bias_revives_neurons_that_no_balance_leaves_dead(megatron_single):
    """A constructed imbalance: half of each expert's neurons get gate weights 100x smaller,
    so without balance the top-K (K = F / 4) never picks them; with the neuron bias every
    neuron is in use within a few dozen updates. The bias only moves the choice: h stays
    SiLU(gate) * up on the chosen neurons."""
    from mone_train.model.neuron_balance import update_neuron_biases
    from tests.test_mone_experts import _experts, _inputs

    def utilisation(module, rounds: int, update: bool) -> float:
        used = None
        for r in range(rounds):
            torch.manual_seed(100 + r)
            x, counts, probs = _inputs([16, 16, 16, 16])
            found = []
            module.monitor = found.extend
            module(x, counts, probs)
            masks = torch.stack(found)
            used = masks.any(dim=1) if used is None else used | masks.any(dim=1)
            if update:
                update_neuron_biases(module)
                used = masks.any(dim=1)  # the last round's use
        return float(used.float().mean())

    modules = {}
    for name, rate in (("none", None), ("bias", 0.25)):
        module = _experts("mone", neuron_keep_ratio=0.25, neuron_bias_update_rate=rate)
        module.train()
        with torch.no_grad():
            for expert in module.local_experts:
                expert.linear_fc1.weight[12:24] *= 0.01  # gate rows of neurons 12..23
        modules[name] = module
    assert utilisation(modules["none"], 10, update=False) == 0.5
    assert utilisation(modules["bias"], 60, update=True) == 1.0
    bias = modules["bias"].neuron_bias
    assert bool((bias[:, 12:].mean(dim=1) > bias[:, :12].mean(dim=1)).all())


# ------------------------------------------------------------------- training from the CLI


@pytest.mark.slow  # 5 short training runs
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_trains_from_the_cli_and_its_loss_falls(tmp_path, family, corpus):
    """60 `tiny` steps (MoNE, the family's recipe): the loss falls by at least half of what
    knowing only byte frequencies gains over uniform bytes (ln 258 - H), as the default run."""
    run_dir = tmp_path / family
    done = subprocess.run(
        [sys.executable, "-m", "mone_train.train", f"arch={family}", "model=tiny", "trainer=smoke",
         f"trainer.run_dir={run_dir}", "logging.wandb_mode=disabled"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    records = metrics(run_dir)
    train_losses = [r["loss"] for r in records if "loss" in r]
    final = [r["val_loss"] for r in records if "val_loss" in r][-1]
    counts = np.bincount(np.fromfile(f"{corpus.valid_prefix}.bin", dtype=np.uint16))
    freq = counts[counts > 0] / counts.sum()
    entropy = float(-(freq * np.log(freq)).sum())
    assert train_losses[0] - final >= (math.log(258) - entropy) / 2
    last = records[-2] if "val_loss" in records[-1] else records[-1]
    if family == "deepseek":
        assert last["router/1/expert_bias_max"] > 0 > last["router/1/expert_bias_min"]
        assert 0 < last["shared/1/output_share"] < 1
    if family == "olmoe":
        assert last["z_loss"] > 0


# ------------------------------------------------------- layouts, resume, checkpoints


@pytest.mark.slow
@pytest.mark.parametrize("flavour", ["moe", "mone"])
def test_expert_parallel_equals_one_process_layout_for_deepseek(tmp_path, flavour):
    """EP = 2 against EP = 1 (both 2 data-parallel ranks) with shared experts, a dense layer,
    sigmoid routing and its expert bias: the same losses to 1e-5 over 5 steps (the layouts
    differ only in the order of floating-point sums; see test_distributed)."""
    common = [f"moe={flavour}", "arch=deepseek", "moe.ng_lbl_coeff=0", "trainer.steps=5",
              "trainer.micro_batch_size=4", "trainer.global_batch_size=8"]  # fmt: skip
    train(tmp_path / "ep1", 2, *common, "trainer.expert_parallel_size=1")
    train(tmp_path / "ep2", 2, *common, "trainer.expert_parallel_size=2")
    a, b = losses(tmp_path / "ep1"), losses(tmp_path / "ep2")
    assert len(a) == len(b) == 6
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-5, (a, b)
    last = [r for r in metrics(tmp_path / "ep2") if "loss" in r][-1]
    assert last["router/1/expert_bias_max"] != 0.0


@pytest.mark.slow
def test_resume_is_bit_exact_with_the_expert_and_neuron_biases_restored(tmp_path):
    from megatron.core import dist_checkpointing

    from mone_train.components.checkpoint import CHECKPOINTS

    recipe = ["arch=deepseek", "moe.neuron_balance=bias", "trainer.seq_length=32"]
    train(tmp_path / "straight", 1, *recipe, "trainer.steps=20")
    train(tmp_path / "resumed", 1, *recipe, "trainer.steps=10", "trainer.save_interval=10")
    checkpoint = tmp_path / "resumed" / CHECKPOINTS / "step_00000010"
    tensors = dist_checkpointing.load_tensors_metadata(str(checkpoint))
    biases = [k for k in tensors if k.endswith(("router.expert_bias", "experts.neuron_bias"))]
    assert len(biases) == 2 and all("decoder.layers.1." in k for k in biases)  # layer 0 dense
    train(tmp_path / "resumed", 1, *recipe, "trainer.steps=20", "trainer.save_interval=10")
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")


# ---------------------------------------------------------------------------- export

NATIVE = {"mixtral": "MixtralForCausalLM", "olmoe": "OlmoeForCausalLM",
          "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}  # fmt: skip


@pytest.mark.slow  # a 3-step run and an export per family and flavour
# deepseek_v3 exports as DeepseekV3ForCausalLM: tests/test_import_deepseek_v3.py (round trip)
@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "deepseek_v3"])
@pytest.mark.parametrize("flavour", ["moe", "mone"])
def test_export_writes_the_family_class_and_reproduces_megatrons_logits(
    tmp_path, family, flavour, corpus
):
    """Plain MoE of each family exports as its own transformers class (DeepSeek-style: our
    code, there is no GQA DeepSeek class); MoNE (K < F) and the neuron bias through our code.
    Logits equal megatron's to 1e-4 (fp32; sums in another order)."""
    import json

    from tests.test_export import _export, _load, _megatron_logits, _tokens, _train

    extra = []
    if flavour == "mone":  # the neuron bias too, and MoNE shared experts where there are any
        extra = ["moe.neuron_balance=bias"]
        if family in ("deepseek", "qwen2_moe"):
            extra.append("moe.shared_expert_mone=true")
    run = _train(tmp_path / "run", [f"arch={family}", f"moe={flavour}", *extra])
    out = _export(run, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    want = NATIVE.get(family) if flavour == "moe" else None
    assert config["architectures"] == [want or "MoNEForCausalLM"]
    assert ("auto_map" in config) == (want is None)
    tokens = _tokens()
    model = _load(out)
    with torch.no_grad():
        logits = model(tokens).logits
    torch.testing.assert_close(logits, _megatron_logits(run, tokens), rtol=0, atol=1e-4)


# ------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["arch=deepseek", "model.router_num_groups=3"], "model.router_num_groups=3 is invalid"),
        (["arch=deepseek", "model.router_group_topk=16"], "model.router_group_topk=16"),
        (["model.capacity_factor=0"], "model.capacity_factor=0.0 is invalid"),
        (["model.capacity_factor=-1"], "model.capacity_factor=-1.0 is invalid"),
        (["model.pad_to_capacity=true"], "model.pad_to_capacity=True is invalid"),
        (["model.router_expert_bias=true"], "unless model.router_score=sigmoid"),
        (["model.shared_expert_gate=true"], "without a shared expert"),
        (["model.first_dense_layers=4"], "model.first_dense_layers=4 is invalid"),
        (["model.qk_layernorm=both"], "model.qk_layernorm='both' is invalid"),
        (["model.load_balancing=sinkhorn"], "model.load_balancing='sinkhorn' is invalid"),
        (["moe=moe", "moe.neuron_balance=bias"], "plain experts select no neurons"),
        (["moe.neuron_balance=loss"], "moe.neuron_balance='loss' is invalid"),
        (["model.family=mamba"], "model.family='mamba' is invalid"),
        (["model.router_topk=1"], "model.router_pre_softmax=False is invalid"),
    ],
)
def test_unsupported_combinations_end_in_one_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        compose_config(["model=tiny", *overrides]).validate()
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow  # a fresh interpreter
def test_a_family_that_does_not_fit_the_size_is_one_line_from_the_cli():
    """The size's 128 neurons do not split into 3 experts: one line, exit 2, no traceback."""
    done = subprocess.run(
        [sys.executable, "-m", "mone_train.train", "arch=deepseek", "model=tiny",
         "model.expert_granularity=3"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not split into model.expert_granularity=3" in lines[0]
    assert lines[0].startswith("mone-train: error:")


@pytest.mark.slow  # a fresh interpreter
def test_unknown_arch_option_lists_the_families():
    done = subprocess.run(
        [sys.executable, "-m", "mone_train.train", "arch=mamba"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2 and "arch=mamba is not a config option" in done.stderr
    assert all(name in done.stderr for name in FAMILIES)
