"""mone-import and mone-export at bounded memory: what they write (the checkpoint's own dtype,
``save_pretrained``'s files streamed shard by shard, any saved layout) and the bad input they
refuse before writing anything. The memory itself is measured by benchmarks/interop_memory.py.
"""

from __future__ import annotations

import json
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from mone_train.export.cli import main as export_main
from mone_train.importer.cli import main as import_main
from tests.helpers.distributed import TINY_RUN
from tests.helpers.hf_models import build_hf_model, save_hf_model, tokens

TRAIN = [*TINY_RUN, "moe=moe", "trainer.steps=2", "trainer.eval_interval=2",
         "trainer.eval_iters=1", "trainer.log_interval=2"]  # fmt: skip


def _import(source: Path, out: Path, *extra: str) -> Path:
    assert import_main([str(source), "--out", str(out), *extra]) == 0
    return out


def _export(source: Path, out: Path, *extra: str) -> Path:
    assert export_main([str(source), "--out", str(out), *extra]) == 0
    return out


def _safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def _assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())[:3]
    for name, tensor in a.items():
        assert tensor.dtype == b[name].dtype and torch.equal(tensor, b[name]), name


def _one_line_error(capsys, main, argv: list[str], prog: str) -> str:
    capsys.readouterr()  # (what came before: save_pretrained's progress bar)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"{prog}: ") and "\n" not in err, err
    return err


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    """A tiny Qwen3-MoE (dense first layer, per-head QK norm) saved in fp32, and its import."""
    root = tmp_path_factory.mktemp("qwen3")
    source = save_hf_model(build_hf_model("qwen3_moe"), root / "hf")
    return source, _import(source, root / "imported")


@pytest.mark.slow  # an import, two exports
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_streamed_export_writes_what_save_pretrained_writes(qwen3, tmp_path, dtype):
    """The shards written tensor by tensor hold what transformers' ``save_pretrained`` of the
    whole model in memory writes (names, dtypes, bytes), with the same config files, and load."""
    from transformers import AutoModelForCausalLM

    from mone_train.export.writer import hf_model_from_checkpoint

    _, imported = qwen3
    out = _export(imported, tmp_path / "streamed", "--dtype", dtype, "--max-shard-size", "40KB")
    model, _, _ = hf_model_from_checkpoint(imported, getattr(torch, dtype))
    model.save_pretrained(tmp_path / "reference")
    _assert_same_tensors(_safetensors(out), _safetensors(tmp_path / "reference"))
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    held = {f.name: sum(v == f.name for v in index["weight_map"].values()) for f in shards}
    assert len(shards) > 3  # at most 40 KB of tensors each, or one larger tensor alone
    assert all(f.stat().st_size <= 40_000 + 2_000 or held[f.name] == 1 for f in shards)
    assert set(index["weight_map"].values()) == {f.name for f in shards}
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in _safetensors(out).values())
    for name in ("config.json", "generation_config.json"):
        assert json.loads((out / name).read_text()) == json.loads(
            (tmp_path / "reference" / name).read_text()
        ), name
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.dtype == getattr(torch, dtype)


@pytest.mark.slow  # 2 processes train 2 steps at TP 2 x EP 2, two exports
def test_export_from_tp2_ep2_equals_export_of_the_same_weights_at_one_process(tmp_path, corpus):
    from megatron.core import dist_checkpointing

    from mone_train.components.checkpoint import MARKER, newest_checkpoint, use_forked_results_queue
    from mone_train.components.checkpoint_model import checkpoint_model
    from tests.helpers.distributed import run_processes

    layout = ["trainer.tensor_parallel_size=2", "trainer.expert_parallel_size=2",
              "trainer.micro_batch_size=8", "trainer.save_interval=2"]  # fmt: skip
    run_processes(2, [*TRAIN, *layout, f"trainer.run_dir={tmp_path / 'run'}"])
    saved = newest_checkpoint(tmp_path / "run")
    marker = json.loads((saved / MARKER).read_text())
    assert marker["world_size"] == 2 and marker["config"]["trainer"]["tensor_parallel_size"] == 2
    # the same weights at one process: the whole model loaded, saved again (another path)
    single = tmp_path / "single"
    single.mkdir()
    with checkpoint_model(saved) as opened:
        use_forked_results_queue()
        dist_checkpointing.save({"model": opened.model.sharded_state_dict()}, str(single))
    (single / MARKER).write_text(json.dumps({**marker, "world_size": 1}))
    from_layout = _export(saved, tmp_path / "from-tp2-ep2", "--max-shard-size", "100KB")
    from_single = _export(single, tmp_path / "from-one", "--max-shard-size", "100KB")
    files = sorted(p.name for p in from_layout.glob("*.safetensors"))
    assert len(files) > 1 and files == sorted(p.name for p in from_single.glob("*.safetensors"))
    for name in files:
        assert (from_layout / name).read_bytes() == (from_single / name).read_bytes(), name


