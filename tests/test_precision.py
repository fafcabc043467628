"""trainer.precision=bf16: bf16 weights and compute, fp32 masters, fp32 checkpoints."""

from __future__ import annotations

import pytest
import torch

from mone_train.components.checkpoint import CHECKPOINTS
from mone_train.compose import compose_config
from tests.helpers.distributed import TINY_RUN, losses, metrics, train

BASE = TINY_RUN


def _run(run_dir, *extra):
    return train(run_dir, 1, *extra)


@pytest.mark.parametrize("flavour", ["moe", "mone"])
def test_optimizer_updates_fp32_masters_and_rounds_them_into_bf16_weights(
    megatron_single, corpus, flavour, tmp_path
):
    """Three steps of TrainStep against torch AdamW run by hand on fp32 copies of the masters
    with the gradients DDP reduced (fp32): masters equal, weights are the masters in bf16."""
    from mone_train.components.optimizer import build_optimizer
    from mone_train.components.train_step import TrainStep
    from mone_train.data.dataset import build_gpt_datasets, micro_batches
    from mone_train.data.tokenizer import tokenizer_from_config
    from mone_train.model.builder import build_model
    from mone_train.model.lm import causal_mask

    cfg = compose_config([*BASE, f"moe={flavour}", "trainer.precision=bf16"])
    model, params = build_model(cfg, vocab_size=258)
    assert all(p.dtype == torch.bfloat16 for p in params)
    masters = [p.main_param for p in params]
    assert all(m.dtype == torch.float32 for m in masters)
    assert all(p.main_grad.dtype == torch.float32 for p in params)  # fp32 reduction buffers
    optimizer = build_optimizer(cfg.optim, params)
    reference_weights = [m.clone() for m in masters]
    reference = torch.optim.AdamW(
        [
            {"params": [w for w, p in zip(reference_weights, params) if p.dim() >= 2],
             "weight_decay": cfg.optim.weight_decay},
            {"params": [w for w, p in zip(reference_weights, params) if p.dim() < 2],
             "weight_decay": 0.0},
        ],
        lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps,
        fused=cfg.optim.fused,
    )  # fmt: skip
    t = cfg.trainer
    tokenizer = tokenizer_from_config(cfg.data.tokenizer)
    train, _ = build_gpt_datasets(corpus.train_prefix, corpus.valid_prefix, tokenizer,
                                  t.seq_length, t.seed, 64, 8, tmp_path)  # fmt: skip
    batches = micro_batches(train, 0, t.micro_batch_size, 0, 1)
    step = TrainStep(model, optimizer, params, causal_mask(t.seq_length, megatron_single.device),
                     megatron_single, accum=1, clip_grad=cfg.optim.clip_grad)  # fmt: skip
    for lr in (1e-3, 2e-3, 3e-3):
        result = step(batches, lr)
        assert result.applied
        for group in reference.param_groups:
            group["lr"] = lr
        for w, p in zip(reference_weights, params):
            w.grad = p.main_grad.clone()  # what the step used (clipped), still in the buffer
        reference.step()
        for w, m, p in zip(reference_weights, masters, params):
            assert torch.equal(m, w)
            assert torch.equal(p.data, m.to(torch.bfloat16))
    # The masters carry what bf16 cannot: most updated matrix entries are not bf16 numbers.
    matrix = next(m for m, p in zip(masters, params) if p.dim() >= 2)
    assert (matrix != matrix.to(torch.bfloat16).float()).float().mean() > 0.9


# bf16's unit roundoff: a bf16 number is within a relative 2^-8 of the value it rounds (8
# significand bits). A loss computed through bf16 weights and activations from the same fp32
# masters is bounded by that relative rounding of the loss, as long as the two runs' weights
# have not drifted apart: every bf16-vs-fp32 comparison below stays where that holds.
BF16_ROUNDOFF = 2.0**-8


