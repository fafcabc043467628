"""Typed configuration: dataclasses behind every Hydra YAML group, and their validation.

The dataclasses are registered in Hydra's ConfigStore as the schema of ``configs/config.yaml``,
so an unknown key or a wrongly typed value fails while composing. :func:`validate` then checks
meaning (ranges and cross-field rules) and raises :class:`ConfigError` naming the key, the value
and what would be valid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

from mone_kernels import IMPLS, num_kept_neurons

FLAVOURS = ("mone", "moe")
PRECISIONS = ("fp32",)  # bf16 needs fp32 master weights in the optimizer: not yet
SCHEDULES = ("cosine", "linear", "constant")
WANDB_MODES = ("offline", "online", "disabled")
BACKENDS = ("nccl", "gloo")


class ConfigError(ValueError):
    """A configuration value outside its valid range; the message names the key."""


@dataclass
class ModelConfig:
    """Transformer shape. ``vocab_size: null`` takes the tokenizer's vocabulary."""

    name: str = "tiny"
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None
    ffn_hidden_size: int = 256  # dense MLP width, used by layers that moe_layer_freq leaves dense
    num_experts: int = 4
    router_topk: int = 2
    moe_ffn_hidden_size: int = 128  # F, neurons per routed expert
    moe_layer_freq: int = 1  # every k-th layer is MoE, starting with the first
    aux_loss_coeff: float = 1e-2
    max_position_embeddings: int = 1024
    vocab_size: Optional[int] = None
    init_method_std: float = 0.02
    tie_embeddings: bool = False
    dropout: float = 0.0


@dataclass
class MoEConfig:
    """Expert flavour: ``mone`` (neuron top-k inside experts) or the plain ``moe`` baseline."""

    flavour: str = "mone"
    neuron_keep_ratio: float = 0.5  # rho; K = max(1, round(rho * F)) neurons kept per token
    ng_lbl_coeff: float = 1e-2  # beta of the neuron-granular load-balance loss; 0 disables it
    kernel_impl: str = "auto"


@dataclass
class TokenizerConfig:
    """``byte`` (built in), ``hf`` (a tokenizer.json) or ``sentencepiece`` (a .model file)."""

    type: str = "byte"
    path: Optional[str] = None  # a local file (or, for hf, its folder); never downloaded
    eod_token: Optional[str] = None  # hf only: the end-of-document token when not a usual name


@dataclass
class DataConfig:
    """Training data: the built-in ``stdlib`` corpus, or a weighted blend of ``indexed`` datasets.

    ``stdlib``: the running Python's standard-library sources, tokenized with ``tokenizer`` and
    cached; every ``valid_every``-th document is the validation split. ``indexed``: ``paths`` are
    megatron-core indexed dataset prefixes (``<prefix>.bin/.idx``, as ``mone-preprocess``
    writes them), blended by ``weights`` (null: in proportion to their sizes) and split train/valid/test by ``split``.
    """

    name: str = "stdlib"
    cache_dir: str = "${oc.env:MONE_TRAIN_CACHE,'~/.cache/mone-train'}"
    valid_every: int = 50  # stdlib: every n-th document (in sorted order) is held out
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    paths: list[str] = field(default_factory=list)  # indexed: dataset prefixes
    weights: Optional[list[float]] = None  # indexed: one per path (null: by dataset size)
    split: list[float] = field(default_factory=lambda: [98.0, 2.0, 0.0])  # train, valid, test
    index_cache_dir: Optional[str] = None  # megatron's sample-index cache; null: <cache_dir>/index


@dataclass
class OptimConfig:
    """AdamW with linear warmup and a decay schedule down to ``min_lr_ratio * lr``."""

    name: str = "adamw"
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_steps: int = 50
    schedule: str = "cosine"


@dataclass
class TrainerConfig:
    """Loop, batch and parallel layout. global batch = micro batch x accumulation x DP size."""

    steps: int = 1000
    micro_batch_size: int = 16
    global_batch_size: int = 16
    seq_length: int = 256
    eval_interval: int = 250
    eval_iters: int = 20
    log_interval: int = 25
    seed: int = 1234
    run_dir: str = "runs/${now:%Y-%m-%d_%H-%M-%S}"
    expert_parallel_size: int = 1
    tensor_parallel_size: int = 1  # only 1 is supported so far
    pipeline_parallel_size: int = 1  # only 1 is supported so far
    backend: Optional[str] = None  # torch.distributed backend; null: nccl with CUDA, else gloo
    init_timeout_s: float = 600.0  # how long ranks wait for each other at start-up
    precision: str = "fp32"
    save_interval: int = 0  # steps between checkpoints; 0: none (SIGTERM/SIGUSR1 still save)
    keep_last: int = 3  # complete checkpoints kept; older ones are deleted after a save
    resume: str = "auto"  # auto: newest complete checkpoint in run_dir | none | <path>
    force_resume: bool = False  # resume although run_dir's config.yaml has another model shape
    compile: Optional[bool] = None  # megatron jit_fuser (torch.compile); null: on with CUDA only
    num_threads: Optional[int] = None  # torch intra-op threads; null keeps torch's default


