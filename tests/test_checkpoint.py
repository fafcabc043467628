"""Checkpoints: exact resume, atomicity, preemption, resharding, keep-last-N, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mone_train.components.checkpoint import CHECKPOINTS, LATEST, MARKER, CheckpointError
from mone_train.errors import EXIT_PREEMPTED, ConfigError
from tests.helpers.distributed import TINY_RUN, losses, metrics, run_processes, train

# Training runs, subprocesses or process groups: the full tier only (make test).
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
BASE = TINY_RUN


def _run(run_dir, *extra):
    return train(run_dir, 1, *extra)


@pytest.mark.parametrize("flavour", ["moe", "mone"])
def test_resume_is_bit_exact(tmp_path, flavour):
    _run(tmp_path / "straight", f"moe={flavour}", "trainer.steps=20")
    _run(tmp_path / "resumed", f"moe={flavour}", "trainer.steps=10", "trainer.save_interval=10")
    _run(tmp_path / "resumed", f"moe={flavour}", "trainer.steps=20", "trainer.save_interval=10")
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    records = metrics(tmp_path / "resumed")
    assert [r["consumed_samples"] for r in records if "loss" in r] == [8 * s for s in range(1, 21)]


def test_keep_last_deletes_only_the_oldest_complete(tmp_path):
    run_dir = tmp_path / "run"
    _run(run_dir, "trainer.steps=20", "trainer.save_interval=5", "trainer.keep_last=2")
    folder = run_dir / CHECKPOINTS
    assert sorted(p.name for p in folder.glob("step_*")) == ["step_00000015", "step_00000020"]
    assert (folder / LATEST).read_text().strip() == "step_00000020"
    assert all((p / MARKER).is_file() for p in folder.glob("step_*"))


def test_auto_resume_skips_an_incomplete_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    _run(run_dir, "trainer.steps=10", "trainer.save_interval=5")
    (run_dir / CHECKPOINTS / "step_00000010" / MARKER).unlink()  # as if killed before the marker
    with pytest.warns(UserWarning, match="skipping incomplete checkpoint"):
        _run(run_dir, "trainer.steps=12", "trainer.save_interval=100")
    steps = [r["step"] for r in metrics(run_dir) if "loss" in r]
    assert steps[-7:] == [6, 7, 8, 9, 10, 11, 12]  # resumed from step 5


def test_sigkill_while_saving_leaves_the_previous_checkpoint_usable(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "mone_train.train", *BASE, f"trainer.run_dir={run_dir}",
        "trainer.steps=400", "trainer.save_interval=1", "trainer.keep_last=400",
    ]  # fmt: skip
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1"}
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    folder = run_dir / CHECKPOINTS

    def wait_for(condition):
        deadline = time.monotonic() + 120
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.005)

    wait_for(lambda: len(list(folder.glob("step_*"))) >= 2)
    wait_for(lambda: any(folder.glob(".tmp-step_*")))
    proc.send_signal(signal.SIGKILL)  # inside a save: it saves every step
    proc.wait()
    complete = sorted(p for p in folder.glob("step_*") if (p / MARKER).is_file())
    assert complete
    summary = _run(
        run_dir, f"trainer.steps={int(complete[-1].name[5:]) + 2}", "trainer.save_interval=100"
    )
    assert summary["steps"] == int(complete[-1].name[5:]) + 2


def test_sigterm_saves_and_exits_with_the_requeue_code(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "mone_train.train",
        *BASE,
        f"trainer.run_dir={run_dir}",
        "trainer.steps=100000",
    ]
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1"}
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (run_dir / "metrics.jsonl").exists():
        time.sleep(0.1)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, out[-2000:]
    complete = [p for p in (run_dir / CHECKPOINTS).glob("step_*") if (p / MARKER).is_file()]
    assert len(complete) == 1
    assert f"exiting with code {EXIT_PREEMPTED}" in out


def _eval_at(run_dir, world_size, ep, *extra):
    overrides = [*BASE, f"trainer.run_dir={run_dir}", "trainer.micro_batch_size=4", "trainer.global_batch_size=8",
                 f"trainer.expert_parallel_size={ep}", *extra]  # fmt: skip
    run_processes(world_size, overrides)


@pytest.mark.parametrize("save_ep,load_ep", [(2, 1), (1, 2)])
def test_resharding_between_expert_parallel_sizes(tmp_path, save_ep, load_ep):
    source = tmp_path / "source"
    _eval_at(source, 2, save_ep, "trainer.steps=10", "trainer.save_interval=10")
    saved_val = [r["val_loss"] for r in metrics(source) if "val_loss" in r][-1]
    target = tmp_path / "target"
    checkpoint = source / CHECKPOINTS / "step_00000010"
    # Resume with no further training steps beyond one evaluation: steps == saved step.
    _eval_at(
        target,
        2,
        load_ep,
        "trainer.steps=10",
        f"trainer.resume={checkpoint}",
        "trainer.eval_interval=1",
    )
    loaded_val = [r["val_loss"] for r in metrics(target) if "val_loss" in r]
    assert loaded_val and abs(loaded_val[-1] - saved_val) <= 1e-6


def test_bad_checkpoints_end_in_one_clear_error(tmp_path):
    run_dir = tmp_path / "run"
    _run(run_dir, "trainer.steps=5", "trainer.save_interval=5")
    checkpoint = run_dir / CHECKPOINTS / "step_00000005"

    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        _run(tmp_path / "a", f"trainer.resume={tmp_path / 'missing'}")

    with pytest.raises(
        CheckpointError, match=r"different model: hidden_size 64 \(checkpoint\) vs 32"
    ):
        _run(tmp_path / "b", f"trainer.resume={checkpoint}", "model.hidden_size=32")
    # A start that fails leaves no hang watchdog running in the process (it would end it later).
    assert not [t for t in threading.enumerate() if t.name == "mone-watchdog"]

    with pytest.raises(ConfigError, match="another model shape.*force_resume"):
        _run(run_dir, "trainer.steps=6", "model.num_layers=3")

    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(checkpoint, broken)
    for data in broken.glob("*.distcp"):
        data.write_bytes(data.read_bytes()[:64])  # truncated
    with pytest.raises(CheckpointError, match="cannot be loaded"):
        _run(tmp_path / "c", f"trainer.resume={broken}")

    (broken / MARKER).unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        _run(tmp_path / "d", f"trainer.resume={broken}")

    # Nothing of the original run was touched by the failed starts.
    assert json.loads((checkpoint / MARKER).read_text())["step"] == 5
    assert not (tmp_path / "a" / "metrics.jsonl").exists()


# A gathered object of 200 kB: gloo copies it with a torch op inside its own worker thread.
_GLOO_THREAD_PROBE = """
import json, os, sys
import torch
import torch.distributed as dist
from mone_train.components.checkpoint import single_threaded_collectives

