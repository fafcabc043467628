"""Run the trainer on several processes the way a launcher would (env:// rendezvous).

Workers compute on the CPU over gloo unless a test asks for ``device="cuda"`` (one GPU, NCCL):
MONE_TRAIN_DEVICE is what their ``trainer.device=auto`` means, so on a machine with a GPU the
CPU tests stay on the CPU, and LOCAL_RANK picks no GPU there.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# What a worker imports before it is forked (CPU runs): every run then skips ~4 s of imports.
PRELOAD = ["torch", "megatron.core", "mone_train.compose", "mone_train.trainer", __name__]


def _context(device: str):
    """CPU workers fork from a server process that has imported torch, megatron-core and the
    trainer once (a 2-process tiny run: ~6 s instead of ~13 with spawned processes that import
    everything again); CUDA workers are spawned fresh."""
    if device != "cpu":
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def _worker(
    rank: int, world_size: int, port: int, overrides: list[str], device: str, env: dict
) -> None:
    os.environ.clear()  # this test's environment, not the fork server's (started earlier)
    os.environ.update(env)
    os.environ.update(
        MONE_TRAIN_DEVICE=device,
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        TORCHDYNAMO_DISABLE="1",
    )
    from mone_train.compose import compose_config
    from mone_train.trainer import run

    run(compose_config(overrides))


def run_processes(
    world_size: int, overrides: list[str], timeout_s: float = 240, device: str = "cpu"
) -> None:
    """Train with ``world_size`` processes on ``device`` (cpu | cuda); raise if any fails."""
    ctx = _context(device)
    port = free_port()
    env = dict(os.environ)
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, overrides, device, env))
        for r in range(world_size)
    ]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(p.is_alive() for p in procs):
        if any(p.exitcode not in (None, 0) for p in procs):
            break  # one rank failed: the others would wait for it until the timeout
        time.sleep(0.1)
    codes = []
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join(10)
        codes.append(proc.exitcode)
    assert codes == [0] * world_size, f"exit codes {codes}"


def _serial_worker(runs: list[list[str]], device: str, deterministic: bool) -> None:
    os.environ.update(MONE_TRAIN_DEVICE=device, TORCHDYNAMO_DISABLE="1")
    if deterministic:  # cuBLAS's fixed-workspace mode and torch's deterministic kernels
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
        import torch

        torch.use_deterministic_algorithms(True, warn_only=True)
    from mone_train.compose import compose_config
    from mone_train.trainer import run

    for overrides in runs:
        run(compose_config(overrides))


def train_in_fresh_process(
    runs: list[list[str]], device: str, timeout_s: float = 600, deterministic: bool = False
) -> None:
    """Train each override list in turn, as single-process runs in one fresh process on
    ``device`` (its imports paid once); raise if it fails."""
    proc = multiprocessing.get_context("spawn").Process(
        target=_serial_worker, args=(runs, device, deterministic)
    )
    proc.start()
    proc.join(timeout_s)
    if proc.is_alive():
        proc.kill()
    assert proc.exitcode == 0, f"exit code {proc.exitcode}"


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# A few-second `tiny` run with a log record every step (checkpoint, precision, sharding tests).
TINY_RUN = [
    "model=tiny",
    "trainer=smoke",
    "trainer.log_interval=1",
    "trainer.eval_interval=10",
    "trainer.eval_iters=2",
    "trainer.seq_length=32",
    "logging.wandb_mode=disabled",
    "evaluation.stdlib_task_examples=0",  # the built-in task: tests of it name it
]


def train(run_dir: Path, world_size: int, *overrides: str, device: str = "cpu") -> dict | None:
    """Train ``TINY_RUN`` + ``overrides`` into ``run_dir`` in this process (1 process on the
    CPU) or in ``world_size`` fresh processes (a CUDA run always: the test process may hold
    the CPU patches of parallel/cpu_compat.py); the summary of an in-process run."""
    full = [*TINY_RUN, f"trainer.run_dir={run_dir}", *overrides]
    if world_size > 1:
        run_processes(world_size, full, device=device)
        return None
    if device != "cpu":
        train_in_fresh_process([full], device)
        return None
    from mone_train.compose import compose_config
    from mone_train.trainer import run

    return run(compose_config(full))


def losses(run_dir: Path) -> list[float]:
    """The run's training and validation losses in logged order."""
    return [r.get("loss", r.get("val_loss")) for r in metrics(run_dir)]
