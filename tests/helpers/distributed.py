"""Run the trainer on several gloo processes the way a launcher would (env:// rendezvous)."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, overrides: list[str]) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        TORCHDYNAMO_DISABLE="1",
    )
    from mone_train.compose import compose_config
    from mone_train.trainer import run

    run(compose_config(overrides))


def run_processes(world_size: int, overrides: list[str], timeout_s: float = 240) -> None:
    """Train with ``world_size`` processes; raise if any of them fails."""
    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, overrides))
        for r in range(world_size)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout_s)
    codes = []
    for proc in procs:
        if proc.is_alive():
            proc.kill()
        codes.append(proc.exitcode)
    assert codes == [0] * world_size, f"exit codes {codes}"


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
]


def train(run_dir: Path, world_size: int, *overrides: str) -> dict | None:
    """Train ``TINY_RUN`` + ``overrides`` into ``run_dir`` in this process (1) or in
    ``world_size`` processes; the summary of an in-process run."""
    full = [*TINY_RUN, f"trainer.run_dir={run_dir}", *overrides]
    if world_size > 1:
        run_processes(world_size, full)
        return None
    from mone_train.compose import compose_config
    from mone_train.trainer import run

    return run(compose_config(full))


def losses(run_dir: Path) -> list[float]:
    """The run's training and validation losses in logged order."""
    return [r.get("loss", r.get("val_loss")) for r in metrics(run_dir)]