torch.set_num_threads(2)
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
dist.init_process_group("gloo", rank=0, world_size=1)
torch.ones(1000, 1000).sum()  # the main thread's OpenMP team exists before counting

def gather(group):
    dist.all_gather_object([None], bytes(200_000), group=group)

grown = {}
for name, fn in (("guarded", single_threaded_collectives(gather)), ("plain", gather)):
    group = dist.new_group([0], backend="gloo")  # fresh gloo worker threads
    dist.barrier(group=group)
    before = len(os.listdir("/proc/self/task"))
    fn(group)
    grown[name] = len(os.listdir("/proc/self/task")) - before
print(json.dumps({"grown": grown, "threads_after": torch.get_num_threads()}))
dist.destroy_process_group()
"""


def test_collectives_in_saves_start_no_openmp_team_in_gloo_threads():
    """The after-save slowdown's cause and its guard, on real gloo threads: a large gathered
    object makes the worker thread start an OpenMP team (one more thread libgomp manages, which
    shortens its spin-wait process-wide), unless torch's thread count is 1 while it runs."""
    from tests.helpers.distributed import free_port

    out = subprocess.run(
        [sys.executable, "-c", _GLOO_THREAD_PROBE, str(free_port())],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["grown"]["guarded"] == 0, result
    assert result["threads_after"] == 2  # the guard restores torch's setting
    if result["grown"]["plain"] < 1:  # depends on torch's build (OpenMP runtime, gloo copies)
        pytest.skip(f"no OpenMP team starts in gloo's thread on this torch: {result}")


@pytest.mark.parametrize("async_save", [False, True])
def test_checkpoint_collectives_run_single_threaded(tmp_path, monkeypatch, async_save):
    """Every object collective that megatron's or torch's checkpointing issues during saves,
    asynchronous finalization and resume runs while torch's thread count is 1; training runs
    with the configured count."""
    import torch
    import torch.distributed as dist

    seen: list[tuple[str, int]] = []
    for name in ("all_gather_object", "gather_object", "broadcast_object_list"):
        real = getattr(dist, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if "checkpoint" in caller:
                seen.append((_name, torch.get_num_threads()))
            return _real(*args, **kwargs)

        monkeypatch.setattr(dist, name, spy)
    run_dir = tmp_path / "run"
    common = ["trainer.num_threads=2", f"trainer.async_save={str(async_save).lower()}"]
    _run(run_dir, *common, "trainer.steps=10", "trainer.save_interval=5")
    _run(run_dir, *common, "trainer.steps=12", "trainer.save_interval=100")  # resumes
    assert len(seen) >= 6, seen  # two saves and a load, several gathers each
    assert {threads for _, threads in seen} == {1}, seen
    assert torch.get_num_threads() == 2


def test_saving_does_not_change_a_fresh_processes_numbers(tmp_path):
    """Two fresh processes, one saving every 4 steps: identical losses. (Saves set torch's
    thread count and back; a process that never set it rounds SDPA's backward differently at
    the `small` model's attention shapes, not at `tiny`'s.)"""
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1"}
    for name, interval in (("saving", 4), ("not-saving", 0)):
        subprocess.run(
            [sys.executable, "-m", "mone_train.train", *BASE, "trainer.steps=8",
             "model=small", "trainer.seq_length=256", "trainer.eval_interval=8",
             f"trainer.run_dir={tmp_path / name}", f"trainer.save_interval={interval}"],
            cwd=REPO, env=env, check=True, capture_output=True, timeout=300,
        )  # fmt: skip
    assert losses(tmp_path / "saving") == losses(tmp_path / "not-saving")