@pytest.mark.slow  # trains
def test_bf16_training_tracks_fp32(tmp_path):
    """Plain MoE (no neuron selection) for 30 `tiny` steps: every training loss and every
    validation loss of bf16 (fp32 masters) within bf16's unit roundoff (relative) of fp32.

    Why this holds on any CPU: the masters get the same AdamW updates up to the rounding of the
    gradients, and Adam's update is normalised (its size is the learning rate, not the gradient),
    so over a few dozen steps at a small learning rate the weights stay within a bf16 rounding
    of each other; expert routing is a soft top-2 over 4 experts, so a rare near-tie flip moves
    a token's output by the small difference of two near-equal router scores. MoNE keeps the
    top half of 128 neurons per token, where near-ties are the rule, so its trajectories part
    like two seeds after a few dozen steps: MoNE is compared on its first step only (same
    masters). The end-of-run quality claim (bf16 within 0.02 nats of fp32 on a real run, with
    seeds) is benchmarks/precision_quality.py's."""
    for flavour, steps in (("moe", 30), ("mone", 1)):
        for precision in ("fp32", "bf16"):
            _run(tmp_path / f"{flavour}-{precision}", f"moe={flavour}", f"trainer.steps={steps}",
                 f"trainer.precision={precision}", "trainer.eval_interval=10")  # fmt: skip
        runs = [metrics(tmp_path / f"{flavour}-{p}") for p in ("fp32", "bf16")]
        for key in ("loss", "val_loss"):
            fp32, bf16 = ([r[key] for r in records if key in r] for records in runs)
            assert len(fp32) == len(bf16) == (steps if key == "loss" else max(1, steps // 10))
            assert fp32 != bf16  # bf16 really ran
            for step, (want, got) in enumerate(zip(fp32, bf16)):
                assert abs(got - want) <= BF16_ROUNDOFF * want, (flavour, key, step, want, got)


@pytest.mark.slow  # trains
def test_bf16_resume_is_bit_exact_and_checkpoints_hold_fp32(tmp_path):
    from megatron.core import dist_checkpointing

    _run(tmp_path / "straight", "trainer.steps=20", "trainer.precision=bf16")
    _run(tmp_path / "resumed", "trainer.steps=10", "trainer.save_interval=10",
         "trainer.precision=bf16")  # fmt: skip
    checkpoint = tmp_path / "resumed" / CHECKPOINTS / "step_00000010"
    common = dist_checkpointing.load_common_state_dict(str(checkpoint))
    assert common["common"]["step"] == 10
    tensors = dist_checkpointing.load_tensors_metadata(str(checkpoint))
    assert tensors and all(t.dtype == torch.float32 for t in tensors.values())
    _run(tmp_path / "resumed", "trainer.steps=20", "trainer.save_interval=10",
         "trainer.precision=bf16")  # fmt: skip
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")


@pytest.mark.slow  # trains
@pytest.mark.parametrize("saved,loaded", [("fp32", "bf16"), ("bf16", "fp32")])
def test_checkpoints_load_across_precisions(tmp_path, saved, loaded):
    """Checkpoints hold fp32 weights in both precisions; a run in the other precision resumes
    from them and evaluates the same weights within bf16's unit roundoff of the saving run's
    loss (relative; see BF16_ROUNDOFF)."""
    source = tmp_path / "source"
    _run(source, "trainer.steps=10", "trainer.save_interval=10", f"trainer.precision={saved}")
    saved_val = [r["val_loss"] for r in metrics(source) if "val_loss" in r][-1]
    checkpoint = source / CHECKPOINTS / "step_00000010"
    target = tmp_path / "target"
    _run(target, "trainer.steps=10", f"trainer.resume={checkpoint}", "trainer.eval_interval=1",
         f"trainer.precision={loaded}")  # fmt: skip
    loaded_val = [r["val_loss"] for r in metrics(target) if "val_loss" in r][-1]
    assert loaded_val != saved_val  # evaluated in the other precision
    assert abs(loaded_val - saved_val) <= BF16_ROUNDOFF * saved_val