@pytest.mark.slow  # two imports and a transformers load
def test_a_bf16_source_imports_as_bf16_unless_asked_otherwise(tmp_path):
    from megatron.core import dist_checkpointing
    from transformers import AutoModelForCausalLM

    from tests.test_export import _megatron_logits

    source = tmp_path / "bf16"
    build_hf_model("mixtral").to(torch.bfloat16).save_pretrained(source)
    ours = _import(source, tmp_path / "ours")
    stored = dist_checkpointing.load_tensors_metadata(str(ours))
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}
    assert json.loads((ours / "import.json").read_text())["dtype"] == "bfloat16"
    # the bf16 weights exactly, computed in fp32 on both sides
    reference = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    reference.config._attn_implementation = "eager"
    t = tokens()
    with torch.no_grad():
        expected = reference(t).logits
    torch.testing.assert_close(_megatron_logits(ours, t), expected, rtol=0, atol=1e-4)
    widened = _import(source, tmp_path / "fp32", "--dtype", "float32")
    stored = dist_checkpointing.load_tensors_metadata(str(widened))
    assert {t.dtype for t in stored.values()} == {torch.float32}


def test_a_truncated_safetensors_file_is_named(tmp_path, capsys):
    source = save_hf_model(build_hf_model("olmoe"), tmp_path / "hf", max_shard_size="40KB")
    shard = sorted(source.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    out = tmp_path / "out"
    err = _one_line_error(capsys, import_main, [str(source), "--out", str(out)], "mone-import")
    assert f"{shard}: truncated" in err and "copy it again" in err
    shard.write_bytes(b"\x10")
    err = _one_line_error(capsys, import_main, [str(source), "--out", str(out)], "mone-import")
    assert f"{shard}: truncated or not a safetensors file" in err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_an_index_naming_the_wrong_shard_is_refused(tmp_path, capsys):
    source = save_hf_model(build_hf_model("olmoe"), tmp_path / "hf", max_shard_size="40KB")
    index_file = source / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    moved = next(name for name, file in sorted(index["weight_map"].items()) if file != first)
    index["weight_map"][moved] = first
    index_file.write_text(json.dumps(index))
    out = tmp_path / "out"
    err = _one_line_error(capsys, import_main, [str(source), "--out", str(out)], "mone-import")
    assert err.endswith(f"{source / first} lacks {moved!r}, which model.safetensors.index.json "
                        "places there")  # fmt: skip
    assert not out.exists()


def _disk_with(free: int):
    usage = namedtuple("usage", "total used free")
    return lambda path: usage(10 * free + 1, 9 * free + 1, free)


@pytest.mark.slow  # an import (the fixture) and an export
def test_too_little_disk_is_refused_before_writing(qwen3, tmp_path, capsys, monkeypatch):
    """Both commands compute the bytes they will write and compare them with the free space
    of --out's disk first."""
    source, imported = qwen3
    monkeypatch.setattr(shutil, "disk_usage", _disk_with(100_000))  # the weights are ~0.5 MB
    out = tmp_path / "out"
    err = _one_line_error(capsys, import_main, [str(source), "--out", str(out)], "mone-import")
    assert f"--out {tmp_path}: writing it needs 0." in err and "but its disk has 0.1 MB free" in err
    err = _one_line_error(capsys, export_main, [str(imported), "--out", str(out)], "mone-export")
    assert "writing it needs" in err and "choose a folder on a disk with more space" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    monkeypatch.setattr(shutil, "disk_usage", _disk_with(10**9))
    _export(imported, out)  # enough: the same call goes through


@pytest.mark.slow  # a 2-step run
def test_exporting_a_run_without_a_checkpoint_says_how_to_get_one(tmp_path, capsys, corpus):
    from mone_train.compose import compose_config
    from mone_train.trainer import run

    run_dir = tmp_path / "run"
    run(compose_config([*TRAIN, "trainer.save_interval=0", f"trainer.run_dir={run_dir}"]))
    out = tmp_path / "out"
    err = _one_line_error(capsys, export_main, [str(run_dir), "--out", str(out)], "mone-export")
    assert "a run directory that saved no checkpoint" in err and "trainer.save_interval=N" in err
    assert "interrupted" not in err
    # what the checkpointer leaves while a save is being written
    staging = run_dir / "checkpoints" / ".tmp-step_00000002"
    staging.mkdir(parents=True)
    (staging / "__0_0.distcp").write_bytes(b"\0" * 64)
    err = _one_line_error(capsys, export_main, [str(run_dir), "--out", str(out)], "mone-export")
    assert "its only save, checkpoints/.tmp-step_00000002, is still being written" in err
    err = _one_line_error(capsys, export_main, [str(staging), "--out", str(out)], "mone-export")
    assert "is a save still being written (no COMPLETE.json yet)" in err
    assert not out.exists()


def test_the_memory_benchmark_met_the_bound():
    """benchmarks/results/interop_memory_cpu.json (quoted in docs/import.md, where
    tests/test_docs_results.py checks every figure): both sizes within 1.5 x + 1.5 GiB and a
    slope of at most 1.5."""
    repo = Path(__file__).resolve().parent.parent
    results = json.loads((repo / "benchmarks/results/interop_memory_cpu.json").read_text())
    gib = 2**30
    for r in results["models"].values():
        bound = 1.5 * r["checkpoint_bytes"] + 1.5 * gib
        assert r["import"]["peak_bytes"] <= bound and r["export"]["peak_bytes"] <= bound
        assert r["import"]["within_bound"] and r["export"]["within_bound"]
    assert max(results["import_slope"], results["export_slope"]) <= 1.5
    assert "interop_memory_cpu.json" in (repo / "docs/import.md").read_text()
