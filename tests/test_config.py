"""Every shipped config composes and validates; bad values end in one clear line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mone_train.compose import CONFIG_DIR, compose_config
from mone_train.config import Config, validate
from mone_train.errors import ConfigError
from mone_train.preflight import check_overrides

GROUPS = ["model", "moe", "data", "optim", "trainer", "logging", "evaluation"]
REPO = Path(__file__).resolve().parent.parent


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize(
    "override", [f"{group}={option}" for group in GROUPS for option in _options(group)]
)
def test_every_shipped_config_composes_and_validates(override):
    required = {
        "data=indexed": ["data.paths=[/data/web]"],  # no default for where data lives
        "trainer=gpu": ["model=1b"],  # sequences of 4096: for the GPU-scale models
    }
    cfg = compose_config([override, *required.get(override, [])])
    assert isinstance(cfg, Config)
    validate(cfg)


def test_every_group_has_a_schema_field():
    assert set(GROUPS) == {f for f in Config.__dataclass_fields__}
    for group in GROUPS:
        assert _options(group), f"configs/{group}/ is empty"


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["moe.neuron_keep_ratio=1.5"], "moe.neuron_keep_ratio"),
        (["moe.neuron_keep_ratio=0"], "moe.neuron_keep_ratio"),
        (["model.router_topk=9"], "model.router_topk"),
        (["trainer.expert_parallel_size=3"], "model.num_experts"),
        (["trainer.seq_length=2048"], "trainer.seq_length"),
        (["trainer.global_batch_size=20"], "trainer.global_batch_size"),
        (["moe.kernel_impl=cuda"], "moe.kernel_impl"),
        (["trainer.stpes=10"], "trainer.stpes"),
        (["trainer.steps=ten"], "trainer.steps"),
        (["model=huge"], "model=huge"),
        # tensor and pipeline parallelism (checked before any process group starts)
        (["model=tiny", "trainer.tensor_parallel_size=3"], "model.num_attention_heads"),
        (
            ["model=tiny", "model.num_query_groups=2", "trainer.tensor_parallel_size=4"],
            "model.num_query_groups",
        ),
        (
            [
                "model=tiny",
                "model.head_dim=16",
                "model.hidden_size=66",
                "trainer.tensor_parallel_size=4",
            ],
            "model.hidden_size",
        ),
        (["model=tiny", "trainer.pipeline_parallel_size=3"], "trainer.pipeline_parallel_size"),
        (
            [
                "model=tiny",
                "trainer.tensor_parallel_size=2",
                "trainer.expert_tensor_parallel_size=2",
            ],
            "trainer.expert_tensor_parallel_size",
        ),
        (["model=tiny", "trainer.tensor_parallel_size=2", "model.norm=torch"], "model.norm"),
        (
            ["model=tiny", "trainer.tensor_parallel_size=2", "trainer.seq_length=255"],
            "trainer.seq_length",
        ),
        (
            ["model=tiny", "trainer.pipeline_parallel_size=2", "model.tie_embeddings=true"],
            "model.tie_embeddings",
        ),
    ],
)
def test_bad_values_end_in_one_line_naming_the_key(overrides, key, capsys):
    with pytest.raises(SystemExit) as exit_info:
        check_overrides(overrides)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert key in err


def test_unknown_key_lists_the_valid_ones(capsys):
    with pytest.raises(SystemExit):
        check_overrides(["trainer.stpes=10"])
    err = capsys.readouterr().err
    assert "unknown config key 'trainer.stpes'" in err and "steps" in err


def test_world_size_checks():
    cfg = compose_config(["trainer.expert_parallel_size=2", "trainer.micro_batch_size=8"])
    validate(cfg, world_size=2)
    cfg = compose_config(["trainer.global_batch_size=16", "trainer.micro_batch_size=16"])
    with pytest.raises(ConfigError, match="micro_batch_size x data-parallel size"):
        validate(cfg, world_size=3)
    # world = TP x PP x data parallel = EP x PP x expert data parallel (not TP x PP x EP)
    folded = ["model=tiny", "trainer.tensor_parallel_size=2", "trainer.expert_parallel_size=2",
              "trainer.micro_batch_size=8"]  # fmt: skip
    validate(compose_config(folded), world_size=2)
    with pytest.raises(ConfigError, match="tensor_parallel_size=2 is invalid: expected a "
                       "divisor of the world size 3"):  # fmt: skip
        validate(compose_config(["model=tiny", "trainer.tensor_parallel_size=2"]), world_size=3)
    with pytest.raises(ConfigError, match="expert_parallel_size x pipeline_parallel_size = 4"):
        validate(compose_config([*folded, "trainer.pipeline_parallel_size=2"]), world_size=6)


def test_cli_exits_nonzero_with_one_line(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mone_train.train",
            "moe.neuron_keep_ratio=2",
            f"trainer.run_dir={tmp_path / 'r'}",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [
        "mone-train: error: moe.neuron_keep_ratio=2.0 is invalid: expected a ratio in (0, 1]"
    ]
    assert not (tmp_path / "r").exists()