@dataclass
class LoggingConfig:
    """Where metrics go: terminal and ``metrics.jsonl`` always, wandb by ``wandb_mode``."""

    wandb_mode: str = "offline"
    wandb_project: str = "mone-train"
    wandb_entity: Optional[str] = None
    wandb_run_name: Optional[str] = None
    wandb_group: Optional[str] = None
    wandb_tags: list[str] = field(default_factory=list)
    wandb_dir: Optional[str] = (
        None  # wandb writes <wandb_dir>/wandb/; null: WANDB_DIR, else run dir
    )
    health_metrics: bool = True  # expert load, neuron utilisation, |SiLU(gate)| quantiles
    peak_tflops: Optional[float] = None  # for the GPU MFU estimate; null: known devices only


@dataclass
class Config:
    """The whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


SCHEMA_NAME = "mone_train_schema"


def register_configs() -> None:
    """Register the schema that ``configs/config.yaml`` lists first in its defaults."""
    ConfigStore.instance().store(name=SCHEMA_NAME, node=Config)


def _require(ok: bool, key: str, value: Any, valid: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: expected {valid}")


DATA_SOURCES = ("stdlib", "indexed")


def _validate_data(d: DataConfig) -> None:
    from mone_train.data.tokenizer import KINDS

    _require(d.name in DATA_SOURCES, "data.name", d.name, f"one of {list(DATA_SOURCES)}")
    tok = d.tokenizer
    _require(tok.type in KINDS, "data.tokenizer.type", tok.type, f"one of {list(KINDS)}")
    if tok.type != "byte":
        _require(bool(tok.path), "data.tokenizer.path", tok.path, "a local tokenizer file")
    if tok.eod_token is not None:
        _require(
            tok.type == "hf",
            "data.tokenizer.eod_token",
            tok.eod_token,
            "null unless data.tokenizer.type=hf (byte and sentencepiece fix their own)",
        )
    if d.name == "stdlib":
        return
    _require(len(d.paths) >= 1, "data.paths", list(d.paths), "a list of dataset prefixes")
    if d.weights is not None:
        _require(
            len(d.weights) == len(d.paths),
            "data.weights",
            list(d.weights),
            f"null or one weight per path ({len(d.paths)} paths)",
        )
        _require(
            all(w > 0 and math.isfinite(w) for w in d.weights),
            "data.weights",
            list(d.weights),
            "finite numbers > 0",
        )
    numbers = list(d.split)
    _require(
        len(numbers) == 3 and all(n >= 0 for n in numbers) and numbers[0] > 0 and numbers[1] > 0,
        "data.split",
        numbers,
        "three shares [train, valid, test] with train and valid > 0, e.g. [98,2,0]",
    )


def validate(cfg: Config, world_size: int | None = None) -> None:
    """Check the meaning of every value; raise ConfigError naming the first bad key.

    ``world_size`` (when known) enables the batch check that depends on it; whether EP divides
    the world size is checked when the process groups form (``mone_train.distributed``).
    """
    m, moe, d, o, t, lg = cfg.model, cfg.moe, cfg.data, cfg.optim, cfg.trainer, cfg.logging
    for key, value in [
        ("model.num_layers", m.num_layers),
        ("model.hidden_size", m.hidden_size),
        ("model.num_attention_heads", m.num_attention_heads),
        ("model.ffn_hidden_size", m.ffn_hidden_size),
        ("model.num_experts", m.num_experts),
        ("model.moe_ffn_hidden_size", m.moe_ffn_hidden_size),
        ("model.max_position_embeddings", m.max_position_embeddings),
        ("trainer.steps", t.steps),
        ("trainer.micro_batch_size", t.micro_batch_size),
        ("trainer.global_batch_size", t.global_batch_size),
        ("trainer.seq_length", t.seq_length),
        ("trainer.eval_interval", t.eval_interval),
        ("trainer.eval_iters", t.eval_iters),
        ("trainer.log_interval", t.log_interval),
        ("trainer.expert_parallel_size", t.expert_parallel_size),
        ("data.valid_every", d.valid_every),
    ]:
        _require(value >= 1, key, value, "an integer >= 1")
    _require(
        m.hidden_size % m.num_attention_heads == 0,
        "model.num_attention_heads",
        m.num_attention_heads,
        f"a divisor of model.hidden_size={m.hidden_size}",
    )
    if m.num_query_groups is not None:
        _require(
            m.num_query_groups >= 1 and m.num_attention_heads % m.num_query_groups == 0,
            "model.num_query_groups",
            m.num_query_groups,
            f"null or a divisor of model.num_attention_heads={m.num_attention_heads}",
        )
    _require(
        1 <= m.router_topk <= m.num_experts,
        "model.router_topk",
        m.router_topk,
        f"an integer in [1, model.num_experts={m.num_experts}]",
    )
    _require(
        1 <= m.moe_layer_freq <= m.num_layers,
        "model.moe_layer_freq",
        m.moe_layer_freq,
        f"an integer in [1, model.num_layers={m.num_layers}]",
    )
    _require(m.aux_loss_coeff >= 0, "model.aux_loss_coeff", m.aux_loss_coeff, "a number >= 0")
    _require(0 <= m.dropout < 1, "model.dropout", m.dropout, "a number in [0, 1)")
    _require(m.init_method_std > 0, "model.init_method_std", m.init_method_std, "a number > 0")
    if m.vocab_size is not None:
        _require(m.vocab_size >= 2, "model.vocab_size", m.vocab_size, "null or an integer >= 2")

    _require(moe.flavour in FLAVOURS, "moe.flavour", moe.flavour, f"one of {list(FLAVOURS)}")
    _require(
        0.0 < moe.neuron_keep_ratio <= 1.0,
        "moe.neuron_keep_ratio",
        moe.neuron_keep_ratio,
        "a ratio in (0, 1]",
    )
    _require(moe.ng_lbl_coeff >= 0, "moe.ng_lbl_coeff", moe.ng_lbl_coeff, "a number >= 0")
    _require(moe.kernel_impl in IMPLS, "moe.kernel_impl", moe.kernel_impl, f"one of {list(IMPLS)}")

    _validate_data(d)

    _require(o.name == "adamw", "optim.name", o.name, "'adamw'")
    _require(o.lr > 0 and math.isfinite(o.lr), "optim.lr", o.lr, "a finite number > 0")
    _require(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", o.min_lr_ratio, "a ratio in [0, 1]")
    _require(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "a number >= 0")
    _require(0 <= o.beta1 < 1, "optim.beta1", o.beta1, "a number in [0, 1)")
    _require(0 <= o.beta2 < 1, "optim.beta2", o.beta2, "a number in [0, 1)")
    _require(o.eps > 0, "optim.eps", o.eps, "a number > 0")
    _require(o.clip_grad >= 0, "optim.clip_grad", o.clip_grad, "a number >= 0 (0 disables)")
    _require(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, "an integer >= 0")
    _require(o.schedule in SCHEDULES, "optim.schedule", o.schedule, f"one of {list(SCHEDULES)}")

    _require(
        t.seq_length <= m.max_position_embeddings,
        "trainer.seq_length",
        t.seq_length,
        f"at most model.max_position_embeddings={m.max_position_embeddings}",
    )
    _require(
        t.global_batch_size % t.micro_batch_size == 0,
        "trainer.global_batch_size",
        t.global_batch_size,
        f"a multiple of trainer.micro_batch_size={t.micro_batch_size}",
    )
    _require(
        t.precision in PRECISIONS, "trainer.precision", t.precision, f"one of {list(PRECISIONS)}"
    )
    if t.num_threads is not None:
        _require(
            t.num_threads >= 1, "trainer.num_threads", t.num_threads, "null or an integer >= 1"
        )
    for key, value in [
        ("trainer.tensor_parallel_size", t.tensor_parallel_size),
        ("trainer.pipeline_parallel_size", t.pipeline_parallel_size),
    ]:
        _require(
            value == 1, key, value, "1 (tensor and pipeline parallelism are not supported yet)"
        )
    if t.backend is not None:
        _require(
            t.backend in BACKENDS, "trainer.backend", t.backend, f"null or one of {list(BACKENDS)}"
        )
    _require(
        t.init_timeout_s > 0, "trainer.init_timeout_s", t.init_timeout_s, "a number of seconds > 0"
    )
    ep = t.expert_parallel_size
    _require(
        m.num_experts % ep == 0,
        "model.num_experts",
        m.num_experts,
        f"a multiple of trainer.expert_parallel_size={ep}",
    )
    if world_size is not None:
        per_step = t.micro_batch_size * world_size
        _require(
            t.global_batch_size % per_step == 0,
            "trainer.global_batch_size",
            t.global_batch_size,
            f"a multiple of micro_batch_size x world size = {per_step}",
        )
    _require(
        lg.wandb_mode in WANDB_MODES,
        "logging.wandb_mode",
        lg.wandb_mode,
        f"one of {list(WANDB_MODES)}",
    )
    # K must be a valid neuron count for this F (always true once rho is in (0, 1]).
    num_kept_neurons(moe.neuron_keep_ratio, m.moe_ffn_hidden_size)
